"""Image ingestion: any DICOM or photo a clinician brings -> 8-bit RGB pixels + safe facts.

One entry point, `load_image`, detects the input by content (never by file name), decodes a
single frame, maps it to display values and returns a PIL RGB image with the facts about it.
Anything it cannot turn into an image raises an `IngestError` whose message says what is wrong
and what the clinician can do about it; nothing else escapes.

DICOM greyscale pipeline (PS3.3 C.11 / PS3.4 N.2):
    stored values -> modality LUT or rescale slope/intercept -> VOI LUT or window
    -> MONOCHROME1 inversion -> uint8
Colour: YBR is converted to RGB by the decoder, PALETTE COLOR goes through its LUT.

Facts carry no patient identity (name, IDs, dates of birth, addresses, accession numbers,
institutions, physicians or UIDs): see `ImageFacts` and `dragonfly_med.imaging.deid`.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

MiB = 1024 * 1024

# Centre/width pairs as PACS viewers ship them (Hounsfield units).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "liver": (90.0, 150.0),
    "bone": (480.0, 2500.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}

# Photo formats we accept. An allow-list keeps Pillow away from formats that run external
# programs (EPS -> Ghostscript) or that are never clinical images.
PHOTO_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DIB", "WEBP", "GIF", "PPM", "JPEG2000")

# Elements larger than this stay on disk until asked for: pixel data of a 1000-frame file is
# never read just to look at its header.
_DEFER_BYTES = 4 * MiB


# ----------------------------------------------------------------------------- errors


class IngestError(Exception):
    """The input cannot become an image; str(error) is a message for the clinician."""


class EmptyFileError(IngestError):
    """Zero bytes: the copy or upload did not complete."""


class CorruptFileError(IngestError):
    """Recognised format, but damaged or truncated data."""


class NoPixelDataError(IngestError):
    """A valid DICOM that holds no image (report, RT plan, waveform, DICOMDIR...)."""


class UnsupportedError(IngestError):
    """Not a DICOM or a supported photo, or an encoding we cannot decode."""


class TooLargeError(IngestError):
    """Above the configured file-size or pixel-count limit (decompression bombs included)."""


class InvalidRequestError(IngestError):
    """A bad option from the caller: frame index out of range, malformed window."""


# ----------------------------------------------------------------------------- data types


@dataclass
class IngestLimits:
    """Refuse inputs above these sizes before decoding them (memory and time bombs)."""

    max_file_bytes: int = 512 * MiB
    max_pixels: int = 100_000_000  # per frame, rows x columns


@dataclass
class Window:
    """The window/level used for display; source is file, preset:<name>, custom or minmax."""

    center: float
    width: float
    source: str
    function: str = "LINEAR"  # DICOM VOI LUT Function, or VOI_LUT when a LUT table was used

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_safe(v) for k, v in asdict(self).items()}


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
        return {k: _json_safe(v) for k, v in asdict(self).items()}


@dataclass
class LoadedImage:
    image: Image.Image  # 8-bit RGB
    facts: ImageFacts


# ----------------------------------------------------------------------------- public API


def parse_window(text: str) -> str | tuple[float, float]:
    """'lung' / 'soft tissue' / 'minmax' / 'file' / 'file:2' -> name; '-600,1500' -> (C, W).

    Users type presets in many ways, so case, spaces and hyphens are normalised.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(_window_help("An empty window was given"))
    name = text.strip().lower().replace("-", "_").replace(" ", "_")
    if name in WINDOW_PRESETS or name in ("minmax", "file"):
        return name
    if name.startswith("file:") and name[5:].isdigit():
        return name
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 2:
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            return _check_custom_window(center, width)
    raise InvalidRequestError(_window_help(f"'{text.strip()[:40]}' is not a window"))


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    frame: int | None = None,
    window: str | tuple[float, float] | None = None,
    limits: IngestLimits | None = None,
) -> LoadedImage:
    """Decode one frame of a DICOM or photo into 8-bit RGB plus facts.

    frame: 0-based index; default the middle frame of a DICOM, the first of an animation.
    window: a preset name, "C,W" text, a (center, width) tuple, "minmax", "file" or "file:N";
    default: the file's own VOI LUT or first window, else min..max. Colour images ignore it.
    Raises only IngestError (or a subclass).
    """
    limits = limits or IngestLimits()
    try:
        with warnings.catch_warnings():
            # pydicom and Pillow warn with header values in the text: keep them off stderr.
            warnings.simplefilter("ignore")
            request = _normalise_window(window)
            src = _Source.open(source, limits)
            kind = _sniff(src)
            if kind == "dicom":
                return _load_dicom(src, frame, request, limits)
            return _load_photo(src, frame, limits)
    except IngestError:
        raise
    except MemoryError as exc:
        raise TooLargeError(
            "This image is too large to open on this machine: use a smaller image or export "
            "a single frame"
        ) from exc
    except BaseException as exc:  # the contract: callers only ever see IngestError
        _reraise_if_fatal(exc)
        raise CorruptFileError(
            "This file could not be read as an image; it may be damaged: export or copy it "
            f"again from the original source ({type(exc).__name__})"
        ) from exc


