"""`python -m training convert-adapters OLD NEW`: LoRA adapters of the hand-written format, as
the PEFT adapter folder that training and the tiny model now read.

Runs trained before LoRA went through PEFT hold final/lora.safetensors: keys `<module>.lora_A`
[r, in] and `<module>.lora_B` [out, r], module names relative to the LLM, the scale alpha / r
already folded into B, stages concatenated along the rank. That is a chain as
`dragonfly_med.checkpoints.lora` holds it, so converting is renaming; the dtype stays. A later stage can then
chain on, and reproduce-tiny export it:

    python -m training convert-adapters runs/x/stage2/final/lora.safetensors runs/x/stage2/final/adapter

assets/tiny/ was converted so, once (`... assets/tiny/lora.safetensors assets/tiny`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

LEGACY_FILE = "lora.safetensors"


def require_converted(folder: Path) -> None:
    """Refuse a model folder whose adapters are still in the old format: chaining on from it, or
    exporting it, would silently leave them out."""
    from dragonfly_med.checkpoints.lora import ADAPTER_DIR

    legacy, adapter = folder / LEGACY_FILE, folder / ADAPTER_DIR
    if legacy.is_file() and not adapter.is_dir():
        raise FileNotFoundError(
            f"{legacy} holds adapters in the format used before PEFT; convert them first: "
            f"python -m training convert-adapters {legacy} {adapter}"
        )


def convert(legacy: Path, folder: Path) -> Path:
    """Write the adapters of `legacy` (a lora.safetensors) as a PEFT folder; returns it."""
    from safetensors.torch import load_file

    from dragonfly_med.checkpoints.lora import save_adapters

    tensors = load_file(str(legacy))
    chain = {
        key.removesuffix(".lora_A"): (a, tensors[key.removesuffix("_A") + "_B"])
        for key, a in tensors.items()
        if key.endswith(".lora_A")
    }
    if not chain or 2 * len(chain) != len(tensors):
        raise ValueError(f"{legacy} is not a lora.safetensors of A / B pairs: {sorted(tensors)[:4]}")
    (dtype,) = {t.dtype for t in tensors.values()}
    return save_adapters(chain, folder, dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("legacy", type=Path, help=f"a {LEGACY_FILE} of the old format")
    parser.add_argument("folder", type=Path, help="where adapter_config.json and adapter_model.safetensors go")


def run(args: argparse.Namespace) -> int:
    folder = convert(args.legacy, args.folder)
    print(f"[convert-adapters] {args.legacy} -> {folder}")
    return 0
