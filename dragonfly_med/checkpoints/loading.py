"""`load_model`: one entry point for every way a user names a model.

- `"tiny"`: the embedded default, built once into a local cache (tiny.py);
- `"tiny-base"`: the same architecture before training (packaged LLM, seeded projector);
- a directory in our format (`config.json` with a `geometry`, safetensors);
- a directory in the released v2 layout (released.py), loaded in place;
- a hub id (or the alias `dragonfly-med-v2`): fetched with huggingface_hub when the hub is
  reachable; offline it fails within seconds, saying how to point at a local directory.

Quantization (bitsandbytes nf4 / int8) applies to the LLM only: the vision tower, the projector
and the LM head stay in `dtype`, as the released model was trained with them unquantized.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import torch
from transformers import AutoTokenizer, BitsAndBytesConfig

from dragonfly_med.model.configuration_dragonfly import DragonflyConfig

HUB_ALIASES = {
    "dragonfly-med-v2": "togethercomputer/Llama-3.1-8B-Dragonfly-Med-v2",
    "dragonfly-v2": "togethercomputer/Llama-3.1-8B-Dragonfly-v2",
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_TIMEOUT_S = 8.0
UNQUANTIZED_MODULES = ["image_encoder", "vision_embed_tokens", "lm_head"]


class ModelNotAvailableError(OSError):
    """A model name that cannot be resolved to local files (typically a hub id while offline)."""


def quantization_config(
    load_in_4bit: bool = False, load_in_8bit: bool = False
) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for the LLM only (nf4 + double quant, bf16 compute; or int8)."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit")
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=UNQUANTIZED_MODULES,
        )
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    return None


def _download(repo_id: str) -> Path:
    """snapshot_download in a daemon thread with a deadline, so that a network that drops packets
    cannot hang the caller; HF_HUB_OFFLINE makes it a cache lookup only."""
    from huggingface_hub import snapshot_download

    result: dict = {}

    def fetch() -> None:
        try:
            result["path"] = snapshot_download(repo_id)
        except Exception as err:  # reported to the caller below
            result["error"] = err

    thread = threading.Thread(target=fetch, name=f"hub-download-{repo_id}", daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S)
    # A download that is making progress may take long; only a silent hub is a failure.
    if thread.is_alive() and not _partial_download_exists(repo_id):
        result["error"] = TimeoutError(f"no answer from the hub within {HUB_TIMEOUT_S:.0f} s")
    else:
        thread.join()
    if "path" in result:
        return Path(result["path"])
    raise ModelNotAvailableError(
        f"cannot fetch {repo_id!r} from the Hugging Face hub ({result.get('error')}). This machine may be "
        f"offline. Download the checkpoint where the hub is reachable (e.g. `hf download {repo_id} "
        f"--local-dir DIR`), copy DIR to this machine and pass that local directory instead: "
        "--model DIR / load_model('DIR'). "
        "A released-layout directory is read as is; `python -m dragonfly_med convert DIR OUT` makes ours."
    )


def _partial_download_exists(repo_id: str) -> bool:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    return cache.is_dir() and any(cache.iterdir())


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory for a model name: tiny cache, an existing path, or a hub snapshot."""
    name = str(name_or_path)
    if name == "tiny":
        from dragonfly_med.checkpoints.tiny import tiny_model_dir

        return tiny_model_dir()
    if name == "tiny-base":
        from dragonfly_med.checkpoints.tiny import base_model_dir

        return base_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} has no config.json; not a model directory")
        return path
    repo_id = HUB_ALIASES.get(name, name)
    if not HUB_ID.match(repo_id):
        raise ModelNotAvailableError(
            f"{name!r} is neither 'tiny', 'tiny-base', an existing directory nor a hub id (owner/name)"
        )
    return _download(repo_id)


def default_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU, unless asked otherwise."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_processor(directory: str | Path, config: DragonflyConfig):
    """The processor of a model directory: tokenizer + image processor + the prompt settings of
    the model config (prompt format, placeholder / separator / eos tokens)."""
    from dragonfly_med.checkpoints.released import has_tokenizer, no_tokenizer_message
    from dragonfly_med.model.image_processing_dragonfly import DragonflyImageProcessor
    from dragonfly_med.model.processing_dragonfly import DragonflyProcessor

    if not has_tokenizer(directory):
        raise FileNotFoundError(no_tokenizer_message(directory))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return DragonflyProcessor.from_model_config(
        config, tokenizer=tokenizer, image_processor=DragonflyImageProcessor.from_model_dir(directory, config)
    )


def load_model(
    name_or_path: str | os.PathLike = "tiny",
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
):
    """Load a Dragonfly model and its processor -> (model, processor), model in eval mode."""
    from dragonfly_med.checkpoints.released import (
        is_released_layout,
        load_released,
        read_config_json,
    )
    from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration

    directory = resolve_model_dir(name_or_path)
    model_type = read_config_json(directory).get("model_type")
    if model_type != "dragonfly":
        raise ValueError(f"{directory} holds a {model_type!r} model, not a Dragonfly one")
    quant = quantization_config(load_in_4bit, load_in_8bit)
    if device_map is None and torch.cuda.is_available():
        device_map = "cuda"
    kwargs = {"dtype": default_dtype(dtype), "device_map": device_map}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if is_released_layout(directory):
        model = load_released(directory, **kwargs)
    else:
        model = DragonflyForConditionalGeneration.from_pretrained(directory, **kwargs)
        if model.config.eos_token_ids:
            model.generation_config.eos_token_id = list(model.config.eos_token_ids)
    model.eval()
    return model, load_processor(directory, model.config)