# ----------------------------------------------------------------------------- input


@dataclass
class _Source:
    """The bytes to read: a file on disk (read lazily) or bytes already in memory."""

    path: Path | None
    data: bytes | None
    size: int

    @classmethod
    def open(cls, source: Any, limits: IngestLimits) -> _Source:
        """Check existence, type and size before reading a single pixel."""
        if isinstance(source, bytes | bytearray | memoryview):
            src = cls(None, bytes(source), len(source))
        elif isinstance(source, str | os.PathLike):
            path = Path(source)
            # File names can carry patient names: messages never repeat them.
            if path.is_dir():
                raise UnsupportedError(
                    "This is a folder, not a file: choose one image file inside it (on hospital "
                    "CDs the images are usually in the DICOM folder)"
                )
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise UnsupportedError(
                    "The file could not be found or opened: check that it still exists and that "
                    "you may read it"
                ) from exc
            if not path.is_file():
                raise UnsupportedError(
                    "This is not a regular file (a device or pipe): choose the image file itself"
                )
            src = cls(path, None, size)
        else:
            raise InvalidRequestError(
                f"Expected a file path or bytes, got {type(source).__name__}: pass the file itself"
            )
        if src.size == 0:
            raise EmptyFileError(
                "The file is empty (0 bytes): the copy or upload did not complete; copy it "
                "again from the original source"
            )
        if src.size > limits.max_file_bytes:
            raise TooLargeError(
                f"The file is {_size_text(src.size)}, above the limit of "
                f"{_size_text(limits.max_file_bytes)}: choose a single image or series file, "
                "or ask the administrator to raise the limit"
            )
        return src

    def stream(self) -> BinaryIO:
        """A fresh binary stream positioned at the start."""
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return self.path.open("rb")

    def head(self, n: int) -> bytes:
        with self.stream() as f:
            return f.read(n)

    def for_pydicom(self) -> str | BinaryIO:
        """A path lets pydicom reopen the file for deferred elements; bytes need a buffer."""
        return str(self.path) if self.path is not None else io.BytesIO(self.data or b"")


# Well-known non-image signatures, for a message that names what the file actually is.
_SIGNATURES: list[tuple[bytes, int, str]] = [
    (
        b"%PDF",
        0,
        "This is a PDF document, not an image: export the image itself as DICOM, PNG or JPEG",
    ),
    (
        b"PK\x03\x04",
        0,
        "This is a ZIP archive: unzip it first and choose one image file from inside",
    ),
    (
        b"\x1f\x8b",
        0,
        "This is a compressed (gzip) archive: extract it first and choose one "
        "image file from inside",
    ),
    (
        b"ftypheic",
        4,
        "HEIC photos (iPhone) are not supported: export or share the photo as JPEG or PNG",
    ),
    (b"ftypmif1", 4, "HEIF photos are not supported: export or share the photo as JPEG or PNG"),
    (
        b"n+1\x00",
        344,
        "NIfTI volumes are not supported here: export a DICOM series or a PNG slice instead",
    ),
]


def _sniff(src: _Source) -> str:
    """'dicom' or 'photo' from the bytes themselves; refuse everything else."""
    head = src.head(512)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if _pillow_recognises(src):
        return "photo"
    for magic, offset, message in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            raise UnsupportedError(message)
    if _forced_dicom_plausible(head):
        return "dicom"
    raise UnsupportedError(
        "This file is neither a DICOM nor a supported photo (PNG, JPEG, TIFF, BMP, WebP, "
        "GIF): choose the image file itself, e.g. the DICOM export from the PACS or CD"
    )


