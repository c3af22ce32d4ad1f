"""Reading a series upload: what a clinician sent at once -> its image DICOMs and what else it held.

Several files, `.zip` archives (opened one level deep, in memory) and a CD folder with its
DICOMDIR come in as bytes. The limits are enforced before anything is inflated or decoded
(total size, member count, a zip bomb's declared sizes), then every file's header is read once
and sorted: image DICOMs with the fields that order and check a series, the instances each
DICOMDIR lists, and counts of the rest (other files, objects without pixels, damaged files)
for the message. Grouping and ordering into series is `series`' concern.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dragonfly_med.imaging.dicom_decode import PIXEL_KEYWORDS, read_header, sop_class_name
from dragonfly_med.imaging.errors import (
    CorruptFileError,
    TooLargeError,
    UnsupportedError,
    size_text,
)
from dragonfly_med.imaging.facts import safe_description
from dragonfly_med.imaging.ingest import IngestLimits, Source, sniff
from dragonfly_med.imaging.values import as_int, text

# More members than any CD holds: an archive of millions of empty entries is a bomb too.
MAX_FILES = 20_000
# Files an operating system adds to archives and folders by itself; never the clinician's.
_OS_ARTEFACTS = (".ds_store", "thumbs.db", "desktop.ini")


@dataclass
class UploadedImage:
    """An image DICOM of the upload: its bytes and the header fields that order and check it."""

    data: bytes
    patient: str  # a hash of the patient's name and ID: tells patients apart, shows nothing
    study_uid: str
    series_uid: str
    sop_uid: str | None
    instance: int | None
    rows: int
    columns: int
    frames: int
    modality: str | None
    orientation: np.ndarray | None  # the 6 direction cosines
    position: np.ndarray | None  # Image Position (Patient), mm
    thickness: float | None
    series_number: int | None
    description: str | None  # de-identified


@dataclass
class Upload:
    """An upload's files by kind, before grouping."""

    images: list[UploadedImage] = field(default_factory=list)
    dicomdir: dict[str, set[str]] = field(default_factory=dict)  # series UID -> listed SOP UIDs
    has_dicomdir: bool = False
    not_dicom: dict[str, int] = field(default_factory=dict)  # what -> how many
    not_images: int = 0  # reports, presentation states, key objects...
    damaged: int = 0


def read_upload(sources: Sequence[bytes], limits: IngestLimits) -> Upload:
    """Every file of the upload (zips opened), within the limits, sorted by what its header says."""
    return _sort(_expand(sources, limits))


# ----------------------------------------------------------------------------- archives


def is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _expand(sources: Sequence[bytes], limits: IngestLimits) -> list[bytes]:
    """Every file of the upload, zips opened (one level), within the size and count limits."""
    files: list[bytes] = []
    total = 0
    for data in sources:
        members = _unzip(data, limits.max_file_bytes - total) if is_zip(data) else [bytes(data)]
        files += members
        total += sum(len(m) for m in members)
        if total > limits.max_file_bytes:
            raise _too_large(total, limits)
        if len(files) > MAX_FILES:
            raise TooLargeError(
                f"This upload holds more than {MAX_FILES:,} files: upload one series (or one study) at a time"
            )
    return files


def _unzip(data: bytes, budget: int) -> list[bytes]:
    """The members of a zip, in memory; sizes are checked from the directory before inflating.

    zipfile never returns more than a member's declared size (a lying header fails its CRC),
    so checking the declared total first bounds memory: a zip bomb is refused unopened.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptFileError(
            "This ZIP archive is damaged or incomplete: create it again (or copy it again) and upload it"
        ) from exc
    with archive:
        members = [i for i in archive.infolist() if not i.is_dir() and not _os_artefact(i.filename)]
        if len(members) > MAX_FILES:
            raise TooLargeError(f"This archive holds more than {MAX_FILES:,} files: put one series (or one study) in it")
        declared = sum(i.file_size for i in members)
        if declared > budget:
            raise TooLargeError(
                f"This archive expands to {size_text(declared)} (from {size_text(len(data))}), above what is "
                f"left of the upload limit ({size_text(max(budget, 0))}): put one series in it, or ask the "
                "administrator to raise --max-upload-mb. An archive that expands far beyond its size may be a "
                "zip bomb"
            )
        return [_read_member(archive, info) for info in members]


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    if info.flag_bits & 0x1:
        raise UnsupportedError(
            "This archive is password-protected: create it again without a password (or unzip it and upload "
            "the files)"
        )
    try:
        with archive.open(info) as member:
            return member.read(info.file_size + 1)
    except NotImplementedError as exc:
        raise UnsupportedError(
            "This archive uses a compression method that cannot be read here: create it again as a standard "
            "ZIP (deflate), or unzip it and upload the files"
        ) from exc
    except RuntimeError as exc:  # zipfile's "password required"
        raise UnsupportedError(
            "This archive is password-protected: create it again without a password (or unzip it and upload "
            "the files)"
        ) from exc
    except Exception as exc:
        raise CorruptFileError(
            "This ZIP archive is damaged (a file inside fails its check): create or copy it again and upload it"
        ) from exc


def _os_artefact(name: str) -> bool:
    """macOS resource forks and folder metadata, Windows thumbnails: added by the OS, not the user."""
    parts = name.replace("\\", "/").split("/")
    base = parts[-1].lower()
    return "__MACOSX" in parts or base.startswith("._") or base in _OS_ARTEFACTS


def _too_large(total: int, limits: IngestLimits) -> TooLargeError:
    return TooLargeError(
        f"These files are {size_text(total)} in all, above the limit of {size_text(limits.max_file_bytes)}: "
        "upload one series at a time, or ask the administrator to raise --max-upload-mb"
    )


# ----------------------------------------------------------------------------- sorting files


def _sort(files: list[bytes]) -> Upload:
    """Read each file's header: image DICOMs, DICOMDIRs, other DICOM objects, anything else."""
    found = Upload()
    for data in files:
        what = _kind(data)
        if what != "dicom":
            found.not_dicom[what] = found.not_dicom.get(what, 0) + 1
            continue
        try:
            ds = read_header(io.BytesIO(data))
        except UnsupportedError:
            found.not_dicom["unknown file"] = found.not_dicom.get("unknown file", 0) + 1
            continue
        except CorruptFileError:
            found.damaged += 1
            continue
        if "DirectoryRecordSequence" in ds:
            found.has_dicomdir = True
            _read_dicomdir(ds, found.dicomdir)
        elif any(k in ds for k in PIXEL_KEYWORDS):
            if _cut_short(ds, len(data)):
                found.damaged += 1
            else:
                found.images.append(_image(data, ds))
        elif "Image Storage" in sop_class_name(ds):  # an image whose pixel data was cut off
            found.damaged += 1
        else:
            found.not_images += 1
    return found


