"""Example gallery: real medical images that install offline with the app's own dependencies.

pydicom ships CT and MR test files and scikit-image ships a fundus photo, an IHC slide and a
microaneurysm image; all are on disk after `pip install`, so the gallery never downloads.
pydicom's `get_testdata_files` only lists bundled files (`get_testdata_file` would try a
download for a missing name and stall for ~20 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class Example:
    title: str
    path: Path
    questions: tuple[str, ...]


def _pydicom_file(name: str) -> Path | None:
    from pydicom.data import get_testdata_files

    found = get_testdata_files(name)
    return Path(found[0]) if found else None


def _skimage_file(name: str) -> Path | None:
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    return path if path.is_file() else None


# (title, finder, file name, suggested questions). The questions use the phrasings the embedded
# tiny model was trained on (offline-med): it answers those in sentences or with the option, and
# drifts to one-word answers on phrasings it never saw (docs/tiny-default.md).
REPORT = "Write a short report of what this image shows."
CATALOGUE = (
    ("CT (pydicom CT_small)", _pydicom_file, "CT_small.dcm",
     (REPORT, "What imaging modality is this?", "Which body region is shown?")),
    ("MR (pydicom MR_small)", _pydicom_file, "MR_small.dcm",
     (REPORT, "What imaging modality is this?", "In which anatomical plane is this slice?")),
    ("Fundus photo (scikit-image retina)", _skimage_file, "retina.jpg",
     (REPORT, "What imaging modality is this?", "Which body region does this image show?")),
    ("Immunohistochemistry (scikit-image ihc)", _skimage_file, "ihc.png",
     (REPORT, "What imaging modality is this?", "Give a short caption for this image.")),
    ("Retinal microaneurysms (scikit-image)", _skimage_file, "microaneurysms.png",
     (REPORT, "What imaging modality is this?", "Look closely: is there a tiny round dot somewhere in this image?")),
)


def find_examples() -> list[Example]:
    """The catalogue's images that exist on this machine (a missing package just drops its rows)."""
    examples = []
    for title, finder, name, questions in CATALOGUE:
        try:
            path = finder(name)
        except ImportError:
            path = None
        if path is not None:
            examples.append(Example(title, path, questions))
    return examples


def thumbnail(image: Image.Image, side: int = 160) -> Image.Image:
    copy = image.convert("RGB")
    copy.thumbnail((side, side))
    return copy
