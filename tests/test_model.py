"""DragonflyForConditionalGeneration on tiny random configs: encoding, scatter, training forward,
generation with the KV cache, text-only turns and save/load in our format."""

import pytest
import torch
from safetensors import safe_open
from torch.nn import functional as F
from transformers import CLIPVisionConfig, LlamaConfig

from dragonfly_med.model.configuration_dragonfly import (
    DragonflyConfig,
    named_geometry,
    released_v2_geometry,
)
from dragonfly_med.model.efficientnet_lite import EfficientNetLite0Config
from dragonfly_med.model.geometry import Geometry, plan_crops
from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration

IMAGE, SEP, PAD, EOS = 5, 6, 0, 2
VOCAB = 120


def tiny_clip_model(
    feature_grid: int = 8, pooled_grid: int = 2, seed: int = 0
) -> DragonflyForConditionalGeneration:
    torch.manual_seed(seed)
    patch = 7
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=feature_grid * patch, patch_size=patch)  # fmt: skip
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD)  # fmt: skip
    geometry = Geometry(feature_grid * patch, feature_grid, pooled_grid, cls_token=True)
    config = DragonflyConfig(vision_config=vision, text_config=text, geometry=geometry.to_dict(),
                             image_token_id=IMAGE, separator_token_id=SEP, eos_token_ids=[EOS])  # fmt: skip
    return DragonflyForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_clip_model()


def image_block(model, n_crops: int) -> list[int]:
    """Placeholders + one separator per crop, as the processor writes them."""
    g = model.config.get_geometry()
    ids = [IMAGE] * g.low_tokens + [SEP]
    return ids + ([IMAGE] * g.pooled_tokens + [SEP]) * (n_crops - 1)


def pixels(n_crops: int, size: int = 56, seed: int = 1) -> torch.Tensor:
    return torch.randn(n_crops, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_config_geometry_derived_from_towers():
    released = released_v2_geometry(CLIPVisionConfig(image_size=336, patch_size=14))
    assert (
        released.crop_size,
        released.feature_grid,
        released.pooled_grid,
        released.cls_token,
    ) == (336, 24, 6, True)
    assert plan_crops(1920, 1080, released).budget.image_positions == 2098
    assert named_geometry("dragonfly-med-v2") == released
    tiny = DragonflyConfig(
        vision_config=EfficientNetLite0Config(), text_config={"model_type": "llama"}
    ).get_geometry()
    assert (tiny.crop_size, tiny.feature_grid, tiny.pooled_grid, tiny.cls_token) == (
        224,
        7,
        2,
        False,
    )
    assert named_geometry("tiny") == tiny


def test_pool_before_projector_equals_pool_after(model):
    pv = pixels(5 + 3)
    before = model.encode_images(pv, [5, 3])
    after = model.encode_images_pool_after(pv, [5, 3])
    g = model.config.get_geometry()
    assert [e.shape[0] for e in before] == [
        g.low_tokens + 4 * g.pooled_tokens,
        g.low_tokens + 2 * g.pooled_tokens,
    ]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pool_without_cls_efficientnet_tower():
    """EfficientNet tower: no CLS, 3x3 -> 2x2 (overlapping adaptive bins) still commutes."""
    vision = EfficientNetLite0Config(image_size=96)
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=VOCAB,
    )
    torch.manual_seed(0)
    geometry = Geometry(96, vision.feature_grid, 2, cls_token=False)
    config = DragonflyConfig(
        vision_config=vision, text_config=text, geometry=geometry.to_dict(), image_token_id=IMAGE
    )
    m = DragonflyForConditionalGeneration(config).eval()
    pv = pixels(3, size=96)
    with torch.no_grad():
        before, after = m.encode_images(pv, [3])[0], m.encode_images_pool_after(pv, [3])[0]
    assert before.shape == (9 + 2 * 4, 32)
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


