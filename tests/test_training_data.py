"""Data: converters on fixture files written in each benchmark's official layout, readers,
seeded mixtures with interleaved text-only steps, and dedup."""

import gzip
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.__main__ import main
from training.benchmarks.convert import convert, report_section
from training.benchmarks.dedup import dedup
from training.engine.mixture import build_mixture, join_per_image, plan_steps
from training.engine.recipe import DatasetSpec, load_recipe
from training.engine.records import Record, read_records


def image(path, size=(8, 6), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def load_split(out, split):
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def check_images_resolve(out, rows):
    for row in rows:
        assert (out / row["image"]).exists(), row


def test_vqa_rad(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    image(src / "VQA_RAD Image Folder" / "synpic1.jpg")
    rows = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "No", "answer_type": "CLOSED", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "What organ?", "answer": "brain", "answer_type": "OPEN ", "phrase_type": "test_para"},
        {"qid": 3, "image_name": "synpic1.jpg", "question": "How many?", "answer": 2, "answer_type": "OPEN", "phrase_type": "test_freeform"},
    ]
    src.mkdir(exist_ok=True)
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    assert convert("vqa-rad", src, out) == {"train": 1, "test": 2}
    train, test = load_split(out, "train"), load_split(out, "test")
    assert train[0]["answer_type"] == "closed" and train[0]["conversations"][1]["value"] == "No"
    assert train[0]["conversations"][0]["value"] == "<image>\nIs there a fracture?"
    assert [r["answer_type"] for r in test] == ["open", "open"] and test[1]["conversations"][1]["value"] == "2"
    check_images_resolve(out, train + test)
    records = read_records(out / "test.jsonl", out)
    assert records[0].turns == [("What organ?", "brain")] and records[0].image.exists()


def test_slake_keeps_english_only(tmp_path):
    src, out = tmp_path / "Slake1.0", tmp_path / "out"
    image(src / "imgs" / "xmlab1" / "source.jpg")
    base = {"img_name": "xmlab1/source.jpg", "answer_type": "CLOSED"}
    (src / "train.json").write_text(json.dumps([
        base | {"qid": 1, "question": "Is this a CT?", "answer": "Yes", "q_lang": "en"},
        base | {"qid": 2, "question": "这是CT吗?", "answer": "是", "q_lang": "zh"},
    ]))
    (src / "test.json").write_text(json.dumps([base | {"qid": 3, "question": "Which organ?", "answer": "Lung", "q_lang": "en", "answer_type": "OPEN"}]))
    assert convert("slake", src, out) == {"train": 1, "test": 1}
    assert load_split(out, "test")[0]["answer_type"] == "open"
    check_images_resolve(out, load_split(out, "train"))


def test_path_vqa_pickles(tmp_path):
    src, out = tmp_path / "split", tmp_path / "out"
    image(src / "images" / "train" / "train_0001.jpg")
    image(src / "images" / "test" / "test_0001.jpg")
    for name, rows in {
        "train": [{"image": "train_0001", "question": "Is this necrosis?", "answer": "yes"}],
        "test": [{"image": "test_0001", "question": "What is shown?", "answer": "granuloma"}],
    }.items():
        (src / "qas" / name).mkdir(parents=True)
        (src / "qas" / name / f"{name}_qa.pkl").write_bytes(pickle.dumps(rows))
    assert convert("path-vqa", src, out) == {"train": 1, "test": 1}
    assert load_split(out, "train")[0]["answer_type"] == "closed"
    assert load_split(out, "test")[0]["answer_type"] == "open"
    check_images_resolve(out, load_split(out, "test"))


@pytest.mark.parametrize(("name", "folder"), [("iu-xray", "iu_xray_images"), ("peir-gross", "peir_gross_images")])
def test_biocaption_layouts(tmp_path, name, folder):
    src, out = tmp_path / "src", tmp_path / "out"
    image(src / folder / "a.png")
    image(src / folder / "b.png")
    (src / "train_images.tsv").write_text("a.png\tNo acute   cardiopulmonary abnormality.\n")
    (src / "test_images.tsv").write_text("b.png\tHeart size normal.\n")
    assert convert(name, src, out) == {"train": 1, "test": 1}
    row = load_split(out, "train")[0]
    assert row["conversations"][1]["value"] == "No acute cardiopulmonary abnormality."
    check_images_resolve(out, [row])


