"""Each metric on hand-checked values (percentages, as the paper reports them)."""

import json
import shutil
from pathlib import Path

import pytest

from training.benchmarks.metrics import (
    caption_metrics,
    cider,
    closed_accuracy,
    mean_token_f1,
    normalize_answer,
    rouge_l,
    token_f1,
    vqa_metrics,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


def test_normalisation_and_closed_accuracy():
    assert normalize_answer("The  Left Lung.") == "left lung"
    # "Yes, there is ..." commits to yes; "No." to no; open references compare whole answers.
    predictions = ["Yes, there is an effusion.", "No.", "left lung", "yes"]
    references = ["yes", "yes", "Left lung", "no"]
    assert closed_accuracy(predictions, references) == pytest.approx(50.0)


def test_token_f1_by_hand():
    # pred tokens {left, lower, lobe}, ref tokens {left, lobe}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("the left lower lobe", "left lobe") == pytest.approx(0.8)
    assert token_f1("right", "left") == 0.0
    assert token_f1("", "") == 1.0
    # duplicated tokens count with multiplicity: pred {no, no}, ref {no}: P = 1/2, R = 1 -> 2/3
    assert token_f1("no no", "no") == pytest.approx(2 / 3)
    assert mean_token_f1(["the left lower lobe", "right"], ["left lobe", "left"]) == pytest.approx(40.0)


def test_vqa_metrics_split_closed_and_open():
    metrics = vqa_metrics(["yes", "liver", "no"], ["yes", "the liver", "yes"], ["closed", "open", "closed"])
    assert metrics["closed_accuracy"] == pytest.approx(50.0)
    assert metrics["token_f1"] == pytest.approx(200 / 3)
    assert metrics["open_token_f1"] == pytest.approx(100.0)


def test_rouge_l_by_hand():
    # LCS("the heart is normal", "the heart size is normal") = 4: P = 4/4, R = 4/5, F = 8/9
    assert rouge_l(["the heart is normal"], ["the heart size is normal"]) == pytest.approx(800 / 9)
    assert rouge_l(["a b"], ["c d"]) == 0.0


@needs_java
def test_cider_by_hand():
    # Two images, references "a b" and "c d" (N = 2, every reference n-gram has df = 1).
    # Image 1, candidate "a b": 1- and 2-gram vectors equal the reference's -> cos 1, 1; no 3/4-grams -> 0.
    #   CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Image 2, candidate "c e": 1-grams {c, e} vs {c, d}, all idf log 2 -> cos 1/2; 2-grams disjoint.
    #   CIDEr-D = 10 * (0.5 + 0 + 0 + 0) / 4 = 1.25.  Corpus mean 3.125 -> 312.5 %.
    assert cider(["a b", "c e"], ["a b", "c d"]) == pytest.approx(312.5)


@needs_java
def test_caption_metrics_on_exact_matches():
    same = caption_metrics(["the heart is normal in size", "no acute disease"], ["the heart is normal in size", "no acute disease"])
    assert same["meteor"] == pytest.approx(100.0)
    assert same["rouge_l"] == pytest.approx(100.0)



def write_vqa_rad(src):
    from PIL import Image

    (src / "VQA_RAD Image Folder").mkdir(parents=True)
    Image.new("RGB", (16, 12), "gray").save(src / "VQA_RAD Image Folder" / "synpic1.jpg")
    rows = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "no", "answer_type": "CLOSED", "phrase_type": "test_freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "Which lobe?", "answer": "left lobe", "answer_type": "OPEN", "phrase_type": "test_para"},
        {"qid": 3, "image_name": "synpic1.jpg", "question": "Is it normal?", "answer": "yes", "answer_type": "CLOSED", "phrase_type": "freeform"},
    ]
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))


def test_evaluate_writes_predictions_scores_and_paper_table(tmp_path):
    from training.benchmarks.evaluate import evaluate, load_split, paper_table

    write_vqa_rad(tmp_path / "src")
    records = load_split("vqa-rad", tmp_path / "src", "test")
    answers = {"Is there a fracture?": "No, there is none.", "Which lobe?": "the left lower lobe"}
    scores = evaluate("vqa-rad", records, lambda image, q: answers[q] if image is not None else "", tmp_path / "out")
    # closed: "No, there is none." commits to "no" -> 100 %. Token F1: {no, there, is, none} vs {no}:
    # P = 1/4, R = 1 -> 0.4; "the left lower lobe" vs "left lobe" -> 0.8 (see above); mean 60 %.
    assert scores["n"] == 2 and scores["metrics"]["closed_accuracy"] == 100.0
    assert scores["metrics"]["token_f1"] == pytest.approx(100 * (0.4 + 0.8) / 2, abs=0.01)
    rows = [json.loads(x) for x in Path(scores["predictions_file"]).read_text().splitlines()]
    assert set(rows[0]) == {"id", "question", "reference", "prediction", "answer_type"}
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["metrics"] == scores["metrics"]
    table = paper_table(scores)
    assert "Dragonfly-Med (paper)" in table and "78.1" in table and "61.4" in table and "100.0" in table
