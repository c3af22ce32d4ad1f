"""Assemble the starting point of general stage 1: a Llama LLM + a CLIP tower + a new projector.

    python -m training assemble --llm DIR_OR_ID --vision DIR_OR_ID --output runs/dragonfly-base

The paper starts from Llama-3.1-8B-Instruct and CLIP ViT-L/14@336 (section 4.1); both are
gated or large downloads, so they are read from local folders (or hub ids where the hub is
reachable). The result is a Dragonfly folder in our format, with the released prompt layout
(Llama-3 headers, `<|reserved_special_token_0|>` placeholders, `<|reserved_special_token_1|>`
separators, stop on `<|eot_id|>`) and the geometry derived from the tower. The LLM's config is
kept whole, RoPE scaling included: the release dropped Llama-3.1's rope_scaling after stage 1,
so stage 2 and inference ran with another positional encoding than stage 1; here every stage
inherits the config this command writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGE_TOKEN = "<|reserved_special_token_0|>"
SEPARATOR_TOKEN = "<|reserved_special_token_1|>"
EOS_TOKEN = "<|eot_id|>"


def assemble(llm: str, vision: str, output: Path, seed: int = 0) -> Path:
    """Write a Dragonfly model (projector freshly initialised with `seed`) and its processor."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    from dragonfly_med.model.configuration_dragonfly import DragonflyConfig
    from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration
    from dragonfly_med.model.processing_dragonfly import DragonflyProcessor

    tokenizer = AutoTokenizer.from_pretrained(llm)
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, SEPARATOR_TOKEN, EOS_TOKEN])
    if None in ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise ValueError(f"{llm}'s tokenizer lacks {IMAGE_TOKEN}, {SEPARATOR_TOKEN} or {EOS_TOKEN} (a Llama-3 tokenizer has them)")
    tower = CLIPVisionModel.from_pretrained(vision, dtype=torch.float32)
    config = DragonflyConfig(
        vision_config=tower.config,
        text_config=AutoConfig.from_pretrained(llm),
        image_token_id=ids[0],
        separator_token_id=ids[1],
        eos_token_ids=[ids[2]],
        prompt_format="llama3-dragonfly",
    )
    torch.manual_seed(seed)
    model = DragonflyForConditionalGeneration(config)
    model.image_encoder.load_state_dict(tower.state_dict(), strict=True)
    model.language_model.load_state_dict(LlamaForCausalLM.from_pretrained(llm, dtype=torch.float32).state_dict(), strict=True)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    DragonflyProcessor.from_model_config(config, tokenizer).save_pretrained(output)
    (output / "README.md").write_text(
        f"# Dragonfly base (untrained projector)\n\nLLM `{llm}`, vision tower `{vision}`, projector initialised "
        f"with seed {seed}. The starting point of `general-stage1`; not meant for answering questions.\n"
    )
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", required=True, help="Llama folder or hub id (paper: meta-llama/Llama-3.1-8B-Instruct)")
    parser.add_argument("--vision", required=True, help="CLIP folder or hub id (paper: openai/clip-vit-large-patch14-336)")
    parser.add_argument("--output", type=Path, default=Path("runs/dragonfly-base"))
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    path = assemble(args.llm, args.vision, args.output, args.seed)
    print(json.dumps({"output": str(path)}))
    return 0
