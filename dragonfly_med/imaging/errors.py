"""Every refusal the imaging package can make, in one place.

Callers catch one type, `IngestError`, whose text is a message for the clinician: what is wrong
and what to do about it. The subclasses say which kind of problem it was. The few checks and
message parts that several readers share (sizes, a damaged header, the frame asked for, letting
Ctrl-C through a decoder) live here too, so a DICOM, a photo and a series upload word the
same problem the same way.
"""

from __future__ import annotations

import numpy as np

MiB = 1024 * 1024


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


class InvalidSeriesError(IngestError):
    """Slices that do not make one series: mixed, missing, inconsistent sizes or orientations."""


def size_text(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def damaged_header(what: str) -> str:
    return (
        f"This DICOM's header has an invalid {what}, so its image cannot be shown: export it "
        "again from the PACS or scanner"
    )


def frame_index(frame: int | None, frames: int, default: int) -> int:
    """The frame the caller asked for (0-based), or `default`; a wrong one is refused."""
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


def reraise_if_fatal(exc: BaseException) -> None:
    """Let Ctrl-C and exits through; anything else is a decoding failure.

    Rust-based decoders (pylibjpeg-rle, pyjpegls) panic on some corrupt input with
    pyo3's PanicException, which derives from BaseException, not Exception.
    """
    if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
        raise exc
