"""offline-med evaluation: scores on hand-checked predictions, the per-family draw, the feature
cache against the model's own encoder for every ablation geometry, and a whole evaluation with
both baselines on a random tiny model (seconds)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace

import pytest
import torch
from offline_med_fake import random_model, write_fake_offline_med
from PIL import Image

from dragonfly_med.model.configuration_dragonfly import DragonflyConfig
from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration
from dragonfly_med.model.processing_dragonfly import DragonflyProcessor
from training.engine.feature_cache import FeatureCache
from training.offline_med.evaluate import evaluate_offline_med, load_split, subsample
from training.offline_med.scoring import score, table


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fake_offline_med(tmp_path_factory.mktemp("offline-med"))


def row(family: str, answer_type: str, reference: str, prediction: str) -> dict:
    return {
        "family": family,
        "answer_type": answer_type,
        "reference": reference,
        "prediction": prediction,
    }


def test_score_on_hand_checked_predictions():
    rows = [
        row("modality", "closed", "CT", "CT"),  # right
        row("modality", "closed", "MRI", "CT scan"),  # wrong
        row("body_region", "closed", "yes", "Yes, it is the head."),  # right: its yes/no word
        row("description", "open", "a ct of the head", "the head ct"),  # open: F1 only
    ]
    result = score(rows, probe_ceilings={"modality": 0.75})
    assert result["closed_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    modality = {"closed_accuracy": 0.5, "closed_accuracy_strict": 0.5, "token_f1": 0.5, "n": 2}
    modality |= {"n_closed": 2, "yes_rate": None, "truth_yes_rate": None, "probe_ceiling": 0.75}  # F1: 1 and 0
    assert result["by_family"]["modality"] == modality
    assert result["by_family"]["description"]["closed_accuracy"] is None  # no closed questions
    assert result["by_family"]["description"]["token_f1"] == pytest.approx(
        0.8, abs=1e-4
    )  # 2 shared of 2 / 3 tokens
    assert result["by_family"]["atlas_region"]["n"] == 0  # absent families are reported, n = 0
    assert "| **overall** (4) |" in table(result | {"baselines": {}})


def test_an_evidence_first_answer_commits_to_the_verdict_after_its_evidence():
    """"This is a CT, so no." commits to "no" although its evidence holds no yes/no word, and
    "There is no tiny dot, so yes." to "yes" (the last verdict, not the first "no"). Strict
    accuracy asks for the reference sentence; yes_rate counts committed "yes" answers."""
    yes_no = {"options": ["yes", "no"]}
    rows = [
        row("modality", "closed", "This is a CT, so no.", "This is a CT, so no.") | yes_no | {"truth": "no"},
        row("modality", "closed", "This is an MRI, so yes.", "This is a CT, so no.") | yes_no | {"truth": "yes"},
        row("fine_detail", "closed", "There is a tiny dot, so yes.", "There is no tiny dot, so yes.") | yes_no | {"truth": "yes"},
        row("modality", "closed", "This is a CT.", "This is a CT scan.") | {"options": ["CT", "MRI"], "truth": "CT"},
    ]
    block = score(rows)
    assert block["closed_accuracy"] == 0.75 and block["closed_accuracy_strict"] == 0.25
    assert block["yes_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert block["truth_yes_rate"] == pytest.approx(2 / 3, abs=1e-4)


def test_a_closed_answer_commits_to_the_one_option_it_names():
    rows = [
        row("fine_detail", "closed", "KR3", "The label says KR3.") | {"options": ["RC9", "KR3"]},
        row("fine_detail", "closed", "KR3", "RC9 or KR3") | {"options": ["RC9", "KR3"]},  # both
        row("fine_detail", "closed", "7", "It says 17.") | {"options": ["7", "3"]},  # not a word
        row("window", "closed", "soft tissue", "soft tissue window")
        | {"options": ["brain", "soft tissue"]},
    ]
    block = score(rows)
    assert block["closed_accuracy"] == 0.5 and block["closed_accuracy_strict"] == 0.0


def test_subsample_is_seeded_capped_and_prefers_closed(data_dir):
    records = load_split(data_dir, "test")
    assert all(len(r["conversations"]) == 2 for r in records)  # multi-turn left out
    picked = subsample(records, 2, seed=0)
    assert picked == subsample(records, 2, seed=0)
    counts = {f: sum(r["family"] == f for r in picked) for f in {r["family"] for r in picked}}
    assert counts == {"modality": 2, "body_region": 2, "fine_detail": 2, "description": 2}
    assert subsample(records, None, ("modality",)) == [
        r for r in records if r["family"] == "modality"
    ]


def test_subsample_draws_complementary_questions_whole():
    records = [
        {"family": "modality", "answer_type": "closed", "group": f"g{n // 2}", "id": n} for n in range(40)
    ] + [{"family": "modality", "answer_type": "closed", "id": 40 + n} for n in range(5)]
    for seed in range(5):
        picked = subsample(records, 7, seed=seed)
        assert len(picked) <= 7
        groups = Counter(r["group"] for r in picked if "group" in r)
        assert set(groups.values()) <= {2}, groups


@pytest.mark.parametrize(
    "levels", [("low",), ("low", "medium"), ("low", "high"), ("low", "medium", "high")]
)
def test_feature_cache_equals_encode_images_for_every_geometry(levels, tmp_path):
    """The ablation scores each geometry from one cached pass over all 41 crops: selecting the
    crops of `levels` and projecting must equal the variant model's own `encode_images`, from
    memory and from the on-disk copy another process (a later stage, the evaluation) reads."""
    full_model, full_processor = random_model()
    config = DragonflyConfig(
        **(
            full_model.config.to_dict()
            | {"geometry": replace(full_model.config.get_geometry(), levels=levels).to_dict()}
        )
    )
    model = DragonflyForConditionalGeneration(config).eval()
    model.load_state_dict(full_model.state_dict())
    processor = DragonflyProcessor.from_model_config(config, full_processor.tokenizer)
    image = Image.new("RGB", (80, 50), (120, 30, 200))
    image.paste((10, 250, 40), (5, 5, 30, 20))
    with torch.inference_mode():
        pixel = processor.image_processor(image)
        (expected,) = model.encode_images(pixel["pixel_values"], pixel["num_crops"])
    path = tmp_path / "image.png"
    image.save(path)
    cache = FeatureCache(tmp_path / "cache")
    found = cache.features(model, processor.image_processor, path)
    assert 1 + found.pooled.shape[0] == 41  # always the full plan, whatever the model's levels
    assert found.image_size == (80, 50)
    with torch.inference_mode():
        torch.testing.assert_close(cache.embeds(model, found, levels), expected)
    (stored,) = (tmp_path / "cache").rglob("*.safetensors")
    again = FeatureCache(tmp_path / "cache").features(model, processor.image_processor, path)
    assert (again.n_medium, again.image_size) == (found.n_medium, found.image_size)
    torch.testing.assert_close((again.low, again.pooled), (found.low, found.pooled))
    mtime = path.stat().st_mtime_ns + 10**9  # an edited image is a new entry, never a stale hit
    os.utime(path, ns=(mtime, mtime))
    FeatureCache(tmp_path / "cache").features(model, processor.image_processor, path)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2 and stored.is_file()
    written = {f: f.stat().st_mtime_ns for f in (tmp_path / "cache").rglob("*.safetensors")}
    FeatureCache(tmp_path / "cache").ensure(model, processor.image_processor, path)  # stored: untouched
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "cache").rglob("*.safetensors")} == written
    fresh = FeatureCache(tmp_path / "other")
    fresh.ensure(model, processor.image_processor, path)  # missing: computed and stored
    assert len(list((tmp_path / "other").rglob("*.safetensors"))) == 1


def test_whole_evaluation_with_baselines(data_dir, tmp_path):
    model, processor = random_model(seed=0)
    untrained = random_model(seed=1)
    result = evaluate_offline_med(
        model, processor, data_dir, per_family=2, baseline_models={"untrained_projector": untrained},
        predictions_file=tmp_path / "predictions.jsonl",
    )  # fmt: skip
    assert set(result["baselines"]) == {"no_image", "untrained_projector"}
    for block in [result, *result["baselines"].values()]:
        assert {"closed_accuracy", "token_f1", "by_family"} <= set(block)
        for value in [block["closed_accuracy"], block["token_f1"]] + [
            v
            for f in block["by_family"].values()
            for k, v in f.items()
            if k != "n" and k != "n_closed"
        ]:
            assert value is None or 0.0 <= value <= 1.0
        assert block["by_family"]["modality"]["n"] == 2
        assert block["by_family"]["fine_detail"]["n"] == 2
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * result["n"] == 3 * 8
    assert {r["system"] for r in rows} == {"model", "no_image", "untrained_projector"}


@pytest.mark.parametrize("use_image", [True, False])
def test_batched_answers_are_the_answers_given_one_at_a_time(data_dir, tmp_path, use_image):
    """Questions decoded together (left-padded, masked) get the answers each gets alone, in the
    records' order, whatever the prompt lengths in a batch."""
    from training.offline_med.evaluate import answer_all

    model, processor = random_model(seed=0)
    records = subsample(load_split(data_dir), 2)
    cache = FeatureCache(tmp_path / "cache")
    alone = answer_all(model, processor, records, data_dir, cache, use_image=use_image, batch_size=1)
    together = answer_all(model, processor, records, data_dir, cache, use_image=use_image, batch_size=5)
    assert [r["id"] for r in together] == [r["id"] for r in records]
    assert len({len(r["question"]) for r in together}) > 1  # prompts of different lengths share a batch
    assert [r["prediction"] for r in together] == [r["prediction"] for r in alone]


def test_training_cli_dispatches_offline_med_to_this_evaluator(data_dir, tmp_path, capsys):
    from offline_med_fake import random_model_dir

    from training.__main__ import main

    model = random_model_dir(tmp_path / "model")
    argv = ["eval", "--benchmark", "offline-med", "--model", str(model), "--data", str(data_dir)]
    assert main(argv + ["--per-family", "1", "--baselines", "no_image", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n") :])  # the JSON follows any library chatter
    assert result["benchmark"] == "offline-med" and set(result["baselines"]) == {"no_image"}
