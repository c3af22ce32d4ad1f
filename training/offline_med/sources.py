"""The offline medical sources, their known facts, and the 2D views derived from them.

A `Source` is the unit of the train/val/test split: one image file (with its re-encodings), one
cine clip or one volume. Its split is fixed here, by hand, so that every split gets what the
few available sources allow (see docs/offline-med.md); nothing derived from a source ever
leaves its split. Facts (modality, region, plane, window, orientation) come from the file's
metadata or from how we slice and render it, never from a model.
"""

from __future__ import annotations

import plistlib
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from training.offline_med.render import WINDOWS, apply_window, autocontrast
from training.offline_med.simulated_fundus import simulate_fundus

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
DISPLAY_SIDE = 384  # longest side of ordinary views; fine-detail canvases are made larger later


@dataclass
class View:
    """One 2D image with everything known about it."""

    source: str
    image: Image.Image
    modality: str
    body_region: str | None
    plane: str | None = None
    window: str | None = None
    midline_x: float | None = None  # image column of the patient's midline, radiological display
    atlas: np.ndarray | None = field(default=None, repr=False)  # AAL label index per pixel


@dataclass(frozen=True)
class Scale:
    """How much to derive from each source: `small` for tests, `full` for training."""

    name: str
    views_2d: int  # augmented crops per 2D source
    slices: int  # slices per plane per volume
    fine_detail: dict[str, int]  # fine-detail canvases per split
    canvas: tuple[int, int]  # side range of fine-detail canvases (px)


SCALES = {
    "small": Scale("small", views_2d=2, slices=2, fine_detail={"train": 12, "val": 4, "test": 8}, canvas=(1344, 1600)),
    "full": Scale("full", views_2d=24, slices=16, fine_detail={"train": 480, "val": 60, "test": 160}, canvas=(1344, 1792)),
}


@dataclass(frozen=True)
class Source:
    """A split unit: where it is, which split it belongs to, its facts, how to view it."""

    id: str
    split: str
    modality: str
    body_region: str | None
    make_views: Callable[[Source, random.Random, Scale], Iterator[View]]
    path: Path | None
    plane: str | None = None
    atlas: bool = False  # labelled by the AAL atlas (Colin27 is the brain AAL was drawn on)


# ---------------------------------------------------------------- 2D images


def fit(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Resize so the longest side is `side` (small DICOMs are enlarged so marks stay drawable)."""
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random 85-100% crop and a mild contrast change, so repeated views of a source differ."""
    w, h = image.size
    cw, ch = round(w * rng.uniform(0.85, 1.0)), round(h * rng.uniform(0.85, 1.0))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = np.asarray(image.crop((x0, y0, x0 + cw, y0 + ch)), dtype=np.float32)
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-10, 10)
    return fit(Image.fromarray(np.clip(crop * gain + offset, 0, 255).astype(np.uint8)))


def read_dicom(path: Path) -> tuple[np.ndarray, object]:
    """Pixel data as displayable values (HU for CT, RGB for colour), and the dataset."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif ds.get("PhotometricInterpretation") == "MONOCHROME1":  # radiographs stored white-is-low
        pixels = pixels.max() - pixels
    elif ds.get("Modality") == "CT":
        pixels = apply_modality_lut(pixels, ds)
    return pixels, ds


def read_frames(path: Path) -> tuple[np.ndarray, object]:
    """The frames of a cine clip, the slices of a series folder (ordered by InstanceNumber,
    outer fifth of each end dropped: mostly air), or one image as a single frame."""
    if not path.is_dir():
        pixels, ds = read_dicom(path)
        return (pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]), ds
    slices = sorted((read_dicom(p) for p in path.glob("*.dcm")), key=lambda s: int(s[1].get("InstanceNumber", 0) or 0))
    keep = slices[len(slices) // 5: len(slices) - len(slices) // 5] or slices
    return np.stack([pixels for pixels, _ in keep]), keep[0][1]


def dicom_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Views of a DICOM file or series folder: CT in each named window, other modalities
    auto-contrasted, cine clips and series by frame."""
    frames, _ = read_frames(source.path)
    windows = list(WINDOWS)
    for i in range(scale.views_2d):
        frame = frames[rng.randrange(len(frames))]
        window = windows[i % len(windows)] if source.modality == "CT" else None
        image = apply_window(frame, window) if window else autocontrast(frame)
        yield View(source.id, jitter(fit(image), rng), source.modality, source.body_region, source.plane, window)