def _cut_short(ds, size: int) -> bool:
    """Pixel data declared longer than the bytes left in the file: a copy that did not finish.

    Checked from the header (offset + declared length), so a damaged slice is refused with the
    upload rather than failing later when the clinician slides to it."""
    from pydicom.dataelem import RawDataElement

    for keyword in PIXEL_KEYWORDS:
        if keyword in ds:
            raw = ds.get_item(keyword)
            if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF:  # encapsulated: undefined length
                return raw.value_tell + raw.length > size
    return False


def _kind(data: bytes) -> str:
    """'dicom', or a few words naming what else the file is (for the message)."""
    if not data:
        return "empty file"
    try:
        kind = sniff(Source(None, data, len(data)))
    except UnsupportedError as exc:
        message = str(exc)
        for word, name in (("ZIP", "ZIP archive"), ("PDF", "PDF document"), ("gzip", "compressed archive"),
                           ("HEI", "HEIC/HEIF photo"), ("NIfTI", "NIfTI volume")):
            if word in message:
                return name
        return "unknown file"
    return "dicom" if kind == "dicom" else "photo"


def _image(data: bytes, ds) -> UploadedImage:
    return UploadedImage(
        data=data,
        patient=hashlib.sha256(f"{ds.get('PatientName', '')}|{ds.get('PatientID', '')}".encode()).hexdigest(),
        study_uid=str(ds.get("StudyInstanceUID") or ""),
        series_uid=str(ds.get("SeriesInstanceUID") or ""),
        sop_uid=text(ds.get("SOPInstanceUID")),
        instance=as_int(ds.get("InstanceNumber")),
        rows=as_int(ds.get("Rows")) or 0,
        columns=as_int(ds.get("Columns")) or 0,
        frames=max(as_int(ds.get("NumberOfFrames")) or 1, 1),
        modality=text(ds.get("Modality")),
        orientation=_vector(ds.get("ImageOrientationPatient"), 6),
        position=_vector(ds.get("ImagePositionPatient"), 3),
        thickness=_float(ds.get("SliceThickness")),
        series_number=as_int(ds.get("SeriesNumber")),
        description=safe_description(ds, "SeriesDescription"),
    )


def _read_dicomdir(ds, listed: dict[str, set[str]]) -> None:
    """Series UID -> the SOP Instance UIDs its IMAGE records list, following the record offsets."""
    records = {getattr(r, "seq_item_tell", None): r for r in ds.DirectoryRecordSequence}
    for record in ds.DirectoryRecordSequence:
        if str(record.get("DirectoryRecordType", "")).strip() != "SERIES" or "SeriesInstanceUID" not in record:
            continue
        uids = listed.setdefault(str(record.SeriesInstanceUID), set())
        offset, seen = record.get("OffsetOfReferencedLowerLevelDirectoryEntity"), set()
        while offset and offset in records and offset not in seen:
            seen.add(offset)
            child = records[offset]
            if str(child.get("DirectoryRecordType", "")).strip() == "IMAGE" and child.get("ReferencedSOPInstanceUIDInFile"):
                uids.add(str(child.ReferencedSOPInstanceUIDInFile))
            offset = child.get("OffsetOfTheNextDirectoryRecord")


# ----------------------------------------------------------------------------- helpers


def _vector(value: Any, size: int) -> np.ndarray | None:
    try:
        values = [float(v) for v in value]
    except Exception:
        return None
    if len(values) != size or not all(math.isfinite(v) for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except Exception:
        return None
    return out if math.isfinite(out) else None