def test_adaptive_pool_is_kernel4_stride4_for_released_grid():
    m = tiny_clip_model(feature_grid=24, pooled_grid=6)
    features = torch.randn(2, 1 + 24 * 24, 16)
    pooled = m.pool_crops(features)
    grid = features[:, 1:].reshape(2, 24, 24, 16).permute(0, 3, 1, 2)
    expected = F.avg_pool2d(grid, kernel_size=4, stride=4).flatten(2).transpose(1, 2)
    assert pooled.shape == (2, 37, 16)
    torch.testing.assert_close(pooled[:, 0], features[:, 0])
    torch.testing.assert_close(pooled[:, 1:], expected)


def test_scatter_fills_placeholders_in_order(model):
    block = image_block(model, 3)
    ids = torch.tensor([[10, 11] + block + [12, 13]])
    embeds = model.encode_images(pixels(3), [3])
    text = model.get_input_embeddings()(ids)
    merged = model.merge_image_embeds(ids, text, embeds)
    slots = (ids[0] == IMAGE).nonzero().squeeze(1)
    torch.testing.assert_close(merged[0, slots], embeds[0])
    keep = ids[0] != IMAGE  # text and separators untouched
    torch.testing.assert_close(merged[0, keep], text[0, keep])
    with torch.no_grad():
        from_pixels = model(input_ids=ids, pixel_values=pixels(3), num_crops=[3]).logits
        from_embeds = model(input_ids=ids, image_embeds=embeds).logits
    torch.testing.assert_close(from_pixels, from_embeds)


def test_placeholder_count_mismatch_is_a_clear_error(model):
    ids = torch.tensor([image_block(model, 3)[:-5] + [12]])
    with pytest.raises(ValueError, match="placeholder tokens"):
        model(input_ids=ids, pixel_values=pixels(3), num_crops=[3])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="num_crops"):
        model.encode_images(pixels(3), [2])


def test_training_forward_batch2_right_padding_matches_unbatched(model):
    a = image_block(model, 3) + [20, 21, 22, 23, EOS]
    b = image_block(model, 2) + [30, 31, EOS]
    width = len(a)
    ids = torch.full((2, width), PAD)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate((a, b)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    labels = torch.where((mask == 1) & (ids != IMAGE) & (ids != SEP), ids, -100)
    pv = torch.cat([pixels(3, seed=1), pixels(2, seed=2)])
    model.train()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pv,
        num_crops=torch.tensor([3, 2]),
        labels=labels,
    )
    out.loss.backward()
    model.eval()
    assert torch.isfinite(out.loss)
    assert (
        model.vision_embed_tokens.weight.grad is not None
        and model.vision_embed_tokens.weight.grad.abs().sum() > 0
    )
    assert model.image_encoder.embeddings.patch_embedding.weight.grad is not None
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for row, (seq, crops, seed) in enumerate(((a, 3, 1), (b, 2, 2))):
            single = model(
                input_ids=torch.tensor([seq]),
                pixel_values=pixels(crops, seed=seed),
                num_crops=[crops],
            ).logits
            torch.testing.assert_close(
                out.logits[row, : len(seq)].detach(), single[0], atol=1e-4, rtol=1e-4
            )


def test_gradient_checkpointing_trains(model):
    model.activation_checkpointing_enable()
    try:
        model.train()
        ids = torch.tensor([image_block(model, 2) + [20, 21, EOS]])
        out = model(
            input_ids=ids,
            pixel_values=pixels(2),
            num_crops=[2],
            labels=ids.masked_fill(ids == IMAGE, -100),
        )
        out.loss.backward()
        assert model.language_model.model.layers[0].mlp.up_proj.weight.grad is not None
    finally:
        model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()


def greedy(model, ids, mask=None, **images):
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, pad_token_id=PAD, **images)  # fmt: skip
    return out[:, ids.shape[1] :]