def photo_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Views of a photograph (histology) or of a slice saved as PNG."""
    image = fit(Image.open(source.path).convert("RGB"), 2 * DISPLAY_SIDE)
    for _ in range(scale.views_2d):
        yield View(source.id, jitter(image, rng), source.modality, source.body_region, source.plane)


def slide_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Fields of view of a whole-slide image (an .svs pyramid read with tifffile; JPEG tiles
    need imagecodecs): random regions of 20-45% of the slide's shorter side, as a pathologist
    pans over it."""
    import tifffile

    with tifffile.TiffFile(source.path) as slide:
        pixels = slide.series[0].asarray()
    photo = Image.fromarray(pixels).convert("RGB")
    for _ in range(scale.views_2d):
        side = round(min(photo.size) * rng.uniform(0.2, 0.45))
        x0, y0 = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        region = fit(photo.crop((x0, y0, x0 + side, y0 + side)))
        yield View(source.id, jitter(region, rng), source.modality, source.body_region)


def mosaic_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float], list[np.ndarray]]:
    """A Siemens EPI mosaic (one DICOM holding every slice as a tile) as a RAS volume, its
    (x, y, z) voxel size in mm, and the tiles as stored. The tile count is the private
    NumberOfImagesInMosaic (0019,100A); tile rows run to the patient's posterior and columns to
    the left (ImageOrientationPatient of these axial scans), tiles are stored inferior first."""
    pixels, ds = read_dicom(path)
    count = int(ds[0x0019, 0x100A].value)
    per_row = int(np.ceil(np.sqrt(count)))
    rows, cols = pixels.shape[0] // per_row, pixels.shape[1] // per_row
    tiles = [pixels[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols] for r in range(per_row) for c in range(per_row)][:count]
    stacked = np.stack(tiles, axis=-1).astype(np.float32)  # (posterior, left, superior)
    ras = stacked.transpose(1, 0, 2)[::-1, ::-1, :]
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    slice_mm = float(ds.get("SpacingBetweenSlices") or ds.SliceThickness)
    return np.ascontiguousarray(ras), (col_mm, row_mm, slice_mm), tiles


def mosaic_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Axial slices of an EPI mosaic (tiles from the middle half, as acquired), then coronal and
    sagittal reformats of its volume: thin, coarse slabs like the EPI reformats a viewer shows.
    The reformats are there for their plane; their body region is not asked (None), since head
    MRI is already most of the training MRI and a region question on them would add to that."""
    volume, zooms, tiles = mosaic_volume(source.path)
    middle = tiles[len(tiles) // 4: len(tiles) - len(tiles) // 4]
    for _ in range(scale.views_2d):
        tile = middle[rng.randrange(len(middle))]
        yield View(source.id, jitter(fit(autocontrast(tile)), rng), source.modality, source.body_region, "axial")
    yield from reformat_views(source, volume, zooms, ("coronal", "sagittal"), scale.slices, rng)


def red_free(image: Image.Image) -> Image.Image:
    """The green channel, contrast-stretched: how ophthalmologists view vessels and
    microaneurysms (a 'red-free' fundus photograph)."""
    return autocontrast(np.asarray(image.convert("RGB"))[..., 1]).convert("RGB")


def fundus_rendering(photo: Image.Image, index: int, rng: random.Random) -> Image.Image:
    """A fundus photograph as clinics show it, in turn by `index`: in colour, red-free, and
    red-free zoomed on a patch of the retina (only where the photo has the pixels for it)."""
    rendering = index % 3
    image = photo if rendering == 0 else red_free(photo)
    patch = round(min(photo.size) * rng.uniform(0.15, 0.4))
    if rendering == 2 and patch >= DISPLAY_SIDE // 2:
        x0, y0 = (rng.randint(round(0.2 * n), round(0.8 * n) - patch) for n in photo.size)
        image = image.crop((x0, y0, x0 + patch, y0 + patch))
    return jitter(fit(image), rng)


def fundus_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Views of a fundus photograph: colour, red-free, red-free zoomed."""
    photo = Image.open(source.path).convert("RGB")
    for i in range(scale.views_2d):
        yield View(source.id, fundus_rendering(photo, i, rng), source.modality, source.body_region)


