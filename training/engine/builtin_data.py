"""Built-in data for the tiny recipes, generated on first use from images shipped in wheels.

No benchmark text can be downloaded here, yet `python -m training run --recipe tiny-...` must
work on a fresh clone. So the tiny recipes read `builtin:NAME` datasets written once into the
cache (`$DRAGONFLY_CACHE` or `~/.cache/dragonfly-med`, under training-data/): real medical
images bundled with scikit-image (fundus, microaneurysms, immunohistochemistry, a cell) and
pydicom (a CT and an MR slice), a few natural photos, each in a full, a wide and a tall cut so
that crop plans vary, and templated captions, multi-turn instructions, closed/open VQA and
text-only chat stated from what each image is. It exercises the pipeline; it teaches little.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from training.engine.records import write_jsonl

VERSION = "v1"
# name -> (file in the skimage/pydicom wheel, caption, modality, subject)
MEDICAL = {
    "fundus": ("skimage:retina.jpg", "A colour fundus photograph of the retina with the optic disc and vessels.", "fundus photography", "the retina"),
    "microaneurysms": ("skimage:microaneurysms.png", "A fundus image detail showing small retinal microaneurysms.", "fundus photography", "the retina"),
    "ihc": ("skimage:ihc.png", "An immunohistochemistry-stained tissue section under the microscope.", "pathology", "a tissue section"),
    "cell": ("skimage:cell.png", "A light microscopy image of a single cell.", "microscopy", "a cell"),
    "ct": ("pydicom:CT_small.dcm", "An axial CT slice of the body.", "CT", "the body in axial section"),
    "mr": ("pydicom:MR_small.dcm", "An MR image slice.", "MRI", "a cross-section"),
}
GENERAL = {
    "astronaut": ("skimage:astronaut.png", "An astronaut in a white space suit in front of a flag.", "a person"),
    "coffee": ("skimage:coffee.png", "A cup of coffee on a saucer, seen from above.", "a cup of coffee"),
    "cat": ("skimage:chelsea.png", "A tabby cat looking to the side.", "a cat"),
    "rocket": ("skimage:rocket.jpg", "A rocket on its launch pad under a blue sky.", "a rocket"),
    "camera": ("skimage:camera.png", "A black and white photo of a man with a camera on a tripod.", "a photographer"),
    "coins": ("skimage:coins.png", "Old coins laid out in rows on a dark surface.", "coins"),
}
CUTS = {"full": "", "wide": " (upper half)", "tall": " (left half)"}
TEXT_ONLY = [
    ("What is the normal resting heart rate of an adult?", "Between about 60 and 100 beats per minute."),
    ("What does CT stand for?", "Computed tomography."),
    ("What does MRI stand for?", "Magnetic resonance imaging."),
    ("What is 12 times 7?", "84."),
    ("Name the largest organ of the human body.", "The skin."),
    ("What is the retina?", "The light-sensitive layer of tissue at the back of the eye."),
    ("What is 45 plus 38?", "83."),
    ("Which organ pumps blood through the body?", "The heart."),
]


def cache_dir() -> Path:
    root = os.environ.get("DRAGONFLY_CACHE") or Path.home() / ".cache" / "dragonfly-med"
    return Path(root) / "training-data" / VERSION


def read_source(spec: str) -> Image.Image:
    kind, name = spec.split(":", 1)
    if kind == "skimage":
        import skimage

        return Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
    import pydicom
    from pydicom.data import get_testdata_files

    pixels = pydicom.dcmread(get_testdata_files(name)[0]).pixel_array.astype(np.float32)
    lo, hi = np.percentile(pixels, (1, 99))
    scaled = np.clip((pixels - lo) / max(hi - lo, 1.0), 0, 1) * 255
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


def cut(image: Image.Image, how: str) -> Image.Image:
    w, h = image.size
    if how == "wide":
        return image.crop((0, 0, w, h // 2))
    if how == "tall":
        return image.crop((0, 0, w // 2, h))
    return image


def conversation(image: str | None, turns: list[tuple[str, str]], record_id: str, **meta) -> dict:
    messages = []
    for index, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if index == 0 and image else ""
        messages += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    row = {"id": record_id, "conversations": messages, **meta}
    if image:
        row["image"] = image
    return row


def build(root: Path) -> None:
    """Write every built-in dataset (JSONL) and its images under root."""
    (root / "images").mkdir(parents=True)
    rows: dict[str, list[dict]] = {k: [] for k in ("med-captions", "med-instruct", "med-vqa", "general-captions", "general-instruct", "text")}
    modalities = sorted({m for _, _, m, _ in MEDICAL.values()})
    for name, (source, caption, modality, subject) in MEDICAL.items():
        base = read_source(source)
        for how, suffix in CUTS.items():
            rel = f"images/{name}-{how}.png"
            cut(base, how).save(root / rel)
            rid = f"{name}-{how}"
            rows["med-captions"].append(conversation(rel, [("Describe the image briefly.", caption.rstrip(".") + suffix + ".")], rid, source="med-captions"))
            rows["med-instruct"].append(conversation(rel, [
                ("What imaging modality is shown?", f"This image was acquired with {modality}."),
                ("What does it show?", f"It shows {subject}{suffix}."),
            ], rid, source="med-instruct"))
            other = modalities[(modalities.index(modality) + 1) % len(modalities)]
            rows["med-vqa"] += [
                conversation(rel, [(f"Is this image acquired with {modality}?", "yes")], f"{rid}-closed-yes", source="med-vqa", answer_type="closed"),
                conversation(rel, [(f"Is this image acquired with {other}?", "no")], f"{rid}-closed-no", source="med-vqa", answer_type="closed"),
                conversation(rel, [("What imaging modality is this?", modality)], f"{rid}-open", source="med-vqa", answer_type="open"),
            ]
    for name, (source, caption, subject) in GENERAL.items():
        base = read_source(source)
        for how in ("full", "wide"):
            rel = f"images/{name}-{how}.png"
            cut(base, how).save(root / rel)
            rid = f"{name}-{how}"
            rows["general-captions"].append(conversation(rel, [("Describe the image briefly.", caption)], rid, source="general-captions"))
            rows["general-instruct"].append(conversation(rel, [
                ("What is the main subject of this image?", f"The main subject is {subject}."),
                ("Is this a medical image?", "No, it is an everyday photograph."),
            ], rid, source="general-instruct"))
    rows["text"] = [conversation(None, [turn], f"text-{i}", source="text") for i, turn in enumerate(TEXT_ONLY)]
    for name, data in rows.items():
        write_jsonl(root / f"{name}.jsonl", data)


def ensure_builtin(name: str) -> tuple[Path, Path]:
    """(JSONL path, image root) of built-in dataset `name`, generating all of them once.

    Written to a temporary folder and renamed into place, so concurrent first uses (parallel
    tests, data-loader workers) never see a half-written dataset.
    """
    root = cache_dir()
    if not (root / "text.jsonl").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".building-"))
        try:
            build(tmp)
            tmp.rename(root)
        except OSError:
            if not (root / "text.jsonl").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    path = root / f"{name}.jsonl"
    if not path.exists():
        known = sorted(p.stem for p in root.glob("*.jsonl"))
        raise FileNotFoundError(f"no built-in dataset {name!r}; known: {known}")
    return path, root