def test_generate_left_padding_equals_unbatched(model):
    a = image_block(model, 3) + [20, 21, 22, 23]
    b = image_block(model, 2) + [30, 31]
    pa, pb = pixels(3, seed=1), pixels(2, seed=2)
    width = len(a)
    ids = torch.full((2, width), PAD)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate((a, b)):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    batched = greedy(model, ids, mask, pixel_values=torch.cat([pa, pb]), num_crops=[3, 2])
    single_a = greedy(model, torch.tensor([a]), pixel_values=pa, num_crops=[3])
    single_b = greedy(model, torch.tensor([b]), pixel_values=pb, num_crops=[2])
    assert batched[0].tolist() == single_a[0].tolist()
    assert batched[1].tolist() == single_b[0].tolist()
    # Precomputed image embeddings (the chat engine's cache) give the same tokens.
    cached = greedy(model, torch.tensor([a]), image_embeds=model.encode_images(pa, [3]))
    assert cached.tolist() == single_a.tolist()


def test_generate_kv_cache_matches_no_cache(model):
    ids = torch.tensor([image_block(model, 2) + [20, 21]])
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels(2), num_crops=[2],
                  max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=PAD)  # fmt: skip
    assert (
        model.generate(**common, use_cache=True).tolist()
        == model.generate(**common, use_cache=False).tolist()
    )


def test_text_only(model):
    ids = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        direct = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(logits, direct)
    assert greedy(model, ids).shape == (1, 6)


def test_save_load_round_trip_our_format(model, tmp_path):
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {
        "image_encoder",
        "vision_embed_tokens",
        "language_model",
    }
    loaded = DragonflyForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.get_geometry() == model.config.get_geometry()
    assert (loaded.config.image_token_id, loaded.config.separator_token_id) == (IMAGE, SEP)
    assert loaded.generation_config.eos_token_id == [EOS]
    ids = torch.tensor([image_block(model, 2) + [20]])
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels(2), num_crops=[2]).logits
        actual = loaded(input_ids=ids, pixel_values=pixels(2), num_crops=[2]).logits
    torch.testing.assert_close(actual, expected)


def test_low_view_only_image(model):
    """An image encoded at the low level only (the paper's L ablation) has no pooled crops."""
    embeds = model.encode_images(pixels(1 + 2), [1, 2])
    g = model.config.get_geometry()
    assert [e.shape[0] for e in embeds] == [g.low_tokens, g.low_tokens + g.pooled_tokens]


def test_second_turn_reuses_kv_cache_without_the_tower(model, monkeypatch):
    """Turn 2 continues from turn 1's cache: same tokens as a fresh run, vision tower not called."""
    pv = pixels(2)
    turn1 = torch.tensor([image_block(model, 2) + [20, 21]])
    common = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD)
    out1 = model.generate(
        input_ids=turn1, pixel_values=pv, num_crops=[2], return_dict_in_generate=True, **common
    )
    turn2 = torch.cat([out1.sequences, torch.tensor([[30, 31]])], dim=1)
    fresh = model.generate(input_ids=turn2, pixel_values=pv, num_crops=[2], **common)
    calls = []
    monkeypatch.setattr(model.image_encoder, "forward", lambda *a, **k: calls.append(1))
    reused = model.generate(
        input_ids=turn2, cache=out1.cache, pixel_values=pv, num_crops=[2], **common
    )
    assert reused.tolist() == fresh.tolist()
    assert calls == []


def test_config_round_trip_keeps_tower_type(tmp_path):
    text = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=VOCAB)
    config = DragonflyConfig(vision_config=EfficientNetLite0Config(), text_config=text, image_token_id=IMAGE,
                             separator_token_id=SEP, prompt_format="chatml", eos_token_ids=[EOS])  # fmt: skip
    config.save_pretrained(tmp_path)
    loaded = DragonflyConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.vision_config, EfficientNetLite0Config)
    assert loaded.vision_config.image_mean == config.vision_config.image_mean
    assert loaded.get_geometry() == config.get_geometry()
    assert (loaded.prompt_format, loaded.eos_token_ids, loaded.separator_token_id) == (
        "chatml",
        [EOS],
        SEP,
    )
    with pytest.raises((ValueError, TypeError)):
        DragonflyConfig(text_config=text, prompt_format="vicuna")