def _pillow_recognises(src: _Source) -> bool:
    """True when one of the allowed Pillow formats claims the file (header only)."""
    try:
        with src.stream() as f, Image.open(f, formats=PHOTO_FORMATS):
            return True
    except Image.DecompressionBombError:
        return True  # recognised; _load_photo reports it as too large
    except Exception:
        return False


# Groups a DICOM dataset without preamble can start with (meta, DICOMDIR, identity, image).
_FIRST_GROUPS = {0x0002, 0x0004, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}


def _forced_dicom_plausible(head: bytes) -> bool:
    """A DICOM without preamble starts with a low group tag (either byte order)."""
    if len(head) < 8:
        return False
    groups = {int.from_bytes(head[0:2], "little"), int.from_bytes(head[0:2], "big")}
    return bool(groups & _FIRST_GROUPS)


def _normalise_window(window: Any) -> str | tuple[float, float] | None:
    if window is None:
        return None
    if isinstance(window, str):
        return parse_window(window)
    try:
        center, width = (float(v) for v in window)
    except Exception as exc:
        raise InvalidRequestError(_window_help("The window must be (center, width)")) from exc
    return _check_custom_window(center, width)


def _check_custom_window(center: float, width: float) -> tuple[float, float]:
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
        raise InvalidRequestError(
            _window_help(f"A window width of {width:g} cannot be displayed (it must be >= 1)")
        )
    return (center, width)


def _window_help(what: str) -> str:
    names = ", ".join(WINDOW_PRESETS)
    return f"{what}: use a preset ({names}), 'minmax', or centre,width such as 40,400"


# ----------------------------------------------------------------------------- DICOM


