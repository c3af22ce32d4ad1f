"""What is safe to show and log about an image: `ImageFacts`, and how a DICOM header fills it.

Facts go to the page, the API, the console and the session log, so they carry no patient
identity: never the name, IDs, dates of birth, addresses, accession numbers, institutions,
physicians or UIDs, and a free-text description that repeats any of those values is dropped.
(Headers that are stored or shown whole go through `dragonfly_med.imaging.deid` instead.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dragonfly_med.imaging.dicom_decode import frame_value, transfer_syntax
from dragonfly_med.imaging.values import as_float, as_int, as_list, json_safe, text
from dragonfly_med.imaging.windowing import Window, file_windows


@dataclass
class ImageFacts:
    """What is safe to show and log about an image: no patient identity, no UIDs."""

    kind: str  # "dicom" or "photo"
    format: str  # "DICOM", "PNG", "JPEG", ...
    rows: int
    columns: int
    frames: int = 1
    frame_index: int = 0
    photometric: str | None = None  # DICOM photometric interpretation, or the Pillow mode
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    pixel_spacing: list[float] | None = None  # mm, [row spacing, column spacing]
    window: dict[str, Any] | None = None
    file_windows: list[dict[str, Any]] = field(default_factory=list)
    bits_stored: int | None = None
    transfer_syntax: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain floats, ints, strings and lists only)."""
        return {k: json_safe(v) for k, v in asdict(self).items()}


def dicom_facts(
    ds, rows: int, cols: int, frames: int, index: int, window: Window | None
) -> ImageFacts:
    """The facts of frame `index` of a DICOM, shown with `window` (None for colour)."""
    ts = transfer_syntax(ds)
    return ImageFacts(
        kind="dicom",
        format="DICOM",
        rows=rows,
        columns=cols,
        frames=frames,
        frame_index=index,
        photometric=text(ds.get("PhotometricInterpretation")),
        modality=text(ds.get("Modality")),
        body_part=text(ds.get("BodyPartExamined")),
        study_description=safe_description(ds, "StudyDescription"),
        series_description=safe_description(ds, "SeriesDescription"),
        pixel_spacing=_pixel_spacing(ds, index),
        window=window.to_dict() if window else None,
        file_windows=file_windows(ds, index),
        bits_stored=as_int(ds.get("BitsStored")),
        transfer_syntax=str(getattr(ts, "name", ts)),
    )


# Identity-bearing attributes whose values must never leak through a free-text description.
_IDENTITY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "PhysiciansOfRecord",
    "PatientMotherBirthName",
    "StudyID",
    "RequestingPhysician",
)


def safe_description(ds, keyword: str) -> str | None:
    """A description, dropped when it repeats any identity value (free text leaks names)."""
    description = text(ds.get(keyword))
    if not description:
        return None
    lowered = description.lower()
    for key in _IDENTITY_KEYWORDS:
        for token in _identity_tokens(ds.get(key)):
            if token in lowered:
                return None
    return description


def _identity_tokens(value: Any) -> list[str]:
    """Name components and whole values, lower-cased, long enough to matter (>= 3 chars)."""
    if value is None or value == "":
        return []
    from pydicom.multival import MultiValue

    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    tokens = []
    for v in values:
        whole = str(v).lower()
        tokens.append(whole)
        tokens.extend(whole.replace("^", " ").replace(",", " ").split())
    return [t for t in tokens if len(t) >= 3]


def _pixel_spacing(ds, index: int) -> list[float] | None:
    value = frame_value(ds, index, "PixelMeasuresSequence", "PixelSpacing")
    if value is None:
        value = ds.get("ImagerPixelSpacing")
    spacing = [as_float(v) for v in as_list(value)]
    return spacing if len(spacing) == 2 and None not in spacing else None
