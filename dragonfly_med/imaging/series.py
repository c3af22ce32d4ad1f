"""Series ingestion: several DICOM files, a .zip or a CD folder -> ordered series of slices.

`open_upload(sources, limits)` takes the bytes of everything a clinician uploaded at once and
returns either the one file itself (a single DICOM or photo: `dragonfly_med.imaging.ingest.load_image`
handles it) or a `SeriesSet`: the images grouped by SeriesInstanceUID, each series ordered by
position along its slice normal (then InstanceNumber) and checked whole, before any pixel is
decoded. `load_slice(series, index)` then decodes one slice through `load_image`, so windows,
frames, de-identification and errors are exactly those of a single file.

Reading the upload (zips, DICOMDIRs, limits, each file's header) is `upload`'s concern; this
module groups, orders and checks. Everything stays in memory (nothing is extracted to disk),
and every refusal is an `IngestError` whose message says what is wrong and what to do, never
naming a file (file names often hold the patient's name) or quoting a UID.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from dragonfly_med.imaging.errors import (
    CorruptFileError,
    IngestError,
    InvalidRequestError,
    InvalidSeriesError,
    TooLargeError,
    UnsupportedError,
)
from dragonfly_med.imaging.facts import ImageFacts
from dragonfly_med.imaging.ingest import IngestLimits, LoadedImage, load_image
from dragonfly_med.imaging.upload import Upload, UploadedImage, is_zip, read_upload

# A gap this many times the usual spacing means slices are missing.
_GAP_FACTOR = 1.5
# Direction cosines closer than this are the same orientation (scanners round to ~1e-6).
_SAME_ORIENTATION = 1e-3
# Slices closer than this (mm) along the normal are at the same position.
_SAME_POSITION_MM = 0.01
# A slice normal within this angle of an axis is named after that plane, else "oblique".
_PLANE_TOLERANCE_DEG = 20.0


# ----------------------------------------------------------------------------- data types


@dataclass
class SeriesFacts:
    """Series-level facts, safe to show and log: counts, millimetres and a plane name only."""

    slices: int
    slice: int  # 0-based index of the slice on screen, in position order
    spacing_mm: float | None  # median distance between neighbouring slice positions
    thickness_mm: float | None  # the slices' Slice Thickness (median), if recorded
    orientation: str | None  # axial, coronal, sagittal, oblique; None without positions


@dataclass
class SliceFacts(ImageFacts):
    """The facts of one slice (as for a single file) plus those of its series."""

    series: SeriesFacts | None = None


@dataclass
class Series:
    """One series, its slices' bytes ordered along the slice normal."""

    slices: list[bytes]
    label: str  # de-identified, for the series picker
    spacing_mm: float | None
    thickness_mm: float | None
    orientation: str | None

    def facts(self, index: int) -> SeriesFacts:
        return SeriesFacts(len(self.slices), index, self.spacing_mm, self.thickness_mm, self.orientation)


@dataclass
class SeriesSet:
    """Every usable series of an upload, and what was left out (and why), for the clinician."""

    series: list[Series]
    left_out: list[str] = field(default_factory=list)

    def default_index(self) -> int:
        """The series with the most slices: on a CD the first series is often a 3-image scout."""
        return max(range(len(self.series)), key=lambda i: (len(self.series[i].slices), -i))

    def require_one(self) -> Series:
        """The single series of an API upload; a mix is refused (an API call has no picker)."""
        if len(self.series) == 1 and not self.left_out:
            return self.series[0]
        labels = [s.label for s in self.series] + self.left_out
        raise InvalidSeriesError(
            f"This upload mixes {len(labels)} series ({'; '.join(labels)}): send one series per "
            ".zip, or open the folder on the page, which offers a series picker"
        )


# ----------------------------------------------------------------------------- public API


