"""Reading checkpoints in the released Dragonfly v2 layout, and converting them to ours.

A released directory (released-checkpoint.md) has a `config.json` with `model_type: dragonfly`,
a Llama `text_config` and `image_encoder: "openai/clip-vit-large-patch14-336"` (a hub id, not a
config), pickle `.bin` shards whose keys are `language_model.* / image_encoder.vision_model.* /
vision_embed_tokens.*`, the Llama-3.1 tokenizer and a plain CLIP `preprocessor_config.json`. Our
`DragonflyConfig` is derived from it without the hub: the CLIP config comes from a table of known
towers, the geometry from that CLIP config, the token ids from the checkpoint's own tokenizer. The
weights then load key for key (the CLIP tower's `vision_model.` level is mapped by transformers).
The text config is used AS SHIPPED: v2 inference ran without Llama-3.1 RoPE scaling.

Command line: `python -m dragonfly_med convert SRC_DIR OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from dragonfly_med.model.configuration_dragonfly import (
    KNOWN_VISION_TOWERS,
    RELEASED_VISION_TOWER,
    DragonflyConfig,
    released_v2_geometry,
)
from dragonfly_med.model.image_processing_dragonfly import CLIP_MEAN, CLIP_STD

IMAGE_TOKEN = "<|reserved_special_token_0|>"
SEPARATOR_TOKEN = "<|reserved_special_token_1|>"
EOS_TOKEN = "<|eot_id|>"
# Llama-3 ids of the three tokens above, used only when a checkpoint ships no tokenizer.
LLAMA3_FALLBACK_IDS = {IMAGE_TOKEN: 128002, SEPARATOR_TOKEN: 128003, EOS_TOKEN: 128009}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def read_config_json(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_released_layout(directory: str | Path) -> bool:
    """A Dragonfly config written by the release (an `image_encoder` id, no `geometry`)."""
    raw = read_config_json(directory)
    return raw.get("model_type") == "dragonfly" and "geometry" not in raw and "image_encoder" in raw


def released_vision_config(raw: dict, directory: str | Path = ".") -> CLIPVisionConfig:
    """The CLIP config of a released checkpoint: an explicit `vision_config` if the file has one,
    else the `config.json` of a local `image_encoder` directory (absolute, or relative to the
    checkpoint), else the public values of a known `image_encoder` hub name."""
    if isinstance(raw.get("vision_config"), dict):
        return CLIPVisionConfig(**raw["vision_config"])
    name = raw.get("image_encoder", RELEASED_VISION_TOWER)
    local = Path(directory) / name
    if (local / "config.json").is_file():
        return local_clip_vision_config(local)
    if name not in KNOWN_VISION_TOWERS:
        raise ValueError(
            f"unknown image_encoder {name!r}: not a local directory with a config.json and not a known hub name; "
            f"point it at a local CLIP directory or add its CLIP vision config to config.json as `vision_config` "
            f"(known: {', '.join(KNOWN_VISION_TOWERS)})"
        )
    return CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])


def local_clip_vision_config(directory: Path) -> CLIPVisionConfig:
    """The vision part of a local CLIP directory's config.json (a full CLIP model's
    `vision_config`, or a vision-only config)."""
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") == "clip" and isinstance(raw.get("vision_config"), dict):
        return CLIPVisionConfig(**raw["vision_config"])
    if raw.get("model_type") == "clip_vision_model":
        return CLIPVisionConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    raise ValueError(
        f"image_encoder directory {directory} holds a {raw.get('model_type')!r} config; expected a CLIP model "
        "('clip' with a vision_config, or 'clip_vision_model')"
    )


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES[:2])


def no_tokenizer_message(directory: str | Path) -> str:
    return (
        f"{directory} ships no tokenizer (no tokenizer.json or tokenizer_config.json): copy the "
        "Llama-3.1-8B-Instruct tokenizer files into it (the release's own tokenizer, with its "
        "<|reserved_special_token_0|> image placeholder)"
    )


def released_token_ids(directory: str | Path) -> dict[str, int]:
    """Ids of the placeholder, separator and eos tokens, read from the checkpoint's tokenizer."""
    directory = Path(directory)
    if not has_tokenizer(directory):
        return dict(LLAMA3_FALLBACK_IDS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = dict(
        zip(
            LLAMA3_FALLBACK_IDS,
            tokenizer.convert_tokens_to_ids(list(LLAMA3_FALLBACK_IDS)),
            strict=True,
        )
    )
    missing = [token for token, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(
            f"the tokenizer in {directory} lacks {missing}; is this a Llama-3 Dragonfly checkpoint?"
        )
    return ids


def released_config(directory: str | Path) -> DragonflyConfig:
    """Our `DragonflyConfig` for a released-layout directory."""
    raw = read_config_json(directory)
    if "text_config" not in raw:
        raise ValueError(
            f"{directory}/config.json has no text_config; not a released Dragonfly v2 checkpoint"
        )
    vision_config = released_vision_config(raw, directory)
    ids = released_token_ids(directory)
    return DragonflyConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(**raw["text_config"]),
        geometry=released_v2_geometry(vision_config).to_dict(),
        image_token_id=ids[IMAGE_TOKEN],
        separator_token_id=ids[SEPARATOR_TOKEN],
        eos_token_ids=[ids[EOS_TOKEN]],
        prompt_format="llama3-dragonfly",
        vision_feature_layer=-2,
        dtype=raw.get("dtype", raw.get("torch_dtype")),
    )


def load_released(directory: str | Path, **from_pretrained_kwargs):
    """The model of a released-layout directory; kwargs go to `from_pretrained` (dtype,
    quantization_config, device_map)."""
    from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration

    config = released_config(directory)
    model = DragonflyForConditionalGeneration.from_pretrained(
        directory, config=config, **from_pretrained_kwargs
    )
    model.generation_config.eos_token_id = list(
        config.eos_token_ids
    )  # the shipped file names 128001
    return model


def convert(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Released layout -> our format (safetensors, `DragonflyConfig`, tokenizer, processor files)."""
    from transformers import AutoTokenizer

    from dragonfly_med.model.image_processing_dragonfly import DragonflyImageProcessor

    src, out = Path(src), Path(out)
    if not is_released_layout(src):
        raise ValueError(
            f"{src} is not a released Dragonfly directory (config.json with model_type 'dragonfly' and image_encoder)"
        )
    model = load_released(src, dtype=dtype or "auto")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.save_pretrained(out)
    DragonflyImageProcessor.from_model_dir(src, model.config).save_pretrained(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="directory in the released v2 layout (config.json, .bin shards, tokenizer)"
    )
    parser.add_argument("out", help="output directory (our safetensors format)")
    parser.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto"
    )


def run(args: argparse.Namespace) -> int:
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    out = convert(args.src, args.out, dtype=dtype)
    print(f"converted {args.src} -> {out}")
    return 0


# ---- test helper: a tiny random checkpoint in exactly the released layout -----------------------


def _byte_level_tokenizer(special_tokens: list[str]):
    """A 256-byte BPE tokenizer (no merges) with Llama-3's special tokens: enough to exercise the
    released prompt layout without the real (licensed) vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token=EOS_TOKEN
    )
    tokenizer.add_special_tokens({"extra_special_tokens": special_tokens})
    return tokenizer


def save_tiny_released_checkpoint(
    path: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0
) -> Path:
    """Write a tiny RANDOM Dragonfly (4-layer CLIP at 56 px, 2-layer Llama) in the released v2
    layout: released-style config.json, two pickle `.bin` shards + index, tokenizer files, CLIP
    `preprocessor_config.json` and `processor_config.json`. With `tokenizer_dir` (e.g. the real
    Llama-3.1 tokenizer) its files are copied; otherwise a byte-level tokenizer with the Llama-3
    special tokens is written. Geometry: 56 px crops, patch 7 -> 8x8 grid pooled to 2x2."""
    from transformers import AutoTokenizer

    from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, path / name)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        tokenizer = _byte_level_tokenizer(
            [
                SEPARATOR_TOKEN,
                IMAGE_TOKEN,
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|end_of_text|>",
            ]
        )
        tokenizer.save_pretrained(path)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  image_size=56, patch_size=7, hidden_act="quick_gelu", projection_dim=16)  # fmt: skip
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tokenizer), max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(seed)
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, SEPARATOR_TOKEN, EOS_TOKEN])
    config = DragonflyConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        geometry=released_v2_geometry(CLIPVisionConfig(**vision)).to_dict(),
        image_token_id=ids[0],
        separator_token_id=ids[1],
        eos_token_ids=[ids[2]],
    )
    model = DragonflyForConditionalGeneration(config)
    state = {
        (
            k.replace("image_encoder.", "image_encoder.vision_model.", 1)
            if k.startswith("image_encoder.")
            else k
        ): v.to(torch.bfloat16)
        for k, v in model.state_dict().items()
    }
    shards = [{k: v for k, v in state.items() if k.startswith("language_model.")}]
    shards.append({k: v for k, v in state.items() if not k.startswith("language_model.")})
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    released = {
        "architectures": ["DragonflyForCausalLM"],
        "model_type": "dragonfly",
        "image_encoder": "tiny-random/clip-vit-56",
        "vision_config": vision,
        "text_pretrained_model_name_or_path": "tiny-random/llama",
        "text_config": {**text, "model_type": "llama", "architectures": ["LlamaForCausalLM"]},
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(released, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"]})
    )
    size = vision["image_size"]
    (path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD), "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
    }, indent=2))  # fmt: skip
    (path / "processor_config.json").write_text(
        json.dumps({"image_encoding_style": "llava-hd"}, indent=2)
    )
    return path
