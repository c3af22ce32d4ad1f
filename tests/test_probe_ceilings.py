"""Probe ceilings: the questions a linear read-out of the tower's features can answer, scored
on the evaluation's own records, through the feature cache the evaluation uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from offline_med_fake import random_model
from PIL import Image

from training.engine.feature_cache import FeatureCache
from training.offline_med.evaluate import read_probe_ceilings
from training.offline_med.scoring import score
from training.tiny.probe_ceilings import answer_from, as_question, probe_ceilings, write_ceilings


def record(split: str, n: int, image: str, family: str, question: str, truth: str, options: list[str] | None) -> dict:
    row = {
        "id": f"{split}-{family}-{n}",
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "..."}],
        "family": family,
        "answer_type": "closed" if options else "open",
        "truth": truth,
        "source": f"fake:{split}",
    }
    return row | ({"options": options} if options else {})


def test_questions_name_the_fact_they_ask_about():
    yes_no = ["yes", "no"]
    asked = as_question(record("t", 0, "a.png", "window", "Is this CT displayed in a soft tissue window? Answer yes or no.", "no", yes_no))
    assert (asked.task, asked.asked, asked.label) == ("window", "soft tissue", None)
    lateral = "Images follow the radiological convention: the patient's left is on the image's right. Is the point marked by the red circle on the patient's right side? Answer yes or no."
    assert as_question(record("t", 0, "a.png", "laterality", lateral, "yes", yes_no)).label == "right"
    assert as_question(record("t", 0, "a.png", "finding", "Is there a lesion? Answer yes or no.", "yes", yes_no)).task == "finding_presence"
    assert as_question(record("t", 0, "a.png", "fine_detail", "What does it say: AB1 or CD2?", "AB1", ["AB1", "CD2"])) is None
    texture = as_question(record("t", 0, "a.png", "fine_detail", "Is its inside uniform or speckled?", "speckled", ["uniform", "speckled"]))
    assert (texture.task, texture.label) == ("fine_texture", "speckled")


def test_a_probe_answers_choose_one_among_the_offered_options_and_yes_only_for_its_first_choice():
    labels = ["CT", "MRI", "X-ray"]
    scores = torch.tensor([0.1, 0.5, 0.9])
    choose = as_question(record("t", 0, "a.png", "modality", "What imaging modality is this: CT or MRI?", "MRI", ["CT", "MRI"]))
    assert answer_from(scores, labels, choose) == "MRI"  # X-ray ranks first but is not offered
    is_mri = as_question(record("t", 0, "a.png", "modality", "Is the imaging modality MRI? Answer yes or no.", "no", ["yes", "no"]))
    assert answer_from(scores, labels, is_mri) == "no"


@pytest.fixture(scope="module")
def separable_data(tmp_path_factory):
    """Bright 'CT' and dark 'MRI' images: a fact any tower's features carry."""
    root = tmp_path_factory.mktemp("probe-data")
    rng = np.random.default_rng(0)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, count in (("train", 16), ("test", 6)):
        for n in range(count):
            ct = n % 2 == 0
            image = f"images/{split}/{n:03d}.png"
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            level = 200 if ct else 40
            pixels = np.clip(level + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / image)
            truth = "CT" if ct else "MRI"
            splits[split].append(record(split, n, image, "modality", "What imaging modality is this: CT or MRI?", truth, ["CT", "MRI"]))
            asked = "MRI" if n % 3 else "CT"
            splits[split].append(
                record(split, 100 + n, image, "modality", f"Is the imaging modality {asked}? Answer yes or no.", "yes" if asked == truth else "no", ["yes", "no"])
            )
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, splits["test"]


def test_ceilings_on_a_fact_the_features_carry_and_the_json_eval_reads(separable_data, tmp_path):
    root, held_out = separable_data
    model, processor = random_model()
    result = probe_ceilings(model, processor.image_processor, root, held_out, cache=FeatureCache(tmp_path / "cache"))
    assert result["ceilings"] == {"modality": 1.0} and result["n"] == {"modality": 12}
    assert result["fine_detail_by_level"]["low+medium+high"] is None  # no fine-detail questions here
    write_ceilings(result, "test", tmp_path / "probe.json")
    ceilings = read_probe_ceilings(tmp_path / "probe.json", "test")
    rows = [r | {"reference": "...", "prediction": "This is a CT."} for r in held_out]
    block = score(rows, ceilings)["by_family"]["modality"]
    assert block["probe_ceiling"] == 1.0 and block["closed_accuracy"] < 1.0
    with pytest.raises(ValueError, match="no probe ceilings for the 'val' split"):
        read_probe_ceilings(tmp_path / "probe.json", "val")