def test_roco(tmp_path):
    src, out = tmp_path / "data", tmp_path / "out"
    folder = src / "test" / "radiology"
    image(folder / "images" / "PMC1_fig1.jpg")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captions.txt").write_text("ROCO_00001\t CT of the chest showing a mass. \nROCO_00002\t no image here\n")
    (folder / "dlinks.txt").write_text("ROCO_00001\t wget ftp://example/PMC1.tar.gz\t PMC1_fig1.jpg\n")
    assert convert("roco", src, out) == {"test": 1}
    row = load_split(out, "test")[0]
    assert row["id"] == "ROCO_00001" and row["conversations"][1]["value"] == "CT of the chest showing a mass."
    check_images_resolve(out, [row])


def test_mimic_cxr_findings_with_frontal_view(tmp_path):
    src, out = tmp_path / "mimic", tmp_path / "out"
    study = src / "files" / "p10" / "p10000032"
    image(study / "s50414267" / "d-pa.jpg")
    image(study / "s50414267" / "d-lat.jpg")
    src.mkdir(exist_ok=True)
    (src / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(
        b"dicom_id,study_id,subject_id,split\nd-pa,50414267,10000032,test\nd-lat,50414267,10000032,test\n"
    ))
    (src / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\nd-lat,10000032,50414267,LATERAL\nd-pa,10000032,50414267,PA\n"
    )
    (study / "s50414267.txt").write_text(
        "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n FINDINGS:\n There is no focal\n consolidation.\n\n IMPRESSION:\n No acute process.\n"
    )
    assert convert("mimic-cxr", src, out) == {"test": 1}
    row = load_split(out, "test")[0]
    assert row["image"].endswith("d-pa.jpg") and row["answer_type"] == "report"
    assert row["conversations"][1]["value"] == "There is no focal consolidation."
    assert report_section("IMPRESSION: ok") is None


def test_release_parquet_layout(tmp_path):
    image(tmp_path / "img" / "x.png")
    turn = "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>"
    table = pa.table({
        "image_url": ["x.png", "x.png", ""],
        "conversations": [turn.format(q="Q1", a="A1") + turn.format(q="Q2", a="A2"), None, turn.format(q="hi", a="hello")],
        "text": [None, "A chest film.", None],
        "source": ["mix", "captions", "textonly"],
    })
    pq.write_table(table, tmp_path / "part-0.parquet")
    records = read_records(tmp_path, tmp_path / "img")
    assert records[0].turns == [("Q1", "A1"), ("Q2", "A2")] and records[0].image == tmp_path / "img" / "x.png"
    assert records[1].turns[0][1] == "A chest film." and records[1].source == "captions"
    assert records[2].image is None


def test_mixture_is_seeded_weighted_and_interleaves_text(tmp_path):
    specs = [
        DatasetSpec("a", "a", weight=1.0),
        DatasetSpec("b", "b", count=4),
        DatasetSpec("text", "t", interleave_every=3),
        DatasetSpec("math", "m", interleave_every=6),
    ]
    sizes = [8, 2, 4, 3]
    steps = plan_steps(specs, sizes, seed=1, epochs=1.0, global_batch=2)
    assert steps == plan_steps(specs, sizes, seed=1, epochs=1.0, global_batch=2)
    assert steps != plan_steps(specs, sizes, seed=2, epochs=1.0, global_batch=2)
    main_refs = [r for s in steps if s.stream == -1 for r in s.refs]
    assert len(main_refs) == 12 and sorted(i for d, i in main_refs if d == 0) == list(range(8))
    assert sorted(i for d, i in main_refs if d == 1) == [0, 0, 1, 1]  # count 4 of 2: two passes
    # step s (1-based): every 6th is math (the rarer stream wins), every other 3rd is text;
    # interleaved steps are extra, so the 6 main batches end at step 8
    assert [s.stream for s in steps] == [-1, -1, 2, -1, -1, 3, -1, -1]
    assert plan_steps(specs[:2], sizes[:2], seed=1, epochs=1.5, global_batch=2)[-1].refs  # fractional epochs