def open_upload(sources: Sequence[bytes], limits: IngestLimits | None = None) -> bytes | SeriesSet:
    """One plain file -> its bytes (load it with `load_image`); anything else -> a SeriesSet.

    sources: every uploaded file's bytes (zips are opened, DICOMDIRs read). Raises IngestError
    (TooLargeError, UnsupportedError, CorruptFileError, InvalidSeriesError) and nothing else.
    """
    limits = limits or IngestLimits()
    if not sources:
        raise InvalidRequestError("No file was given: choose a DICOM, a photo, several DICOM files or a .zip")
    if len(sources) == 1 and not is_zip(sources[0]):
        return bytes(sources[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings may quote header values
            return _series_set(read_upload(sources, limits), limits)
    except IngestError:
        raise
    except MemoryError as exc:
        raise TooLargeError("This upload is too large to open on this machine: upload one series at a time") from exc
    except Exception as exc:  # the contract: callers only ever see IngestError
        raise CorruptFileError(
            f"These files could not be read as a DICOM series ({type(exc).__name__}); some may be damaged: "
            "export the series again from the PACS or CD"
        ) from exc


def load_slice(
    series: Series,
    index: int | None = None,
    *,
    window: str | tuple[float, float] | None = None,
    frame: int | None = None,
    limits: IngestLimits | None = None,
) -> LoadedImage:
    """Decode one slice (default the middle one, `slices // 2`) with its series facts."""
    count = len(series.slices)
    if index is None:
        index = count // 2
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < count:
        raise InvalidRequestError(
            f"Slice {index} does not exist: this series has {count} slice(s); choose a slice from 0 to {count - 1}"
        )
    loaded = load_image(series.slices[int(index)], frame=frame, window=window, limits=limits)
    values = {f.name: getattr(loaded.facts, f.name) for f in fields(ImageFacts)}
    return LoadedImage(loaded.image, SliceFacts(**values, series=series.facts(int(index))))


# ----------------------------------------------------------------------------- series


def _series_set(found: Upload, limits: IngestLimits) -> SeriesSet:
    """Group, order and check; refuse when nothing usable is left, or something is damaged."""
    if found.damaged:
        raise CorruptFileError(
            f"{found.damaged} of the DICOM files in this upload are damaged or incomplete: copy or export the "
            "series again from the CD or PACS"
        )
    if found.not_dicom and not found.has_dicomdir:
        count = sum(found.not_dicom.values())
        kinds = ", ".join(f"{n} {what}" + ("s" if n > 1 else "") for what, n in sorted(found.not_dicom.items()))
        raise UnsupportedError(
            f"{count} of the files in this upload are not DICOM images ({kinds}): a series upload takes DICOM "
            "files only; remove the others, or upload the CD's folder with its DICOMDIR"
        )
    if not found.images:
        raise InvalidSeriesError(
            "This upload holds no DICOM image (only reports, indexes or other objects): upload the image files "
            "of a series (on a CD, the DICOM folder)"
        )
    images = _unique(found.images)
    patients = {i.patient for i in images}
    if len(patients) > 1:
        raise InvalidSeriesError(
            f"This upload holds images of {len(patients)} different patients: upload one patient's images at a "
            "time, so that every answer is about the right patient"
        )
    groups: dict[str, list[UploadedImage]] = {}
    for image in images:
        groups.setdefault(image.series_uid, []).append(image)
    studies = sorted({i.study_uid for i in images})
    usable, left_out = [], []
    for number, group in enumerate(sorted(groups.values(), key=_group_order), start=1):
        study = studies.index(group[0].study_uid) + 1 if len(studies) > 1 else None
        label = _label(number, group, study)
        try:
            usable.append(_make_series(group, label, found.dicomdir.get(group[0].series_uid), limits))
        except InvalidSeriesError as exc:
            left_out.append(f"{label}: {exc}")
    if found.not_images:
        left_out.append(f"{found.not_images} DICOM object(s) without an image (reports, presentation states)")
    if not usable:
        raise InvalidSeriesError("No series in this upload can be shown. " + " ".join(f"{s}." for s in left_out))
    return SeriesSet(usable, left_out)


def _unique(images: list[UploadedImage]) -> list[UploadedImage]:
    """The same instance uploaded twice (two copies of one file) counts once."""
    seen, out = set(), []
    for image in images:
        key = image.sop_uid or id(image)
        if key not in seen:
            seen.add(key)
            out.append(image)
    return out


def _group_order(images: list[UploadedImage]) -> tuple:
    first = images[0]
    return (first.study_uid, first.series_number is None, first.series_number or 0, first.modality or "", first.description or "")


def _label(number: int, images: list[UploadedImage], study: int | None) -> str:
    """'Series 3 · MR · BRAIN PD · 20 slices': numbers and de-identified text only."""
    first = images[0]
    name = f"Series {first.series_number}" if first.series_number is not None else f"Series #{number}"
    parts = [f"Study {study}" if study else None, name, first.modality, first.description, f"{len(images)} slice" + ("s" if len(images) > 1 else "")]
    return " · ".join(p for p in parts if p)


def _make_series(images: list[UploadedImage], label: str, listed: set[str] | None, limits: IngestLimits) -> Series:
    """Check one group and order it; InvalidSeriesError says why it cannot be one series."""
    _check_consistent(images, limits)
    ordered, normal, positions = _order(images)
    if listed:
        present = {i.sop_uid for i in images}
        missing = len(listed - present)
        if missing:
            raise InvalidSeriesError(
                f"the DICOMDIR lists {len(listed)} images of this series but {missing} of them are missing: "
                "upload the whole folder again"
            )
    spacing = _spacing(positions)
    thicknesses = [i.thickness for i in images if i.thickness is not None]
    thickness = float(np.median(thicknesses)) if thicknesses else None
    return Series([i.data for i in ordered], label, spacing, thickness, _plane(normal))


def _check_consistent(images: list[UploadedImage], limits: IngestLimits) -> None:
    modalities = sorted({i.modality or "?" for i in images})
    if len(modalities) > 1:
        raise InvalidSeriesError(f"its images mix modalities ({', '.join(modalities)}): export each series on its own")
    sizes = sorted({(i.columns, i.rows) for i in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{c} × {r}" for c, r in sizes[:4])
        raise InvalidSeriesError(
            f"its slices have different sizes ({shown} pixels), so they are not one volume: export the series again"
        )
    if len(images) > 1 and any(i.frames > 1 for i in images):
        raise InvalidSeriesError(
            "it is made of several multi-frame files: upload one of them at a time (each has its own frame slider)"
        )
    columns, rows = sizes[0]
    if rows * columns > limits.max_pixels:
        raise InvalidSeriesError(f"its slices are {columns} × {rows} pixels, above the limit of {limits.max_pixels:,}")


def _order(images: list[UploadedImage]) -> tuple[list[UploadedImage], np.ndarray | None, list[float] | None]:
    """By position along the slice normal, then InstanceNumber; by InstanceNumber without geometry."""
    if len(images) == 1:
        image = images[0]
        normal = _normal(image.orientation) if image.orientation is not None else None
        return images, normal, None
    if any(i.orientation is None or i.position is None for i in images):
        return _order_by_instance(images), None, None
    first = images[0].orientation
    if any(np.abs(i.orientation - first).max() > _SAME_ORIENTATION for i in images):
        raise InvalidSeriesError(
            "its slices lie in different orientations (a localizer or scout), so they cannot be stacked"
        )
    normal = _normal(first)
    if normal is None:
        raise InvalidSeriesError("its slice orientation is invalid (Image Orientation Patient): export it again")
    keyed = sorted(((float(i.position @ normal), i.instance if i.instance is not None else 0, n, i)
                    for n, i in enumerate(images)), key=lambda t: t[:3])
    positions = [k[0] for k in keyed]
    if float(np.min(np.diff(positions))) < _SAME_POSITION_MM:
        raise InvalidSeriesError(
            "several of its images lie at the same position (echoes, phases or time points in one series): "
            "export each of them as its own series"
        )
    return [k[3] for k in keyed], normal, positions


def _order_by_instance(images: list[UploadedImage]) -> list[UploadedImage]:
    numbers = [i.instance for i in images]
    if None in numbers:
        raise InvalidSeriesError(
            "its slices record neither their position nor their instance number, so their order is unknown: "
            "export the series again from the PACS"
        )
    ordered = sorted(images, key=lambda i: i.instance)
    values = [i.instance for i in ordered]
    if len(set(values)) < len(values):
        raise InvalidSeriesError("several of its images share an instance number: export each series on its own")
    if values[-1] - values[0] + 1 > len(values):
        raise InvalidSeriesError(
            f"slices are missing: its instance numbers run from {values[0]} to {values[-1]} but only "
            f"{len(values)} images are here; upload the whole series"
        )
    return ordered


def _spacing(positions: list[float] | None) -> float | None:
    """The median step between slices; a step much larger than it means missing slices."""
    if not positions or len(positions) < 2:
        return None
    steps = np.diff(np.asarray(positions))
    spacing = float(np.median(steps))
    if len(steps) >= 2 and spacing > 0:
        worst = int(np.argmax(steps))
        if steps[worst] > _GAP_FACTOR * spacing:
            raise InvalidSeriesError(
                f"slices are missing: between slices {worst + 1} and {worst + 2} (of {len(positions)}) the gap is "
                f"{steps[worst]:.1f} mm where the spacing is {spacing:.1f} mm; upload the whole series"
            )
    return round(spacing, 3)


def _normal(cosines: np.ndarray) -> np.ndarray | None:
    """Unit normal = row direction x column direction (PS3.3 C.7.6.2.1.1)."""
    normal = np.cross(cosines[:3], cosines[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 1e-6 and math.isfinite(length) else None


def _plane(normal: np.ndarray | None) -> str | None:
    """Axial/coronal/sagittal when the normal is near that axis (patient LPS), else oblique."""
    if normal is None:
        return None
    axis = int(np.argmax(np.abs(normal)))
    if abs(float(normal[axis])) < math.cos(math.radians(_PLANE_TOLERANCE_DEG)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]
