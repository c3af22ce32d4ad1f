"""Image ingestion: any DICOM or photo a clinician brings -> 8-bit RGB pixels + safe facts.

One entry point, `load_image`, detects the input by content (never by file name), decodes a
single frame, maps it to display values and returns a PIL RGB image with the facts about it.
Anything it cannot turn into an image raises an `IngestError` whose message says what is wrong
and what the clinician can do about it; nothing else escapes.

This module checks the input (existence, size, what it is) and runs the steps, each in its own
module: `dicom_decode` (header, pixel-data checks, one frame's stored values), `windowing`
(stored values -> display: modality LUT, VOI LUT or window, MONOCHROME1, colour), `facts`
(what is safe to show, without patient identity) and `photo` (Pillow formats). The refusals
are in `errors`; whole series (zips, DICOMDIRs, many slices) in `series`.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from dragonfly_med.imaging.dicom_decode import (
    decode_frame,
    frame_count,
    matrix,
    read_header,
    require_pixel_data,
)
from dragonfly_med.imaging.errors import (
    CorruptFileError,
    EmptyFileError,
    IngestError,
    InvalidRequestError,
    MiB,
    TooLargeError,
    UnsupportedError,
    frame_index,
    reraise_if_fatal,
    size_text,
)
from dragonfly_med.imaging.facts import ImageFacts, dicom_facts
from dragonfly_med.imaging.photo import PHOTO_FORMATS, load_photo
from dragonfly_med.imaging.windowing import normalise_window, to_rgb8


@dataclass
class IngestLimits:
    """Refuse inputs above these sizes before decoding them (memory and time bombs)."""

    max_file_bytes: int = 512 * MiB
    max_pixels: int = 100_000_000  # per frame, rows x columns


@dataclass
class LoadedImage:
    image: Image.Image  # 8-bit RGB
    facts: ImageFacts


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
            request = normalise_window(window)
            src = Source.open(source, limits)
            kind = sniff(src)
            if kind == "dicom":
                return _load_dicom(src, frame, request, limits)
            with src.stream() as f:
                return LoadedImage(*load_photo(f, frame, limits.max_pixels))
    except IngestError:
        raise
    except MemoryError as exc:
        raise TooLargeError(
            "This image is too large to open on this machine: use a smaller image or export "
            "a single frame"
        ) from exc
    except BaseException as exc:  # the contract: callers only ever see IngestError
        reraise_if_fatal(exc)
        raise CorruptFileError(
            "This file could not be read as an image; it may be damaged: export or copy it "
            f"again from the original source ({type(exc).__name__})"
        ) from exc


# ----------------------------------------------------------------------------- input


@dataclass
class Source:
    """The bytes to read: a file on disk (read lazily) or bytes already in memory."""

    path: Path | None
    data: bytes | None
    size: int

    @classmethod
    def open(cls, source: Any, limits: IngestLimits) -> Source:
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
                f"The file is {size_text(src.size)}, above the limit of "
                f"{size_text(limits.max_file_bytes)}: choose a single image or series file, "
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


def sniff(src: Source) -> str:
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


def _pillow_recognises(src: Source) -> bool:
    """True when one of the allowed Pillow formats claims the file (header only)."""
    try:
        with src.stream() as f, Image.open(f, formats=PHOTO_FORMATS):
            return True
    except Image.DecompressionBombError:
        return True  # recognised; load_photo reports it as too large
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


# ----------------------------------------------------------------------------- DICOM


def _load_dicom(
    src: Source,
    frame: int | None,
    request: str | tuple[float, float] | None,
    limits: IngestLimits,
) -> LoadedImage:
    """Read the header, refuse early (no pixels, too large), decode one frame, display it."""
    ds = read_header(src.for_pydicom())
    require_pixel_data(ds)
    rows, cols = matrix(ds)
    if rows * cols > limits.max_pixels:
        raise TooLargeError(
            f"This DICOM image is {cols} x {rows} pixels, above the limit of "
            f"{limits.max_pixels:,} pixels per frame: export a smaller or downsampled image, "
            "or ask the administrator to raise the limit"
        )
    frames = frame_count(ds)
    index = frame_index(frame, frames, default=frames // 2)
    arr = decode_frame(src.for_pydicom(), ds, index)
    rgb, window = to_rgb8(arr, ds, index, request)
    facts = dicom_facts(ds, rows, cols, frames, index, window)
    return LoadedImage(Image.fromarray(rgb, mode="RGB"), facts)
