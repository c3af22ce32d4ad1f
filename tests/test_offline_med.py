"""The offline medical data builder: valid records, honest splits, details that need zooming in."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.offline_med import build as offline_med
from training.offline_med import catalogue as offline_med_catalogue
from training.offline_med import sources as offline_med_sources
from training.offline_med.catalogue import invesalius_file
from training.offline_med.questions import OPEN_VARIANTS, PHRASING
from training.offline_med.render import (
    LABEL_FRACTION,
    QUADRANTS,
    TEXTURES,
    draw_label,
    draw_textured_lesion,
    upsample_canvas,
)
from training.offline_med.sources import display_slice

SPLITS = ("train", "val", "test")
DEBIAN_INSTALLED = invesalius_file() is not None and offline_med_sources.MRICRON_TEMPLATES.exists()


def read(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("offline_med")
    offline_med.build(out, seed=0, scale_name="small")
    return out


@pytest.fixture(scope="module")
def records(built) -> dict[str, list[dict]]:
    return {split: read(built, split) for split in SPLITS}


def test_every_split_has_records_and_the_manifest_counts_them(built, records):
    manifest = json.loads((built / "manifest.json").read_text())
    for split in SPLITS:
        assert records[split], split
        assert manifest["counts"][split] == dict(Counter(r["family"] for r in records[split]))
    assert {"modality", "body_region", "finding", "fine_detail"} <= set(manifest["counts"]["test"])
    assert read(built, "captions")


def test_records_are_valid_llava(built, records):
    for record in [r for split in SPLITS for r in records[split]] + read(built, "captions"):
        assert set(record) >= {"id", "image", "conversations", "source", "family", "answer_type", "split"}
        assert (built / record["image"]).is_file()
        turns = record["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        assert all(t["value"].strip() for t in turns)


def test_closed_answers_commit_to_one_of_the_options_named_in_the_question(records):
    """A closed answer is a sentence with the evidence first ("This is a CT, so no.", "This is
    a CT."); the option it commits to is its `truth`, which the evaluation finds in it."""
    from training.offline_med.scoring import committed_answer

    closed = [r for split in SPLITS for r in records[split] if r["answer_type"] == "closed"]
    assert closed
    for record in closed:
        question, answer = (t["value"] for t in record["conversations"])
        assert record["truth"] in record["options"]
        assert committed_answer(answer, record["options"]) == record["truth"], answer
        if record["options"] == ["yes", "no"]:
            assert "yes or no" in question and answer.endswith(f", so {record['truth']}.")
        else:
            assert all(option in question for option in record["options"])
            assert answer != record["truth"] and answer.endswith(".")


def test_yes_no_and_option_positions_are_balanced(records):
    for split in SPLITS:
        by_family = Counter((r["family"], r["truth"]) for r in records[split] if r.get("options") == ["yes", "no"])
        for family in {f for f, _ in by_family}:
            yes, no = by_family[(family, "yes")], by_family[(family, "no")]
            assert abs(yes - no) <= 2 + 0.1 * (yes + no), (split, family, yes, no)
    two_way = [r for r in records["train"] if r.get("options") and len(r["options"]) == 2 and r["options"] != ["yes", "no"]]
    first = sum(r["options"][0] == r["truth"] for r in two_way)
    assert 0.3 <= first / len(two_way) <= 0.7


def test_splits_share_no_source_and_no_image(records):
    sources = {split: {r["source"] for r in records[split]} for split in SPLITS}
    images = {split: {r["image"] for r in records[split]} for split in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not sources[a] & sources[b], (a, b)
        assert not images[a] & images[b], (a, b)
    for split in SPLITS:
        assert all(r["split"] == split and r["image"].startswith(f"images/{split}/") for r in records[split])


def test_build_is_deterministic_by_seed(built, tmp_path):
    offline_med.build(tmp_path, seed=0, scale_name="small")
    for name in (*SPLITS, "captions"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (built / f"{name}.jsonl").read_bytes()

    def digest(root: Path) -> str:
        files = sorted(root.glob("images/**/*.png"))
        return hashlib.sha256(b"".join(f.relative_to(root).as_posix().encode() + f.read_bytes() for f in files)).hexdigest()

    assert digest(tmp_path) == digest(built)


def low_and_high(canvas: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The model's low view (whole image squashed to 224) and high canvas (6 x 224 for a 2x2
    medium grid), as grey arrays."""
    grey = canvas.convert("L")
    return (np.asarray(grey.resize((224, 224), Image.BICUBIC), dtype=np.float32),
            np.asarray(grey.resize((1344, 1344), Image.BICUBIC), dtype=np.float32))


def test_labels_are_a_smudge_in_the_low_view_and_legible_size_in_the_high_view():
    rng = random.Random(5)
    canvas = upsample_canvas(Image.new("L", (300, 300), 90), 1600)
    _, drawn = draw_label(canvas, "K7", rng)
    x0, y0, x1, y1 = drawn.box
    assert (x1 - x0) * 224 / 1600 < 3.5 and (y1 - y0) * 224 / 1600 < 2.5  # a few low-view pixels
    assert (y1 - y0) * 1344 / 1600 >= 8  # box ~ glyph + padding: glyphs of ~7-8 high-view px


def test_a_speckled_lesion_averages_to_a_uniform_one_in_the_low_view():
    """The texture is the only difference, and the low view's resampling removes it: its cells
    (2 px) are far below a low-view pixel (~7 canvas px), while the high view keeps them."""
    canvas = upsample_canvas(Image.new("L", (300, 300), 90), 1600)
    speckled, drawn = draw_textured_lesion(canvas, "speckled", random.Random(2))
    uniform, _ = draw_textured_lesion(canvas, "uniform", random.Random(2))
    (low_s, high_s), (low_u, high_u) = low_and_high(speckled), low_and_high(uniform)
    x0, y0, x1, y1 = drawn.box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 0.3 * (x1 - x0)  # well inside the disk
    low_box, high_box = ([round(v * scale) for v in (cx - half, cy - half, cx + half, cy + half)] for scale in (224 / 1600, 1344 / 1600))
    inner = lambda a, b: a[b[1]:b[3], b[0]:b[2]]  # noqa: E731
    assert inner(low_s, low_box).std() < 0.25 * inner(high_s, high_box).std()
    assert inner(high_s, high_box).std() > 20 and inner(high_u, high_box).std() < 3
    assert abs(inner(low_s, low_box).mean() - inner(low_u, low_box).mean()) < 12


def test_built_fine_details_are_sized_to_vanish(built, records):
    details = [r for split in SPLITS for r in records[split] if r["family"] == "fine_detail"]
    assert {r["detail"]["kind"] for r in details} == {"label", "texture"}
    for record in details:
        side = Image.open(built / record["image"]).width
        assert side >= 1344
        x0, y0, x1, y1 = record["detail"]["box"]
        if record["detail"]["kind"] == "texture":
            assert record["truth"] == record["detail"]["texture"] and set(record["options"]) == set(TEXTURES)
            assert (x1 - x0) * 1344 / side >= 40  # the lesion fills a good part of a high crop
        else:
            assert record["truth"] == record["detail"]["text"]
    assert LABEL_FRACTION[0] * 1344 >= 7


def test_fine_detail_answers_name_what_the_detail_shows_and_captions_say_where(built, records):
    """Answers name the texture or the label and no quadrant (the tiny model named it only at
    chance); the detail's recorded quadrant is the one it was drawn in (viewer's quadrants)."""
    for record in [r for split in SPLITS for r in records[split] if r["family"] == "fine_detail"]:
        side = Image.open(built / record["image"]).width
        x0, y0, x1, y1 = record["detail"]["box"]
        where = QUADRANTS[2 * int((y0 + y1) / 2 >= side / 2) + int((x0 + x1) / 2 >= side / 2)]
        answer = record["conversations"][1]["value"]
        assert record["detail"]["where"] == where
        assert answer in (f"The lesion is {record['truth']} inside.", f"The label says {record['truth']}.")


def test_every_training_canvas_has_a_caption_naming_its_detail(built, records):
    """Stage 1's captions include each training canvas (same image file) and say what its
    detail shows; validation and test canvases get none."""
    captions = {r["image"]: r["conversations"][1]["value"] for r in read(built, "captions")}
    for split in SPLITS:
        for record in [r for r in records[split] if r["family"] == "fine_detail"]:
            if split != "train":
                assert record["image"] not in captions
                continue
            text = captions[record["image"]]
            assert f"{record['detail']['where']} quadrant" in text and record["truth"] in text


def test_display_slices_follow_the_radiological_convention():
    """RAS+ volume: index 0 of the first axis is the patient's far left, which a radiological
    display puts on the image's right; anterior (axial) and superior (coronal) go to the top."""
    volume = np.zeros((20, 20, 20), dtype=np.float32)
    volume[3, 15, 16] = 1  # patient's left, anterior, superior
    row, col = map(int, np.argwhere(display_slice(volume, "axial", 16))[0])
    assert col > 10 and row < 10
    row, col = map(int, np.argwhere(display_slice(volume, "coronal", 15))[0])
    assert col > 10 and row < 10
    row, col = map(int, np.argwhere(display_slice(volume, "sagittal", 3))[0])
    assert col < 10 and row < 10  # sagittal: anterior on the left


def test_missing_debian_packages_are_skipped_with_a_warning(tmp_path, monkeypatch):
    original = offline_med_catalogue.catalogue
    debian = ("invesalius:", "mricron:")

    def without_debian():
        return [replace(s, path=None) if s.id.startswith(debian) else s for s in original()]

    monkeypatch.setattr(offline_med, "catalogue", without_debian)
    with pytest.warns(UserWarning, match="apt-get install"):
        manifest = offline_med.build(tmp_path, seed=1, scale_name="small")
    assert {"invesalius:Cranium", "mricron:colin27"} <= set(manifest["skipped"])
    assert read(tmp_path, "train") and read(tmp_path, "test")


@pytest.mark.skipif(not DEBIAN_INSTALLED, reason="apt-get install invesalius-examples mricron-data")
def test_volumes_give_planes_windows_and_atlas_regions(records):
    train = records["train"]
    cranium = [r for r in train if r["source"] == "invesalius:Cranium"]
    assert {r["family"] for r in cranium} >= {"plane", "window"}
    atlas = [r for r in train if r["family"] == "atlas_region"]
    assert atlas and all(r["source"] == "mricron:colin27" for r in atlas)
    open_answers = [r["truth"] for r in atlas if r["answer_type"] == "open"]
    assert all(re.match(r"^(left|right|vermis) ", a) for a in open_answers)


def test_training_yes_no_questions_come_in_mirrored_pairs(records):
    """Each training yes/no fact question has a twin on the same image with the other answer,
    so an answer prior cannot lower the loss (checked on the questions as first asked: their
    complements, written after them, go to other images)."""
    facts = ("modality", "body_region", "plane", "window")
    first_asked = {}
    for r in records["train"]:
        if r["family"] in facts and r.get("options") == ["yes", "no"]:
            first_asked.setdefault(r["group"], r)
    train = Counter((r["image"], r["family"], r["truth"]) for r in first_asked.values())
    assert train
    for image, family, answer in train:
        assert (image, family, "no" if answer == "yes" else "yes") in train, (image, family)


def test_open_fact_questions_vary_in_training_and_keep_one_phrasing_when_held_out(records):
    """Training asks open questions as users do (the gallery's phrasings among them); validation
    and test keep the canonical phrasing, so their questions do not depend on the variants."""
    for family, (_, _, canonical) in PHRASING.items():
        asked = {split: {r["conversations"][0]["value"].removeprefix("<image>\n") for r in records[split] if r["family"] == family and not r.get("options")} for split in SPLITS}
        assert asked["train"] <= {canonical, *OPEN_VARIANTS[family]}, family
        for split in ("val", "test"):
            assert asked[split] <= {canonical}, (family, split)
    modality = {r["conversations"][0]["value"] for r in records["train"] if r["family"] == "modality" and not r.get("options")}
    assert any(OPEN_VARIANTS["modality"][0] in q for q in modality)


def test_each_closed_fact_question_is_asked_of_one_image_per_option(records):
    """Complementary questions: a closed fact question's text is asked of as many images as it
    offers options, each answering with another one, so that the text alone scores at chance.
    A family whose split has a single truth (the small build's val: heads only) cannot have
    them; every other group is complete."""
    facts = ("modality", "body_region", "plane", "window")
    for split in SPLITS:
        groups: dict[str, list[dict]] = {}
        for r in records[split]:
            if r["family"] in facts and r["answer_type"] == "closed" and len(r["conversations"]) == 2:
                groups.setdefault(r["group"], []).append(r)
        assert groups, split
        named = {f: {r["truth"] for r in records[split] if r["family"] == f and r.get("options") != ["yes", "no"]} for f in facts}
        for members in groups.values():
            question, options = members[0]["conversations"][0]["value"], members[0]["options"]
            answers = [m["truth"] for m in members]
            assert all(m["conversations"][0]["value"] == question and m["options"] == options for m in members)
            assert len(set(answers)) == len(answers) and len({m["image"] for m in members}) == len(members)
            if len(members) < len(options):  # only where the split knows one truth for the family
                assert len(named[members[0]["family"]]) == 1, (split, question)
        by_text = Counter((r["conversations"][0]["value"], r["truth"]) for m in groups.values() for r in m)
        best_constant = sum(max(n for (q, _), n in by_text.items() if q == text) for text in {q for q, _ in by_text})
        assert best_constant / sum(by_text.values()) <= 0.6, split


def test_training_lesion_presence_is_asked_with_and_without_the_lesion(built, records):
    presence = [r for r in records["train"] if r["family"] == "finding" and r.get("options") == ["yes", "no"]]
    answers = [r["truth"] for r in presence]
    assert answers.count("yes") == answers.count("no")
    for first, second in zip(presence[::2], presence[1::2], strict=True):  # written back to back
        assert {first["truth"], second["truth"]} == {"yes", "no"}
        assert first["source"] == second["source"]
        a, b = (np.asarray(Image.open(built / r["image"]).convert("L"), dtype=np.int16) for r in (first, second))
        changed = np.abs(a - b) > 8
        assert 0 < changed.mean() < 0.05  # the same view; only the lesion differs


def test_monochrome1_radiographs_are_shown_with_bone_bright(tmp_path):
    """MONOCHROME1 stores white as the lowest value (CR/DX); the builder must invert it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    stored = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))  # dark-to-bright ramp as stored
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 64, 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    pixels, _ = offline_med_sources.read_dicom(path)
    assert pixels[0, 0] > pixels[0, -1]  # the lowest stored value is now the brightest


def test_fundus_views_include_red_free_and_zoomed_renderings():
    retina = next(s for s in offline_med_catalogue.catalogue() if s.id == "skimage:retina")
    scale = replace(offline_med_sources.SCALES["small"], views_2d=6)
    views = list(offline_med_sources.fundus_views(retina, random.Random(0), scale))
    grey = [v for v in views if (lambda a: np.array_equal(a[..., 0], a[..., 1]))(np.asarray(v.image))]
    assert len(grey) == 4 and len(views) - len(grey) == 2  # colour, red-free, zoomed red-free
    assert all(v.modality == "fundus photograph" and v.body_region == "eye" for v in views)


def test_simulated_fundus_is_a_new_eye_per_draw_and_reproducible_by_seed():
    from training.offline_med.simulated_fundus import simulate_fundus

    eyes = [np.asarray(simulate_fundus(random.Random(seed), side=256)) for seed in range(8)]
    again = np.asarray(simulate_fundus(random.Random(3), side=256))
    assert np.array_equal(eyes[3], again) and not np.array_equal(eyes[3], eyes[4])
    for eye in eyes:
        assert eye[:6, :6].max() == 0 and eye[-6:, -6:].max() == 0  # black outside the circular field
        centre = eye[96:160, 96:160].astype(float)
        assert centre[..., 0].mean() > centre[..., 2].mean() + 40  # an orange-red retina, not grey
        row = eye[128, 40:216].astype(float).sum(axis=1)  # the disc is the brightest thing on the row
        assert row.max() > np.median(row) * 1.3
    disc_side = [int(np.argmax(eye[120:136, :, 1].astype(float).sum(axis=0)) > 128) for eye in eyes]
    assert 0 < sum(disc_side) < len(eyes)  # right and left eyes both occur


def test_simulated_fundus_and_stardist_histology_are_training_sources():
    sources = {s.id: s for s in offline_med_catalogue.catalogue()}
    simulated = sources["simulated:fundus"]
    assert (simulated.split, simulated.modality, simulated.body_region) == ("train", "fundus photograph", "eye")
    scale = replace(offline_med_sources.SCALES["small"], views_2d=3)
    views = list(simulated.make_views(simulated, random.Random(0), scale))
    assert len(views) == 3 and all(max(v.image.size) == offline_med_sources.DISPLAY_SIDE for v in views)
    histo = sources["stardist:histo"]
    assert histo.path is not None and histo.path.is_file(), "stardist missing: pip install --no-deps -r requirements-weights.txt"
    assert (histo.split, histo.modality) == ("train", "histology")
    assert len(list(histo.make_views(histo, random.Random(0), scale))) == 3


def frame_thumbnail(path: Path) -> np.ndarray:
    """A DICOM's middle frame as a 32 x 32 grey thumbnail, zero-mean and unit-norm."""
    pixels = offline_med_sources.read_dicom(path)[0]
    multi_frame = pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] != 3)
    frame = pixels[len(pixels) // 2] if multi_frame else pixels
    image = offline_med_sources.autocontrast(frame).convert("L").resize((32, 32), Image.BILINEAR)
    values = np.asarray(image, dtype=np.float32).ravel()
    values -= values.mean()
    return values / max(float(np.linalg.norm(values)), 1e-6)


def test_no_held_out_source_reappears_under_another_file_name():
    """pydicom and pydicom-data ship re-encodings of the same pixels under other names (e.g.
    US1_UNCR.dcm is examples_rgb_color.dcm); a source in two splits would leak its answers."""
    known_copy = offline_med_catalogue.pydicom_file("US1_UNCR.dcm")
    dicoms = [s for s in offline_med_catalogue.catalogue() if s.path is not None and s.path.suffix == ".dcm"]
    thumbs = {s.id: (s.split, frame_thumbnail(s.path)) for s in dicoms}
    if known_copy is not None:  # the check itself must catch a real copy
        assert float(frame_thumbnail(known_copy) @ thumbs["pydicom:examples_rgb_color"][1]) > 0.99
    for a, (split_a, ta) in thumbs.items():
        for b, (split_b, tb) in thumbs.items():
            if a < b and split_a != split_b:
                assert float(ta @ tb) < 0.95, (a, b)  # two head CTs of different patients: 0.89


def test_an_epi_mosaic_stacks_into_a_volume_shown_as_the_scanner_stored_it():
    """The stacked volume is RAS: its axial display is each tile exactly as stored (rows to the
    posterior, columns to the patient's left: radiological), and its reformats are the
    coronal and sagittal slabs the training split needs beside colin27 and Cranium."""
    source = {s.id: s for s in offline_med_catalogue.catalogue()}["heudiconv:b0dwi-EPI"]
    assert source.path is not None, "heudiconv missing: pip install --no-deps -r requirements-weights.txt"
    volume, zooms, tiles = offline_med_sources.mosaic_volume(source.path)
    assert volume.shape == (tiles[0].shape[1], tiles[0].shape[0], len(tiles)) == (150, 152, 81)
    assert zooms == pytest.approx((1.5, 1.5, 1.5))
    for k in (0, 40, 80):
        np.testing.assert_array_equal(display_slice(volume, "axial", k), tiles[k])
    views = list(source.make_views(source, random.Random(0), offline_med_sources.SCALES["small"]))
    planes = Counter(v.plane for v in views)
    assert planes == {"axial": 2, "coronal": 2, "sagittal": 2}
    reformats = [v for v in views if v.plane != "axial"]
    assert all(v.body_region is None for v in reformats)  # the region is asked of the axial tiles only
    assert all(v.image.height < v.image.width for v in reformats)  # 122 mm of slices under a 225 mm field


def test_simulated_epi_slabs_reformat_to_thin_strips_in_every_plane():
    """A slab of 40-70 mm of the head, resampled to EPI voxels: its coronal and sagittal
    reformats are wide strips (no training volume gave one before), its axial slices are not."""
    volume = np.zeros((96, 112, 90), dtype=np.float32)
    volume[8:88, 8:104, 5:85] = 1.0 + np.random.default_rng(0).random((80, 96, 80))  # a 120 mm "head"
    zooms = (1.5, 1.5, 1.5)
    slab, spacing = offline_med_sources.simulated_slab(volume, zooms, offline_med_sources.head_extent(volume), random.Random(0))
    assert 1.5 <= spacing[0] == spacing[1] <= 4.5 and 1.5 <= spacing[2] <= 4.5  # whole voxels of 1.5 mm
    assert 40 - 2 * spacing[2] <= slab.shape[2] * spacing[2] <= 70
    source = offline_med_sources.Source("simulated:EPI-slab-test", "train", "MRI", None, offline_med_sources.slab_views, None)
    views = list(offline_med_sources.volume_slab_views(source, volume, zooms, random.Random(0), offline_med_sources.SCALES["full"]))
    by_plane = {plane: [v for v in views if v.plane == plane] for plane in ("axial", "coronal", "sagittal")}
    assert all(len(found) == 16 for found in by_plane.values())
    assert all(v.body_region is None and v.modality == "MRI" for v in views)
    assert all(v.image.height <= 0.7 * v.image.width for v in by_plane["coronal"] + by_plane["sagittal"])
    assert all(v.image.height >= 0.8 * v.image.width for v in by_plane["axial"])