def _load_dicom(
    src: _Source,
    frame: int | None,
    request: str | tuple[float, float] | None,
    limits: IngestLimits,
) -> LoadedImage:
    """Read the header, refuse early (no pixels, too large), decode one frame, display it."""
    ds = _read_header(src)
    _require_pixel_data(ds)
    rows, cols = _matrix(ds)
    if rows * cols > limits.max_pixels:
        raise TooLargeError(
            f"This DICOM image is {cols} x {rows} pixels, above the limit of "
            f"{limits.max_pixels:,} pixels per frame: export a smaller or downsampled image, "
            "or ask the administrator to raise the limit"
        )
    frames = _frame_count(ds)
    index = _frame_index(frame, frames, default=frames // 2)
    arr = _decode_frame(src, ds, index)
    rgb, window = _to_rgb8(arr, ds, index, request)
    facts = _dicom_facts(ds, rows, cols, frames, index, window)
    return LoadedImage(Image.fromarray(rgb, mode="RGB"), facts)


def _read_header(src: _Source):
    """Parse the dataset (forced: CD files often lack the preamble), deferring big values."""
    import pydicom

    try:
        ds = pydicom.dcmread(src.for_pydicom(), force=True, defer_size=_DEFER_BYTES)
    except Exception as exc:
        raise CorruptFileError(
            "This DICOM file is damaged or incomplete and its header cannot be read: copy or "
            "export it again from the CD or PACS"
        ) from exc
    if not _has_public_elements(ds):
        raise UnsupportedError(
            "This file is neither a DICOM nor a supported photo (PNG, JPEG, TIFF, BMP, WebP, "
            "GIF): choose the image file itself, e.g. the DICOM export from the PACS or CD"
        )
    return ds


def _has_public_elements(ds) -> bool:
    """Forced reads of random bytes give a few junk tags; real headers give dictionary tags."""
    from pydicom.datadict import dictionary_has_tag

    if getattr(ds, "preamble", None) is not None or "TransferSyntaxUID" in getattr(
        ds, "file_meta", {}
    ):
        return True
    known = [t for t in ds.keys() if not t.is_private and dictionary_has_tag(t)]
    return len(known) >= 2


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Non-image DICOM objects: (word in the SOP class name, modality, what it holds); first match.
_NON_IMAGE = [
    ("Structured Report", "SR", "a structured report"),
    ("Presentation State", "PR", "a presentation state (display settings)"),
    ("Structure Set", "RTSTRUCT", "a radiotherapy structure set (contours)"),
    ("Plan", "RTPLAN", "a radiotherapy plan"),
    ("Treatment Record", "RTRECORD", "a radiotherapy treatment record"),
    ("Waveform", "ECG", "a waveform (such as an ECG)"),
    ("Key Object", "KO", "a key object selection (a list of flagged images)"),
    ("Encapsulated PDF", "DOC", "an embedded PDF document"),
    ("Raw Data", "RAW", "raw scanner data"),
    ("Registration", "REG", "a registration (a spatial transform)"),
]


def _require_pixel_data(ds) -> None:
    """Explain what a pixel-less DICOM holds and which file to bring instead."""
    if any(k in ds for k in _PIXEL_KEYWORDS):
        return
    if "DirectoryRecordSequence" in ds or _sop_class_name(ds) == "Media Storage Directory Storage":
        raise NoPixelDataError(
            "This is a DICOMDIR (the index of a CD), not an image: open one of the image files "
            "it lists, usually inside the DICOM folder"
        )
    sop = _sop_class_name(ds)
    modality = str(ds.get("Modality", "") or "").upper()
    for sop_word, modality_code, what in _NON_IMAGE:
        if sop_word.lower() in sop.lower() or modality == modality_code:
            raise NoPixelDataError(
                f"This DICOM holds {what}, not an image: export the image series instead"
            )
    if "WaveformSequence" in ds:
        raise NoPixelDataError(
            "This DICOM holds a waveform (such as an ECG), not an image: export the image "
            "series instead"
        )
    raise NoPixelDataError(
        "This DICOM file contains no image data: export the image series instead (from a CD, "
        "choose the files inside the DICOM folder)"
    )


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    try:
        return str(uid.name) if uid else ""
    except Exception:
        return ""


def _matrix(ds) -> tuple[int, int]:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as exc:
        raise CorruptFileError(_damaged_header("image size (Rows/Columns)")) from exc
    if rows <= 0 or cols <= 0:
        raise CorruptFileError(_damaged_header("image size (Rows/Columns)"))
    return rows, cols


def _frame_count(ds) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        frames = int(value)
    except Exception as exc:
        raise CorruptFileError(_damaged_header("number of frames")) from exc
    return max(frames, 1)


def _damaged_header(what: str) -> str:
    return (
        f"This DICOM's header has an invalid {what}, so its image cannot be shown: export it "
        "again from the PACS or scanner"
    )


def _frame_index(frame: int | None, frames: int, default: int) -> int:
    if frame is None:
        return default
    if isinstance(frame, bool) or not isinstance(frame, int | np.integer):
        raise InvalidRequestError(f"The frame must be a whole number from 0 to {frames - 1}")
    if not 0 <= frame < frames:
        noun = "frame" if frames == 1 else "frames"
        raise InvalidRequestError(
            f"Frame {frame} does not exist: this image has {frames} {noun}; choose a frame "
            f"from 0 to {frames - 1}"
        )
    return int(frame)


def _transfer_syntax(ds):
    """The file's transfer syntax, or the encoding pydicom guessed for a file without one."""
    from pydicom.uid import (
        UID,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if ts:
        return UID(ts)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit in (None, True):
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little in (None, True) else ExplicitVRBigEndian


def _decode_frame(src: _Source, ds, index: int) -> np.ndarray:
    """Decode only frame `index`: read straight from the file, else from the parsed dataset."""
    from pydicom.pixels import pixel_array

    ts = _transfer_syntax(ds)
    try:
        stream = src.for_pydicom()
        return pixel_array(stream, index=index, transfer_syntax_uid=ts)
    except BaseException as exc:
        # e.g. a header whose encoding differs from the declared one: try the slow path
        _reraise_if_fatal(exc)
    try:
        if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
            from pydicom.dataset import FileMetaDataset

            ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ts
        return pixel_array(ds, index=index)
    except BaseException as exc:
        _reraise_if_fatal(exc)
        raise _decode_error(exc, ts) from exc


def _decode_error(exc: Exception, ts) -> IngestError:
    """Turn a decoder failure into what the clinician can do about it."""
    name = getattr(ts, "name", str(ts))
    text = str(exc)
    if isinstance(exc, NotImplementedError) or "not supported" in text:
        return UnsupportedError(
            f"This DICOM is encoded as '{name}', which cannot be decoded here: export it "
            "uncompressed (Explicit VR Little Endian) or as standard JPEG from the PACS"
        )
    if "less than expected" in text or "truncated" in text.lower() or "end of" in text.lower():
        return CorruptFileError(
            "This DICOM file is incomplete (its image data is cut short): copy it again from "
            "the CD or PACS"
        )
    if "Missing required element" in text or "invalid literal" in text:
        return CorruptFileError(_damaged_header("image description"))
    return CorruptFileError(
        f"The image data in this DICOM ('{name}') could not be decoded; the file may be "
        "damaged: export it again, uncompressed if possible"
    )


# ----------------------------------------------------------------------------- display mapping


def _to_rgb8(
    arr: np.ndarray, ds, index: int, request: str | tuple[float, float] | None
) -> tuple[np.ndarray, Window | None]:
    """Map one decoded frame to HxWx3 uint8; returns the window used (None for colour)."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return _colour_to_uint8(arr, ds), None
    if arr.ndim != 2:
        raise UnsupportedError(
            f"This DICOM stores {arr.shape[-1]} colour samples per pixel, which is not "
            "supported: export it as RGB or greyscale"
        )
    if photometric == "PALETTE COLOR":
        return _palette_to_rgb(arr, ds), None
    grey, window = _grey_to_uint8(arr, ds, index, request)
    return np.repeat(grey[:, :, None], 3, axis=2), window


def _colour_to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """RGB (YBR already converted by the decoder) at any bit depth -> uint8 by bit depth."""
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    bits = _as_int(ds.get("BitsStored")) or 0
    if not 1 <= bits <= arr.dtype.itemsize * 8:
        bits = arr.dtype.itemsize * 8
    scale = 255.0 / float(2**bits - 1)
    return np.clip(arr.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)


def _palette_to_rgb(arr: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(arr, ds)
    except Exception as exc:
        raise CorruptFileError(_damaged_header("colour palette")) from exc
    if rgb.dtype != np.uint8:
        # 16-bit LUT entries; some writers store 8-bit values in them.
        rgb = rgb.astype(np.float64) / (257.0 if rgb.max() > 255 else 1.0)
        rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return rgb


def _grey_to_uint8(
    arr: np.ndarray, ds, index: int, request: str | tuple[float, float] | None
) -> tuple[np.ndarray, Window]:
    """Modality LUT -> VOI LUT or window -> MONOCHROME1 inversion -> uint8."""
    values = _apply_modality(arr, ds, index)
    if values.dtype.kind == "f" and arr.dtype.kind == "f":  # Float Pixel Data may hold NaN/inf
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lut_item = _voi_lut_item(ds) if request in (None, "file") else None
    if lut_item is not None:
        out, window = _apply_voi_lut_table(values, ds, lut_item)
    else:
        window = _choose_window(values, ds, index, request)
        out = _apply_window(values, window)
    if _displays_inverted(ds):
        out = 1.0 - out
    return (out * 255.0 + 0.5).astype(np.uint8), window


def _frame_value(ds, index: int, sequence: str, keyword: str) -> Any:
    """An attribute from the top level, else the frame's functional group, else the shared one.

    Enhanced CT/MR keep rescale and window per frame, inside functional group sequences.
    """
    if keyword in ds:
        return ds.get(keyword)
    for groups_kw, item_index in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        try:
            group = ds.get(groups_kw)[item_index]
            return group.get(sequence)[0].get(keyword)
        except Exception:
            continue
    return None


def _apply_modality(arr: np.ndarray, ds, index: int) -> np.ndarray:
    """Stored values -> modality units (HU for CT) as float32."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        try:
            return apply_modality_lut(arr, ds).astype(np.float32)
        except Exception:
            pass  # a broken LUT: fall back to the stored values rather than refusing
    slope = _as_float(_frame_value(ds, index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _as_float(
        _frame_value(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    )
    values = arr.astype(np.float32)
    if slope not in (None, 0.0) and slope != 1.0:
        values *= slope
    if intercept not in (None, 0.0):
        values += intercept
    return values


def _voi_lut_item(ds):
    try:
        seq = ds.get("VOILUTSequence")
        return seq[0] if seq and "LUTData" in seq[0] and "LUTDescriptor" in seq[0] else None
    except Exception:
        return None


def _apply_voi_lut_table(values: np.ndarray, ds, item) -> tuple[np.ndarray, Window]:
    """Map through the file's VOI LUT; report it as the equivalent linear window.

    Done here rather than with pydicom's apply_voi, which wraps input values above 255 when
    the LUT has 8-bit entries.
    """
    entries = int(item.LUTDescriptor[0]) or 65536
    first = int(item.LUTDescriptor[1])
    lut = _lut_entries(item, ds)[:entries].astype(np.float32)
    if lut.size == 0:
        raise CorruptFileError(_damaged_header("VOI lookup table"))
    index = np.clip(np.nan_to_num(values) - first, 0, lut.size - 1).astype(np.int64)
    lo, hi = float(lut.min()), float(lut.max())
    out = (lut[index] - lo) / (hi - lo) if hi > lo else np.zeros(values.shape, np.float32)
    return out, Window(first + entries / 2.0, float(entries), "file", "VOI_LUT")


def _lut_entries(item, ds) -> np.ndarray:
    """LUT Data as integers, whether stored as a US list or as OW bytes."""
    data = item.LUTData
    if isinstance(data, bytes):
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        return np.frombuffer(data, dtype="<u2" if little else ">u2").astype(np.int64)
    return np.asarray(_as_list(data), dtype=np.int64)


def _file_windows(ds, index: int = 0) -> list[dict[str, Any]]:
    """Every centre/width pair the file offers (multi-valued elements included)."""
    centers = _as_list(_frame_value(ds, index, "FrameVOILUTSequence", "WindowCenter"))
    widths = _as_list(_frame_value(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    names = _as_list(_frame_value(ds, index, "FrameVOILUTSequence", "WindowCenterWidthExplanation"))
    out = []
    for i, (c, w) in enumerate(zip(centers, widths, strict=False)):
        c, w = _as_float(c), _as_float(w)
        if c is None or w is None or not (math.isfinite(c) and math.isfinite(w)) or w < 1:
            continue
        name = str(names[i]) if i < len(names) and names[i] else None
        out.append({"center": c, "width": w, "explanation": name})
    return out


def _choose_window(
    values: np.ndarray, ds, index: int, request: str | tuple[float, float] | None
) -> Window:
    """Requested preset/custom window, else the file's first window, else min..max."""
    function = str(_frame_value(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR")
    if isinstance(request, tuple):
        return Window(request[0], request[1], "custom")
    if isinstance(request, str) and request in WINDOW_PRESETS:
        center, width = WINDOW_PRESETS[request]
        return Window(center, width, f"preset:{request}")
    offered = _file_windows(ds, index)
    if isinstance(request, str) and request.startswith("file"):
        pick = int(request[5:]) if request.startswith("file:") else 0
        if pick >= len(offered):
            raise InvalidRequestError(
                f"This image offers {len(offered)} window(s) of its own, so 'file:{pick}' does "
                "not exist: choose a preset or a centre,width such as 40,400"
            )
        return Window(offered[pick]["center"], offered[pick]["width"], "file", function.upper())
    if request is None and offered:
        return Window(offered[0]["center"], offered[0]["width"], "file", function.upper())
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return Window((lo + hi) / 2.0, hi - lo, "minmax", "MINMAX")


def _apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window functions, giving 0..1 floats."""
    c, w = window.center, window.width
    if window.function == "MINMAX":
        lo = c - w / 2.0
        out = (values - lo) / w if w > 0 else np.zeros_like(values)
    elif window.function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function == "LINEAR_EXACT":
        out = (values - c) / w + 0.5
    else:  # LINEAR
        out = (values - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def _displays_inverted(ds) -> bool:
    """MONOCHROME1 shows its minimum as white; an INVERSE presentation LUT flips it again."""
    mono1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    return mono1 != inverse


# ----------------------------------------------------------------------------- DICOM facts


def _dicom_facts(ds, rows: int, cols: int, frames: int, index: int, window) -> ImageFacts:
    ts = _transfer_syntax(ds)
    return ImageFacts(
        kind="dicom",
        format="DICOM",
        rows=rows,
        columns=cols,
        frames=frames,
        frame_index=index,
        photometric=_text(ds.get("PhotometricInterpretation")),
        modality=_text(ds.get("Modality")),
        body_part=_text(ds.get("BodyPartExamined")),
        study_description=_safe_description(ds, "StudyDescription"),
        series_description=_safe_description(ds, "SeriesDescription"),
        pixel_spacing=_pixel_spacing(ds, index),
        window=window.to_dict() if window else None,
        file_windows=_file_windows(ds, index),
        bits_stored=_as_int(ds.get("BitsStored")),
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


def _safe_description(ds, keyword: str) -> str | None:
    """A description, dropped when it repeats any identity value (free text leaks names)."""
    text = _text(ds.get(keyword))
    if not text:
        return None
    lowered = text.lower()
    for key in _IDENTITY_KEYWORDS:
        for token in _identity_tokens(ds.get(key)):
            if token in lowered:
                return None
    return text


def _identity_tokens(value: Any) -> list[str]:
    """Name components and whole values, lower-cased, long enough to matter (>= 3 chars)."""
    if value is None or value == "":
        return []
    from pydicom.multival import MultiValue

    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    tokens = []
    for v in values:
        text = str(v).lower()
        tokens.append(text)
        tokens.extend(text.replace("^", " ").replace(",", " ").split())
    return [t for t in tokens if len(t) >= 3]


def _pixel_spacing(ds, index: int) -> list[float] | None:
    value = _frame_value(ds, index, "PixelMeasuresSequence", "PixelSpacing")
    if value is None:
        value = ds.get("ImagerPixelSpacing")
    spacing = [_as_float(v) for v in _as_list(value)]
    return spacing if len(spacing) == 2 and None not in spacing else None


# ----------------------------------------------------------------------------- photos


def _load_photo(src: _Source, frame: int | None, limits: IngestLimits) -> LoadedImage:
    """Open lazily, check the size from the header, then decode one frame to RGB."""
    with src.stream() as f:
        try:
            img = Image.open(f, formats=PHOTO_FORMATS)
        except Image.DecompressionBombError as exc:
            raise _too_many_pixels(None, limits) from exc
        with img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise _too_many_pixels((width, height), limits)
            frames = int(getattr(img, "n_frames", 1) or 1)
            index = _frame_index(frame, frames, default=0)
            fmt = img.format or "image"
            try:
                if index:
                    img.seek(index)
                img.load()
            except Exception as exc:
                raise CorruptFileError(
                    f"This {fmt} file is damaged or incomplete (the image data ends early or "
                    "is invalid): copy or export it again from the original source"
                ) from exc
            mode = img.mode
            oriented = _exif_transpose(img)
            rgb, window = _photo_to_rgb(oriented)
    facts = ImageFacts(
        kind="photo",
        format=fmt,
        rows=rgb.height,
        columns=rgb.width,
        frames=frames,
        frame_index=index,
        photometric=mode,
        window=window.to_dict() if window else None,
        bits_stored=_photo_bits(mode),
    )
    return LoadedImage(rgb, facts)


def _too_many_pixels(size: tuple[int, int] | None, limits: IngestLimits) -> TooLargeError:
    dims = f" is {size[0]} x {size[1]} pixels," if size else ""
    return TooLargeError(
        f"This image{dims} above the limit of {limits.max_pixels:,} pixels (it could exhaust "
        "memory): use a smaller or downscaled image"
    )


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation so phone photos appear upright; ignore broken EXIF."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:
        return img


def _photo_to_rgb(img: Image.Image) -> tuple[Image.Image, Window | None]:
    """Any Pillow mode -> RGB; transparency on white; 16-bit and float scaled min..max."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        arr = np.asarray(img).astype(np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        arr = np.where(np.isfinite(arr), arr, lo)
        window = Window((lo + hi) / 2.0, hi - lo, "minmax", "MINMAX")
        grey = (_apply_window(arr, window) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB"), window
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), None
    return img.convert("RGB"), None


def _photo_bits(mode: str) -> int:
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F"):
        return 32
    return 1 if mode == "1" else 8


# ----------------------------------------------------------------------------- helpers


def _reraise_if_fatal(exc: BaseException) -> None:
    """Let Ctrl-C and exits through; anything else is a decoding failure.

    Rust-based decoders (pylibjpeg-rle, pyjpegls) panic on some corrupt input with
    pyo3's PanicException, which derives from BaseException, not Exception.
    """
    if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
        raise exc


def _size_text(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _as_float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except Exception:
        return None


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _json_safe(value: Any) -> Any:
    """Recursively convert numpy scalars, pydicom values and tuples into JSON types."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return str(value)