def simulated_fundus_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Views of simulated eyes (training/offline_med/simulated_fundus.py), a new eye per view,
    rendered as real fundus photographs are."""
    for i in range(scale.views_2d):
        photo = simulate_fundus(rng, side=2 * DISPLAY_SIDE)
        yield View(source.id, fundus_rendering(photo, i, rng), source.modality, source.body_region)


# ---------------------------------------------------------------- volumes


def display_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A slice of a RAS-oriented volume in radiological display orientation.

    Axial and coronal: patient's left on the image's right; anterior (axial) or superior
    (coronal, sagittal) at the top; sagittal: anterior on the left.
    """
    if plane == "axial":
        return volume[::-1, ::-1, index].T
    if plane == "coronal":
        return volume[::-1, index, ::-1].T
    return volume[index, ::-1, ::-1].T


PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
PLANE_SPACING = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}  # (row axis, column axis)


def head_mask(volume: np.ndarray) -> np.ndarray:
    """Voxels brighter than a fifth of the 99th percentile: the head, not the air around it."""
    return volume > 0.2 * np.percentile(volume, 99)


def slice_indices(mask: np.ndarray, plane: str, n: int, rng: random.Random) -> list[int]:
    """`n` slice positions spread over the slices that hold at least 30% of the peak object area."""
    axis = PLANE_AXIS[plane]
    area = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    good = np.nonzero(area >= 0.3 * area.max())[0]
    edges = np.linspace(0, len(good), n + 1)
    return [int(good[rng.randrange(int(lo), max(int(lo) + 1, int(hi)))]) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def to_display(values: np.ndarray, spacing: tuple[float, float], resample: int = Image.BICUBIC) -> Image.Image:
    """Resize a 2D slice so pixels are square (physical aspect) with the longest side DISPLAY_SIDE."""
    rows, cols = values.shape
    height, width = rows * spacing[0], cols * spacing[1]
    scale = DISPLAY_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(np.ascontiguousarray(values)).resize(size, resample)


def reformat_views(source: Source, volume: np.ndarray, spacing: tuple[float, float, float], planes: tuple[str, ...], n: int, rng: random.Random) -> Iterator[View]:
    """`n` slices per plane of a RAS head volume of voxel size `spacing`, at the physical aspect
    and auto-contrasted, with no region (the heads these come from need no more region questions)."""
    mask = head_mask(volume)
    for plane in planes:
        rows_axis, cols_axis = PLANE_SPACING[plane]
        for index in slice_indices(mask, plane, n, rng):
            values = display_slice(volume, plane, index)
            image = to_display(np.asarray(autocontrast(values)), (spacing[rows_axis], spacing[cols_axis]))
            yield View(source.id, image, source.modality, None, plane)


def read_inv3(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The CT volume of an InVesalius project: (z, y, x) int16 HU and (x, y, z) spacing in mm.

    Shape, dtype and spacing come from the project's main.plist, never from assumptions.
    """
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        meta = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        matrix = meta["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    volume = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"])).reshape(matrix["shape"])
    return volume, tuple(float(s) for s in meta["spacing"])


def ct_volume_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Axial, coronal and sagittal slices of the InVesalius head CT in each CT window.

    The file stores (z, y, x) with z from inferior to superior and y from posterior to anterior,
    so (x, y, z) is RAS-like and displays anterior-up, superior-up. Its left-right convention
    is not recorded, so no laterality is claimed for it (midline_x stays None).
    """
    zyx, (sx, sy, sz) = read_inv3(source.path)
    ras_like = zyx.transpose(2, 1, 0)
    mask = ras_like > -300
    spacing = {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}
    windows = list(WINDOWS)
    for plane in PLANE_AXIS:
        for i, index in enumerate(slice_indices(mask, plane, scale.slices, rng)):
            window = windows[(i + len(plane)) % len(windows)]
            hu = display_slice(ras_like, plane, index)
            image = to_display(np.asarray(apply_window(hu, window)), spacing[plane])
            yield View(source.id, image, source.modality, source.body_region, plane, window)


def radiograph_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Digitally reconstructed radiographs of the InVesalius head CT, frontal (beam front to
    back) and lateral: attenuation summed along the beam, bone (HU above 0) weighted over soft
    tissue as X-ray energies make it, shown bone-bright at the physical aspect."""
    zyx, (sx, sy, sz) = read_inv3(source.path)
    hu = zyx.astype(np.float32)
    soft, bone = np.clip(hu + 1000, 0, 1000) / 1000, np.clip(hu, 0, None) / 1000
    # line integrals are linear in the weights: project each part once, weight per view
    frontal = (soft.sum(axis=1) * sy, bone.sum(axis=1) * sy, (sz, sx))  # (z, x)
    lateral = (soft.sum(axis=2) * sx, bone.sum(axis=2) * sx, (sz, sy))  # (z, y)
    for i in range(scale.views_2d):
        bone_weight = rng.uniform(2.0, 4.0)
        soft_path, bone_path, spacing = lateral if i % 2 else frontal
        path = soft_path + bone_weight * bone_path
        image = to_display(np.asarray(autocontrast(path[::-1])), spacing)
        yield View(source.id, jitter(image, rng), source.modality, source.body_region)


def voxel_size(affine: np.ndarray) -> tuple[float, float, float]:
    """The (x, y, z) voxel size in mm of an affine's axes."""
    x, y, z = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return float(x), float(y), float(z)


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D volume in RAS orientation and its affine (first volume of a 4D series)."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    return (data[..., 0] if data.ndim == 4 else data), image.affine


def atlas_lookup(t1_affine: np.ndarray, atlas: np.ndarray, atlas_affine: np.ndarray, shape: tuple[int, ...], plane: str, index: int) -> np.ndarray:
    """AAL label of every voxel of one T1 slice, by world coordinates (nearest neighbour)."""
    grids = [np.arange(n) for n in shape]
    grids[PLANE_AXIS[plane]] = np.array([index])
    ijk = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ t1_affine[:3, :3].T + t1_affine[:3, 3]
    vox = np.rint((world - atlas_affine[:3, 3]) @ np.linalg.inv(atlas_affine[:3, :3]).T).astype(int)
    inside = np.all((vox >= 0) & (vox < atlas.shape), axis=1)
    labels = np.zeros(len(vox), dtype=np.int16)
    labels[inside] = atlas[tuple(vox[inside].T)]
    slab = [len(g) for g in grids]
    return labels.reshape(slab)


def mri_volume_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Axial, coronal and sagittal slices of a brain MRI, with the midline and (for Colin27)
    the AAL label of every pixel."""
    volume, affine = load_nifti(source.path)
    zooms = voxel_size(affine)
    mask = head_mask(volume)
    atlas, atlas_affine = load_atlas() if source.atlas else (None, None)
    if source.atlas:
        midline_i = -affine[0, 3] / affine[0, 0]  # world x = 0 in MNI space
    else:
        midline_i = float(np.nonzero(mask)[0].mean())  # centre of mass of the head
    for plane in PLANE_AXIS:
        rows_axis, cols_axis = PLANE_SPACING[plane]
        spacing = (zooms[rows_axis], zooms[cols_axis])
        for index in slice_indices(mask, plane, scale.slices, rng):
            values = display_slice(volume, plane, index)
            image = to_display(np.asarray(autocontrast(values)), spacing)
            midline = None
            if plane != "sagittal":
                midline = (volume.shape[0] - 1 - midline_i + 0.5) * image.width / values.shape[1]
            labels = None
            if atlas is not None:
                slab = atlas_lookup(affine, atlas, atlas_affine, volume.shape, plane, index)
                labels = np.asarray(to_display(display_slice(slab, plane, 0).astype(np.int32), spacing, Image.NEAREST))
            yield View(source.id, image, source.modality, source.body_region, plane, None, midline, labels)


def load_atlas() -> tuple[np.ndarray, np.ndarray]:
    """The AAL label volume (RAS) and its affine."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(MRICRON_TEMPLATES / "aal.nii.gz"))
    return np.asarray(image.dataobj).astype(np.int16), image.affine


def aal_names() -> dict[int, str]:
    """AAL index -> readable name, e.g. 'Temporal_Mid_L' -> 'left middle temporal gyrus'."""
    names = {}
    for line in (MRICRON_TEMPLATES / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = readable_region(parts[1])
    return names


AAL_BASE = {
    "Amygdala": "amygdala", "Angular": "angular gyrus", "Calcarine": "calcarine cortex",
    "Caudate": "caudate nucleus", "Cingulum_Ant": "anterior cingulate gyrus",
    "Cingulum_Mid": "middle cingulate gyrus", "Cingulum_Post": "posterior cingulate gyrus",
    "Cuneus": "cuneus", "Frontal_Inf_Oper": "inferior frontal gyrus, opercular part",
    "Frontal_Inf_Orb": "inferior frontal gyrus, orbital part",
    "Frontal_Inf_Tri": "inferior frontal gyrus, triangular part",
    "Frontal_Med_Orb": "medial orbitofrontal cortex", "Frontal_Mid": "middle frontal gyrus",
    "Frontal_Mid_Orb": "middle frontal gyrus, orbital part", "Frontal_Sup": "superior frontal gyrus",
    "Frontal_Sup_Medial": "medial superior frontal gyrus",
    "Frontal_Sup_Orb": "superior frontal gyrus, orbital part", "Fusiform": "fusiform gyrus",
    "Heschl": "Heschl's gyrus", "Hippocampus": "hippocampus", "Insula": "insula",
    "Lingual": "lingual gyrus", "Occipital_Inf": "inferior occipital gyrus",
    "Occipital_Mid": "middle occipital gyrus", "Occipital_Sup": "superior occipital gyrus",
    "Olfactory": "olfactory cortex", "Pallidum": "globus pallidus",
    "ParaHippocampal": "parahippocampal gyrus", "Paracentral_Lobule": "paracentral lobule",
    "Parietal_Inf": "inferior parietal lobule", "Parietal_Sup": "superior parietal lobule",
    "Postcentral": "postcentral gyrus", "Precentral": "precentral gyrus", "Precuneus": "precuneus",
    "Putamen": "putamen", "Rectus": "gyrus rectus", "Rolandic_Oper": "rolandic operculum",
    "Supp_Motor_Area": "supplementary motor area", "SupraMarginal": "supramarginal gyrus",
    "Temporal_Inf": "inferior temporal gyrus", "Temporal_Mid": "middle temporal gyrus",
    "Temporal_Pole_Mid": "temporal pole of the middle temporal gyrus",
    "Temporal_Pole_Sup": "temporal pole of the superior temporal gyrus",
    "Temporal_Sup": "superior temporal gyrus", "Thalamus": "thalamus",
}


def readable_region(name: str) -> str:
    """Plain words for an AAL label, hemisphere first; cerebellar lobules keep their numbers."""
    base, _, suffix = name.rpartition("_")
    side = {"L": "left", "R": "right"}.get(suffix)
    base = base if side else name
    if base.startswith(("Cerebelum_", "Vermis_")):
        part, _, lobule = base.partition("_")
        lobule = lobule.replace("_", "-")
        lobule = f"crus {lobule[4:]}" if lobule.startswith("Crus") else f"lobule {lobule}"
        text = f"{'cerebellar' if part == 'Cerebelum' else 'vermis'} {lobule}"
    else:
        text = AAL_BASE.get(base, base.replace("_", " ").lower())
    return f"{side} {text}" if side else text


# ---------------------------------------------------------------- simulated EPI slabs


SLAB_MM = (40.0, 70.0)  # head coverage of a partial-coverage EPI or fMRI acquisition
SLAB_SPACING_MM = (2.0, 4.0)  # its slice spacing
SLAB_PIXEL_MM = (2.0, 3.5)  # its in-plane pixel size
SLABS_PER_VOLUME = 4


def block_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Average over blocks of `factors` voxels (the partial-volume effect of larger voxels)."""
    shape = [s // f for s, f in zip(volume.shape, factors, strict=True)]
    cropped = volume[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    return cropped.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).mean(axis=(1, 3, 5))


def head_extent(volume: np.ndarray) -> tuple[int, int]:
    """The first and last axial slice holding any of the head."""
    filled = np.nonzero(head_mask(volume).sum(axis=(0, 1)))[0]
    return int(filled.min()), int(filled.max())


def simulated_slab(volume: np.ndarray, zooms: tuple[float, float, float], extent: tuple[int, int], rng: random.Random) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A partial-coverage EPI-like slab of a RAS head volume whose head spans the axial slices
    `extent` (`head_extent`): 40-70 mm of it around the middle of the head, resampled to 2-4 mm
    slices and 2-3.5 mm pixels. Its coronal and sagittal reformats are the thin, wide strips a
    viewer shows for such a series."""
    in_plane = max(1, round(rng.uniform(*SLAB_PIXEL_MM) / zooms[0]))
    through = max(1, round(rng.uniform(*SLAB_SPACING_MM) / zooms[2]))
    low, high = extent
    centre = rng.uniform(low + 0.35 * (high - low), low + 0.65 * (high - low))
    half = rng.uniform(*SLAB_MM) / zooms[2] / 2
    start, stop = max(0, round(centre - half)), min(volume.shape[2], round(centre + half))
    slab = block_mean(volume[:, :, start:stop], (in_plane, in_plane, through))
    return slab, (zooms[0] * in_plane, zooms[1] * in_plane, zooms[2] * through)


def head_volume(source: Source) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A RAS head volume and its voxel size, from a NIfTI file or an EPI mosaic."""
    if source.path.suffix == ".dcm":
        volume, zooms, _ = mosaic_volume(source.path)
        return volume, zooms
    volume, affine = load_nifti(source.path)
    return volume, voxel_size(affine)


def slab_views(source: Source, rng: random.Random, scale: Scale) -> Iterator[View]:
    """Axial, coronal and sagittal slices of simulated partial-coverage EPI slabs of a training
    head volume (`simulated_slab`), a few slabs per volume. The region is not asked (heads, as
    most training MRI is already)."""
    volume, zooms = head_volume(source)
    yield from volume_slab_views(source, volume, zooms, rng, scale)


def volume_slab_views(source: Source, volume: np.ndarray, zooms: tuple[float, float, float], rng: random.Random, scale: Scale) -> Iterator[View]:
    """`slab_views` of a volume already loaded: `scale.slices` slices per plane in all."""
    per_slab = max(1, scale.slices // SLABS_PER_VOLUME)
    extent = head_extent(volume)
    for _ in range(SLABS_PER_VOLUME):
        slab, spacing = simulated_slab(volume, zooms, extent, rng)
        yield from reformat_views(source, slab, spacing, tuple(PLANE_AXIS), per_slab, rng)