def test_tiny_recipe_mixture_and_dedup(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAGONFLY_CACHE", str(tmp_path / "cache"))
    mixture = build_mixture(load_recipe("tiny-general-stage2"))
    streams = [s.stream for s in mixture.steps]
    text = mixture.names.index("tiny-text")
    assert streams[2] == text and all(r.image is None for r in mixture.records(mixture.steps[2]))
    records = mixture.datasets[0]
    kept, dropped = dedup(records + records[:3])
    assert dropped == 3 and kept == records


def test_dedup_and_check_commands(tmp_path, capsys):
    a, b = image(tmp_path / "a.png"), image(tmp_path / "copy-of-a.png")
    rows = [
        {"id": "1", "image": a.name, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "x"}]},
        {"id": "2", "image": b.name, "conversations": [{"from": "human", "value": "<image>\nwhat  is it?"}, {"from": "gpt", "value": "y"}]},
        {"id": "3", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": " "}]},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    assert main(["dedup", "--data", str(data), "--image-root", str(tmp_path), "--output", str(tmp_path / "out.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == 1
    kept = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == ["1", "3"] and kept[0]["image"] == "a.png"
    assert main(["check", "--data", str(data), "--image-root", str(tmp_path), "--no-lengths"]) == 1
    report = json.loads(capsys.readouterr().out)["datasets"][str(data)]
    assert report["missing_images"] == ["3"] and report["empty_answers"] == ["3"]


def test_zoom_stats_by_hand_and_command(tmp_path, capsys):
    from dragonfly_med.model.configuration_dragonfly import named_geometry
    from training.benchmarks.zoom_stats import quantile, summarize, zoom_ratios

    released = named_geometry("dragonfly-med-v2")
    # 640x480 -> high 6x6 of 336 px: 2016 / 640 = 3.15; 2000x800 -> 12x3: 4032 / 2000 = 2.016;
    # 600x3000 -> 3x12: 4032 / 3000 = 1.344; 8000x8000 -> 2016 / 8000 = 0.252 (not magnified)
    zooms = zoom_ratios([(640, 480), (2000, 800), (600, 3000), (8000, 8000)], released)
    assert zooms == pytest.approx([0.252, 1.344, 2.016, 3.15])
    summary = summarize(zooms)
    assert summary["share_percent"] == {"> 1x": 75.0, ">= 2x": 50.0, ">= 4x": 0.0}
    assert quantile(zooms, 0.5) == pytest.approx((1.344 + 2.016) / 2)
    rows = [{"id": str(i), "image": image(tmp_path / f"{i}.png", size).name,
             "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
            for i, size in enumerate([(640, 480), (2000, 800)])]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    png = tmp_path / "cdf.png"
    assert main(["zoom-stats", "--data", str(tmp_path / "d.json"), "--image-root", str(tmp_path), "--output", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 2 and out["share_percent"][">= 2x"] == 100.0 and png.stat().st_size > 0


def test_an_interleaved_stream_needs_records_and_room_for_the_main_data(tmp_path):
    """Either would plan forever: every step due to the stream, or a stream with nothing to give."""
    with pytest.raises(ValueError, match="interleave_every must be >= 2"):
        DatasetSpec("text", "t", interleave_every=1).validate()
    row = {"id": "1", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    (tmp_path / "main.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row | {"id": "2"}) + "\n")
    (tmp_path / "text.jsonl").write_text("")
    datasets = "[{name: main, path: main.jsonl, count: 2}, {name: text, path: text.jsonl, interleave_every: 2}]"
    recipe = load_recipe("tiny-general-stage2", [f"data_root={tmp_path}", f"datasets={datasets}", "global_batch_size=1"])
    with pytest.raises(ValueError, match=r"text\.jsonl\) has no records"):
        build_mixture(recipe)


def test_questions_about_one_image_join_into_conversations_without_losing_or_splitting_any():
    one = [Record(f"a{i}", Path("a.png"), [(f"qa{i}", f"ra{i}")]) for i in range(5)]
    chat = Record("a-chat", Path("a.png"), [("c1", "d1"), ("c2", "d2"), ("c3", "d3")])
    other = Record("b0", Path("b.png"), [("qb", "rb")])
    text = [Record(f"t{i}", None, [(f"t{i}", "x")]) for i in range(2)]
    records = one + [chat, other] + text
    joined = join_per_image(records, max_turns=4, seed=0)
    assert joined == join_per_image(records, max_turns=4, seed=0)
    assert [t for r in joined for t in r.turns] != [t for r in records for t in r.turns]  # seeded order
    assert sorted(t for r in joined for t in r.turns) == sorted(t for r in records for t in r.turns)
    assert all(len(r.turns) <= 4 for r in joined)
    holding = [r for r in joined if set(r.turns) & set(chat.turns)]
    assert len(holding) == 1 and "".join(map(str, chat.turns)) in "".join(map(str, holding[0].turns))  # never split
    for r in joined:
        ids = r.meta.get("joined", [r.id])
        assert r.id == ids[0] and {x.image for x in records if x.id in ids} == {r.image}
    assert 2 <= sum(r.image is not None and r.image.name == "a.png" for r in joined) <= 3  # 8 turns in chunks of <= 4
    assert [r for r in joined if r.image is None] == text and other in joined  # alone as they were
    with pytest.raises(ValueError, match="turns_per_image must be >= 2"):
        DatasetSpec("a", "a", count=1, turns_per_image=1).validate()
