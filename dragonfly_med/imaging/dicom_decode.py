"""Reading a DICOM: the header, what it says about its pixels, and decoding one frame.

Everything between the file's bytes and a numpy array of stored values lives here, with the
refusals that belong to that step: a header that cannot be read, an object without pixels
(and which file to bring instead), an invalid size or frame count, a transfer syntax without a
decoder, pixel data cut short. What the values look like on screen is `windowing`'s concern.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np

from dragonfly_med.imaging.errors import (
    CorruptFileError,
    IngestError,
    MiB,
    NoPixelDataError,
    UnsupportedError,
    damaged_header,
    reraise_if_fatal,
)

# Elements larger than this stay on disk until asked for: pixel data of a 1000-frame file is
# never read just to look at its header.
_DEFER_BYTES = 4 * MiB

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

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


def read_header(file: str | BinaryIO):
    """Parse the dataset (forced: CD files often lack the preamble), deferring big values.

    file: a path (pydicom reopens it for deferred elements) or a binary stream.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(file, force=True, defer_size=_DEFER_BYTES)
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


def require_pixel_data(ds) -> None:
    """Explain what a pixel-less DICOM holds and which file to bring instead."""
    if any(k in ds for k in PIXEL_KEYWORDS):
        return
    if "DirectoryRecordSequence" in ds or sop_class_name(ds) == "Media Storage Directory Storage":
        raise NoPixelDataError(
            "This is a DICOMDIR (the index of a CD), not an image: open one of the image files "
            "it lists, usually inside the DICOM folder"
        )
    sop = sop_class_name(ds)
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


def sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    try:
        return str(uid.name) if uid else ""
    except Exception:
        return ""


def matrix(ds) -> tuple[int, int]:
    """(rows, columns) of one frame."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as exc:
        raise CorruptFileError(damaged_header("image size (Rows/Columns)")) from exc
    if rows <= 0 or cols <= 0:
        raise CorruptFileError(damaged_header("image size (Rows/Columns)"))
    return rows, cols


def frame_count(ds) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        frames = int(value)
    except Exception as exc:
        raise CorruptFileError(damaged_header("number of frames")) from exc
    return max(frames, 1)


def frame_value(ds, index: int, sequence: str, keyword: str) -> Any:
    """An attribute from the top level, else the frame's functional group, else the shared one.

    Enhanced CT/MR keep rescale, window and pixel spacing per frame, inside functional group
    sequences.
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


def transfer_syntax(ds):
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


def decode_frame(file: str | BinaryIO, ds, index: int) -> np.ndarray:
    """Decode only frame `index`: read straight from the file, else from the parsed dataset.

    file: the path or a fresh stream of the bytes `ds` was read from.
    """
    from pydicom.pixels import pixel_array

    ts = transfer_syntax(ds)
    try:
        return pixel_array(file, index=index, transfer_syntax_uid=ts)
    except BaseException as exc:
        # e.g. a header whose encoding differs from the declared one: try the slow path
        reraise_if_fatal(exc)
    try:
        if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
            from pydicom.dataset import FileMetaDataset

            ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ts
        return pixel_array(ds, index=index)
    except BaseException as exc:
        reraise_if_fatal(exc)
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
        return CorruptFileError(damaged_header("image description"))
    return CorruptFileError(
        f"The image data in this DICOM ('{name}') could not be decoded; the file may be "
        "damaged: export it again, uncompressed if possible"
    )
