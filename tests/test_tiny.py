"""The embedded default: EfficientNet-Lite0 ImageNet weights and the SmolLM2-based tiny model."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dragonfly_med.model.configuration_dragonfly import named_geometry
from dragonfly_med.model.efficientnet_lite import (
    EfficientNetLite0,
    EfficientNetLite0Config,
    load_pretrained_state_dict,
)
from dragonfly_med.model.geometry import plan_crops

# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = set(range(281, 286))
# The shipped tiny model's greedy answers to the gallery, recorded by `gallery_answers` (see the
# file's "produced_by"): a change of how the assets load must leave them token for token.
GALLERY_ANSWERS = Path(__file__).with_name("tiny_gallery_answers.json")
GALLERY_TOKENS = 32
TEXT_QUESTION = "What is the capital of France?"
MODALITY_QUESTION = "What imaging modality is this?"


def gallery_answers(model, processor) -> list[dict]:
    """Greedy answers (generated token ids, eos included, and text) to the report and modality
    questions that every gallery example suggests, each in a fresh conversation, and to the
    text-only question. One CPU thread, so that the sums are the same on any core count."""
    from app.examples import REPORT, find_examples
    from dragonfly_med.chat import ChatEngine, SamplingParams
    from dragonfly_med.imaging.ingest import load_image

    engine = ChatEngine(model, processor, "tiny", cpu_threads=1)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=GALLERY_TOKENS)
    turns = [(None, None, TEXT_QUESTION)]
    for example in find_examples():
        image = load_image(example.path).image
        turns += [(example.path.name, image, question) for question in (REPORT, MODALITY_QUESTION)]
    rows = []
    for name, image, question in turns:
        conversation = engine.new_conversation(image)
        for _ in conversation.stream(question, params):
            pass
        assert conversation.last_stats.status == "ok", conversation.last_stats.error
        rows.append(
            {
                "image": name,
                "question": question,
                "token_ids": conversation.last_generated_ids,
                "text": conversation.history[-1][1],
            }
        )
    return rows


def test_efficientnet_strict_load_and_imagenet_sanity():
    skimage_data = pytest.importorskip("skimage.data")
    config = EfficientNetLite0Config()
    model = EfficientNetLite0(config).eval()
    model.load_state_dict(load_pretrained_state_dict(), strict=True)
    image = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor(config.image_mean)[:, None, None]) / torch.tensor(config.image_std)[
        :, None, None
    ]
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
        features = model.forward_features(x)
    assert CAT_CLASSES & set(top5), top5
    assert features.shape == (1, 1280, config.feature_grid, config.feature_grid) == (1, 1280, 7, 7)


def test_tiny_geometry_budget():
    g = named_geometry("tiny")
    assert (g.crop_size, g.feature_grid, g.pooled_grid, g.cls_token) == (224, 7, 2, False)
    budget = plan_crops(1024, 1024, g).budget
    assert (budget.visual_tokens, budget.image_positions) == (49 + 40 * 4, 250)


@pytest.fixture(scope="module")
def tiny():
    from dragonfly_med.checkpoints.loading import load_model

    start = time.monotonic()
    model, processor = load_model("tiny")
    return model, processor, time.monotonic() - start


@pytest.mark.slow
def test_tiny_answers_text_question(tiny):
    model, processor, _ = tiny
    assert model.config.prompt_format == "chatml"
    tokens = processor.tokenizer.convert_ids_to_tokens(
        [model.config.image_token_id, model.config.separator_token_id, *model.config.eos_token_ids]
    )
    assert tokens == ["<reponame>", "<file_sep>", "<|im_end|>"]
    assert model.language_model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    batch = processor(text="What is the capital of France?")
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = processor.decode(out[0, batch["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_tiny_encodes_an_image_and_generates(tiny):
    skimage_data = pytest.importorskip("skimage.data")
    model, processor, _ = tiny
    batch = processor(images=Image.fromarray(skimage_data.chelsea()), text="Describe the image.")
    plan = batch.plans[0]
    assert batch["pixel_values"].shape == (plan.num_crops, 3, 224, 224)
    assert (
        int((batch["input_ids"] == model.config.image_token_id).sum()) == plan.budget.visual_tokens
    )
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


@pytest.mark.slow
def test_shipped_tiny_names_the_modality_of_the_gallery_images(tiny):
    """The trained assets at work, on the app's example images. These images are training
    sources of offline-med, so this checks that the shipped projector and adapters are the
    trained ones and load right; held-out scores are in docs/tiny-default.md."""
    from app.examples import find_examples
    from dragonfly_med.chat import ChatEngine, SamplingParams
    from dragonfly_med.imaging.ingest import load_image

    model, processor, _ = tiny
    engine = ChatEngine(model, processor, "tiny")
    expected = {"CT_small.dcm": ("ct",), "MR_small.dcm": ("mri",), "ihc.png": ("histology", "immunohistochemistry"), "retina.jpg": ("fundus",)}
    examples = {e.path.name: e for e in find_examples() if e.path.name in expected}
    assert examples, "no gallery image found"
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=16)  # "This is a fundus photograph."
    for name, example in examples.items():
        answer = engine.answer(load_image(example.path).image, "What imaging modality is this?", params)
        assert any(word in answer.lower() for word in expected[name]), (name, answer)


@pytest.mark.slow
def test_shipped_tiny_gives_the_recorded_gallery_answers(tiny):
    """Token for token what the shipped assets answered when they were recorded
    (scripts/record_gallery_answers.py, run when new assets ship), whatever code loads them."""
    model, processor, _ = tiny
    recorded = json.loads(GALLERY_ANSWERS.read_text())["answers"]
    answers = gallery_answers(model, processor)
    assert [(a["image"], a["question"]) for a in answers] == [
        (r["image"], r["question"]) for r in recorded
    ]
    for answer, expected in zip(answers, recorded, strict=True):
        assert answer == expected, (answer, expected)
