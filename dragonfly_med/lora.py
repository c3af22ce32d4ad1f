"""Low-rank adapters (LoRA) for the LLM's linear layers: train them, save them, merge them.

The tiny model ships within a 30 MB asset budget, so its LLM cannot be fine-tuned and shipped as
full weights (540 MB in fp32). Training wraps each targeted `nn.Linear` as W x + (B A) x, with
W frozen and A [rank, in], B [out, rank] trained; B starts at zero so training starts from the
unchanged LLM. Saved adapters hold B with the scale alpha / rank already folded in, so merging is
always W += B @ A, and the adapters of successive stages concatenate along the rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

ADAPTER_FILE = "lora.safetensors"
# Every projection of a Llama decoder layer (attention and MLP).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T.to(x.dtype)) @ (self.lora_B.T.to(x.dtype) * self.scale)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B * scale): the update as saved, so that merging is W += B @ A."""
        return self.lora_A.detach().float(), (self.lora_B.detach() * self.scale).float()


def add_lora(module: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every `nn.Linear` of `module` whose name ends with one of `targets`; returns their
    names (relative to `module`). Raises when nothing matched, rather than training nothing."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not names:
        raise ValueError(f"no linear layer named {targets} in {type(module).__name__}")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha))
    return names


def adapters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trained updates of `module` as `{name}.lora_A` / `{name}.lora_B` (scale folded in), on
    the CPU like adapters read from a file, whatever device the model trains on."""
    tensors = {}
    for name, child in module.named_modules():
        if isinstance(child, LoRALinear):
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = (t.cpu() for t in child.folded())
    return tensors


def merge_lora(module: nn.Module) -> None:
    """Replace each LoRALinear by its base layer with the update merged in (W += B A scale)."""
    for name, child in list(module.named_modules()):
        if isinstance(child, LoRALinear):
            a, b = child.folded()
            with torch.no_grad():
                child.base.weight += (b @ a).to(child.base.weight.dtype)
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attr, child.base)


def concat_adapters(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapters equivalent to applying `first` then `second` (ranks add up)."""
    out = dict(first)
    for key, tensor in second.items():
        if key not in out:
            out[key] = tensor
        else:
            out[key] = torch.cat([out[key], tensor], dim=0 if key.endswith("lora_A") else 1)
    return out


def apply_adapters(module: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Merge saved adapters into the plain linear layers of `module`; returns how many layers
    changed. Every adapter must find its layer, with matching shapes."""
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    for name in names:
        layer = module.get_submodule(name)
        a, b = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
        if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
            raise ValueError(f"adapter {name}: update {(b.shape[0], a.shape[1])} does not fit weight {tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight += (b.to(layer.weight.device) @ a.to(layer.weight.device)).to(layer.weight.dtype)
    return len(names)


def save_adapters(tensors: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rank = max((t.shape[0] for k, t in tensors.items() if k.endswith("lora_A")), default=0)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path), metadata={"rank": str(rank)})
    return path


def load_adapters(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}
