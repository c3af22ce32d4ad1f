"""LoRA for the LLM's projections through PEFT: add adapters, merge them, save the stages' chain.

The tiny model ships within a 30 MB asset budget, so its LLM cannot be fine-tuned and shipped as
full weights (540 MB in fp32): stages 2 and 3 train PEFT LoRA adapters, and every stage ends with
them merged (final/ is a plain model). `inject_adapter_in_model` adds them in place, inside the
Dragonfly model, so that its module names, checkpoints and `model_parts` stay as they are.

What ships is ONE adapter that turns the packaged LLM into the last stage's, in PEFT's format
(`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]), so that
`PeftModel.from_pretrained(llm, folder)` loads it. Yet stage 3 trains fresh adapters on stage 2's
merged LLM. With each stage's scale s = alpha / r, the two updates add up to one adapter:

    W + s2 B2 A2 + s3 B3 A3 = W + [s2 B2 | s3 B3] [A2 ; A3]

So a chain holds, per module, A and B with the scale folded into B, stages concatenate along the
rank, and the saved config says lora_alpha = r: PEFT's scale alpha / r is then 1 and its merge is
exactly W += B A. That is why chains are written here and not by `PeftModel.save_pretrained`,
which would save one stage's adapter with that stage's own scale.

peft is imported where it is used: it pulls bitsandbytes (seconds), which loading a built model
does not need.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

# A run's final/ keeps its chain in this sub-folder, not beside config.json: with peft installed,
# transformers' from_pretrained would load an adapter_config.json found there onto the merged LLM.
ADAPTER_DIR = "adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PeftModel wraps the LLM as base_model (the LoRA tuner) -> model (the LLM).
KEY_PREFIX = "base_model.model."
# Every projection of a Llama decoder layer (attention and MLP).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# module name -> (A [r, in], B [out, r] with the scale folded in), fp32 on the CPU
Chain = dict[str, tuple[torch.Tensor, torch.Tensor]]


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every PEFT LoRA layer inside `module`."""
    from peft.tuners.lora import LoraLayer

    return [(name, child) for name, child in module.named_modules() if isinstance(child, LoraLayer)]


def add_lora(module: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Give every linear layer of `module` named by `targets` a trainable LoRA adapter (PEFT's
    initialisation: B = 0, so training starts from the unchanged module) and freeze the rest of
    `module`; returns the adapted layers' names. PEFT raises when no layer matches."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    inject_adapter_in_model(config, module)
    return [name for name, _ in lora_layers(module)]


def adapters(module: nn.Module) -> Chain:
    """The trained updates of `module`'s adapters, scale folded into B, on the CPU like a chain
    read from a file, whatever device the model trains on."""
    chain = {}
    for name, layer in lora_layers(module):
        (adapter,) = layer.lora_A  # the one adapter `add_lora` injected
        a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
        chain[name] = (a.float().cpu(), (b * layer.scaling[adapter]).float().cpu())
    return chain


def merge_lora(module: nn.Module) -> None:
    """Merge each adapter into its layer with PEFT's `merge` and put the plain layer back: what
    `merge_and_unload` does, for adapters injected without a PeftModel around the module."""
    for name, layer in lora_layers(module):
        layer.merge()
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config


def concat_adapters(first: Chain, second: Chain) -> Chain:
    """The chain equivalent to applying `first` then `second` (ranks add up)."""
    out = dict(first)
    for name, (a, b) in second.items():
        out[name] = (torch.cat([out[name][0], a]), torch.cat([out[name][1], b], dim=1)) if name in out else (a, b)
    return out


def save_adapters(
    chain: Chain, folder: str | Path, dtype: torch.dtype = torch.float32, task_type: str | None = "CAUSAL_LM"
) -> Path:
    """Write `chain` as a PEFT LoRA adapter folder (lora_alpha = r: the scale is folded in). The
    task type makes `PeftModel.from_pretrained` return a PeftModelForCausalLM, with `generate`."""
    from peft import LoraConfig

    ranks = {a.shape[0] for a, _ in chain.values()}
    if len(ranks) != 1:
        raise ValueError(f"a chain needs one rank for all its layers, got {sorted(ranks)}")
    (rank,) = ranks
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name in chain})
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, task_type=task_type)
    config.save_pretrained(str(folder))
    tensors = {}
    for name, (a, b) in chain.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def load_adapters(folder: str | Path) -> Chain:
    """A PEFT LoRA adapter folder as a chain (its scale lora_alpha / r folded into B, fp32)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: only plain LoRA adapters (one rank and alpha) chain")
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / WEIGHTS_FILE))
    chain = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(KEY_PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            chain[name] = (a.float(), b.float() * scale)
    return chain


def merge_adapter_folder(llm: nn.Module, folder: str | Path) -> int:
    """Merge a saved adapter into `llm`'s weights, in place, the way PEFT users do:
    `PeftModel.from_pretrained`, then `merge_and_unload`. Returns how many layers changed. PEFT
    refuses shapes that do not fit but skips saved layers that it did not adapt, so the two sets
    of layers are compared first."""
    from peft import PeftModel

    folder = Path(folder)
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as handle:
        saved = {key.removeprefix(KEY_PREFIX).split(".lora_")[0] for key in handle.keys()}
    peft_model = PeftModel.from_pretrained(llm, str(folder))
    adapted = {name for name, _ in lora_layers(llm)}
    if adapted != saved:
        peft_model.unload()
        raise ValueError(f"{folder}: adapters of {sorted(saved - adapted)[:3]} find no layer; layers {sorted(adapted - saved)[:3]} have no adapter")
    peft_model.merge_and_unload()
    return len(saved)
