"""Image -> crops for Dragonfly's multi-resolution zoom-in encoding.

The released pipeline resized each canvas with PIL and then ran CLIP's image processor on every
one of the 41 tiles. Here each canvas (low, medium, high) is resized ONCE with torch's uint8
anti-aliased bicubic kernel (PIL-compatible, a = -0.5, within 2 grey levels of PIL, ~5x faster on
a 12 MP photo), tiled by a reshape and normalised by one vectorised multiply-add over all tiles.
Every size comes from the `Geometry`; nothing assumes 336 px or 41 crops.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from dragonfly_med.model.geometry import CropPlan, Geometry, plan_crops

EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a photo is to be turned for display
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# EfficientNet-Lite0 was trained on (x - 127) / 128 with x in 0..255, i.e. this after x / 255.
LITE0_MEAN = (127 / 255, 127 / 255, 127 / 255)
LITE0_STD = (128 / 255, 128 / 255, 128 / 255)
NORMALIZATION = {"clip": (CLIP_MEAN, CLIP_STD), "efficientnet-lite0": (LITE0_MEAN, LITE0_STD)}

ImageLike = Image.Image | np.ndarray | torch.Tensor


def normalization_for(vision_config: Any) -> dict[str, tuple[float, ...]]:
    """image_mean / image_std of a vision tower, by its config's model_type."""
    model_type = str(getattr(vision_config, "model_type", vision_config))
    key = "efficientnet-lite0" if "efficientnet" in model_type else "clip"
    mean, std = NORMALIZATION[key]
    return {"image_mean": mean, "image_std": std}


def to_rgb(image: ImageLike) -> Image.Image:
    """Any PIL image or array -> 8-bit RGB as a viewer would show it.

    EXIF orientation is applied; transparency is composited on white (a transparent background
    must not turn black); 16-bit data is scaled by its full range rather than clipped at 255
    (PIL's own `convert("L")` clips a 16-bit scan to near white).
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return to_rgb(_array_to_pil(image))
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _array_to_pil(np.asarray(image))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """Arrays: uint8 as is, 16-bit / int by the 16-bit range, floats in [0, 1] (else 0..255)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first input
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            scale = 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 1.0
            array = np.nan_to_num(array.astype(np.float64) * scale)
        elif array.dtype.itemsize > 1:
            array = array.astype(np.float64) / 257.0  # 0..65535 -> 0..255
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot read an image array of shape {array.shape}")
    return Image.fromarray(array)  # uint8: L, RGB or RGBA by shape


@dataclass
class _Canvas:
    """One resized canvas cut into `cols x rows` tiles of R x R."""

    pixels: torch.Tensor  # uint8 [1, 3, rows * R, cols * R], channels_last
    cols: int
    rows: int


class DragonflyImageProcessor(BaseImageProcessor):
    """Image -> `pixel_values[n_crops, 3, R, R]` in model order (low, medium row-major, high
    row-major), plus the `CropPlan` that decided them.

    Saved as `preprocessor_config.json` with the geometry (a `Geometry` dict) and the tower's
    normalisation; `from_clip_config` builds one from the released checkpoint's plain CLIP file.
    """

    model_input_names = ["pixel_values", "num_crops", "image_sizes"]

    def __init__(
        self,
        geometry: dict | Geometry | None = None,
        image_mean: tuple[float, ...] | list[float] = CLIP_MEAN,
        image_std: tuple[float, ...] | list[float] = CLIP_STD,
        rescale_factor: float = 1 / 255,
        resample: str = "bicubic",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if geometry is None:  # the released geometry, derived from its CLIP tower's config
            from dragonfly_med.model.configuration_dragonfly import named_geometry

            geometry = named_geometry("dragonfly-med-v2")
        self.geometry = geometry.to_dict() if isinstance(geometry, Geometry) else dict(geometry)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.rescale_factor = float(rescale_factor)
        if resample != "bicubic":
            raise ValueError("only bicubic resampling is supported (the released pipeline's)")
        self.resample = resample
        self._geometry = Geometry.from_dict(self.geometry)
        self._scale, self._shift = self._affine()

    # ----------------------------------------------------------------- configuration

    @property
    def geometry_obj(self) -> Geometry:
        return self._geometry

    @property
    def crop_size(self) -> int:
        return self._geometry.crop_size

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, shift) with (x * rescale - mean) / std = x * scale + shift."""
        mean, std = np.asarray(self.image_mean), np.asarray(self.image_std)
        scale = (self.rescale_factor / std).astype(np.float32).reshape(1, 1, 3, 1, 1)
        shift = (-mean / std).astype(np.float32).reshape(1, 1, 3, 1, 1)
        return scale, shift

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": type(self).__name__,
            "geometry": Geometry.from_dict(self.geometry).to_dict(),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
        }

    @classmethod
    def from_dict(
        cls, image_processor_dict: dict[str, Any], **kwargs: Any
    ) -> DragonflyImageProcessor:
        """Our saved config, or a plain CLIP one (a released checkpoint's), which then takes the
        geometry from `geometry=` (default: the released one)."""
        if image_processor_dict.get("image_processor_type", cls.__name__) != cls.__name__:
            geometry = kwargs.pop("geometry", None) or cls().geometry_obj
            return cls.from_clip_config(image_processor_dict, geometry)
        return super().from_dict(image_processor_dict, **kwargs)

    @classmethod
    def from_clip_config(
        cls, config: dict | str | os.PathLike, geometry: Geometry | dict
    ) -> DragonflyImageProcessor:
        """Build from a plain CLIP `preprocessor_config.json` (the released checkpoint ships one)
        plus the geometry; the CLIP file's crop size must agree with the geometry's."""
        if not isinstance(config, dict):
            path = (
                os.path.join(config, "preprocessor_config.json")
                if os.path.isdir(config)
                else config
            )
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        geometry = Geometry.from_dict(geometry) if isinstance(geometry, dict) else geometry
        crop = config.get("crop_size")
        crop = crop.get("height") if isinstance(crop, dict) else crop
        if crop is not None and int(crop) != geometry.crop_size:
            raise ValueError(
                f"CLIP config crop size {crop} != geometry crop size {geometry.crop_size}"
            )
        return cls(
            geometry=geometry,
            image_mean=config.get("image_mean", CLIP_MEAN),
            image_std=config.get("image_std", CLIP_STD),
            rescale_factor=config.get("rescale_factor", 1 / 255),
        )

    @classmethod
    def from_model_config(cls, config: Any) -> DragonflyImageProcessor:
        """The processor a `DragonflyConfig` implies: its geometry and its tower's normalisation."""
        return cls(geometry=config.get_geometry(), **normalization_for(config.vision_config))

    @classmethod
    def from_model_dir(cls, directory: str | os.PathLike, config: Any) -> DragonflyImageProcessor:
        """The processor of a model directory: its saved `DragonflyImageProcessor` if any; else the
        released plain CLIP `preprocessor_config.json` (its mean/std, the config's geometry); else
        the tower's normalisation (CLIP's, or EfficientNet-Lite0's from its config)."""
        path = os.path.join(directory, "preprocessor_config.json")
        raw = {}
        if os.path.isfile(path):
            with open(path) as file:
                raw = json.load(file)
        if raw.get("image_processor_type") == cls.__name__:
            return cls.from_pretrained(directory)
        if raw:
            return cls.from_clip_config(raw, config.get_geometry())
        return cls.from_model_config(config)

    # ----------------------------------------------------------------- planning

    def plan(self, image: ImageLike | tuple[int, int]) -> CropPlan:
        """The crop plan for an image (after EXIF orientation) or a (width, height) size."""
        if isinstance(image, tuple):
            return plan_crops(image[0], image[1], self._geometry)
        if isinstance(image, np.ndarray):
            height, width = rgb_array(image).shape[:2]
            return plan_crops(width, height, self._geometry)
        return plan_crops(*oriented_size(image), self._geometry)

    # ----------------------------------------------------------------- pixels

    def _canvases(self, image: np.ndarray, plan: CropPlan) -> list[_Canvas]:
        """Resize the image once per level to its canvas (stretch, no padding)."""
        size = self.crop_size
        source = _as_uint8_tensor(image)
        grids = [("low", (1, 1)), ("medium", plan.medium_grid), ("high", plan.high_grid)]
        canvases = []
        for level, (cols, rows) in grids:
            if level not in self._geometry.levels:
                continue
            pixels = resize_uint8(source, rows * size, cols * size)
            canvases.append(_Canvas(pixels, cols, rows))
        return canvases

    def _tiles(self, canvas: _Canvas) -> np.ndarray:
        """uint8 [rows, cols, 3, R, R] strided view of a canvas: tile (row, col), no copy."""
        r = self.crop_size
        grid = canvas.pixels[0].numpy().reshape(3, canvas.rows, r, canvas.cols, r)
        return grid.transpose(1, 3, 0, 2, 4)

    def _normalise_into(self, tiles: np.ndarray, out: np.ndarray) -> None:
        """out = tiles * scale + shift: the uint8 -> float cast, the tile gather and the
        rescale in one vectorised pass over all tiles, the shift in a second one, in place.

        `out` is the contiguous slice [rows * cols, 3, R, R] that these tiles fill, row-major.
        """
        rows, cols = tiles.shape[:2]
        target = out.reshape(rows, cols, *out.shape[1:])
        np.multiply(tiles, self._scale, out=target, casting="unsafe")
        target += self._shift

    def preprocess(
        self, images: ImageLike | list[ImageLike], return_tensors: str | None = "pt", **kwargs: Any
    ) -> BatchFeature:
        """Images -> BatchFeature(pixel_values [sum crops, 3, R, R] float32, num_crops [B],
        image_sizes [B, 2] as (height, width) after EXIF orientation, transformers' order)."""
        if not isinstance(images, list | tuple):
            images = [images]
        rgb = [rgb_array(im) for im in images]
        plans = [plan_crops(im.shape[1], im.shape[0], self._geometry) for im in rgb]
        r = self.crop_size
        out = np.empty((sum(p.num_crops for p in plans), 3, r, r), dtype=np.float32)
        start = 0
        for image, plan in zip(rgb, plans, strict=True):
            for canvas in self._canvases(image, plan):
                count = canvas.rows * canvas.cols
                self._normalise_into(self._tiles(canvas), out[start : start + count])
                start += count
        data = {
            "pixel_values": torch.from_numpy(out),
            "num_crops": torch.tensor([p.num_crops for p in plans], dtype=torch.long),
            "image_sizes": torch.tensor([list(im.shape[:2]) for im in rgb], dtype=torch.long),
        }
        return BatchFeature(data=data)

    def __call__(self, images: ImageLike | list[ImageLike], **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def crop_images(self, image: ImageLike) -> tuple[CropPlan, list[Image.Image]]:
        """The plan and every crop as the model sees it (before normalisation), for a gallery."""
        rgb = rgb_array(image)
        plan = plan_crops(rgb.shape[1], rgb.shape[0], self._geometry)
        crops = []
        for canvas in self._canvases(rgb, plan):
            tiles = self._tiles(canvas)
            for row in range(canvas.rows):
                for col in range(canvas.cols):
                    pixels = np.ascontiguousarray(tiles[row, col].transpose(1, 2, 0))
                    crops.append(Image.fromarray(pixels))
        return plan, crops


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed after EXIF orientation, read from the tag alone: planning
    needs the size, not transposed pixels (a trainer on cached features plans every sample)."""
    width, height = image.size
    turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)  # the four that turn by 90 degrees
    return (height, width) if turned else (width, height)


def rgb_array(image: ImageLike) -> np.ndarray:
    """uint8 [H, W, 3] RGB; an RGB uint8 array passes through untouched (no PIL round trip)."""
    if (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[-1] == 3
    ):
        return image
    return np.asarray(to_rgb(image))


def _as_uint8_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 [1, 3, H, W] channels_last view of an RGB array, without a copy."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # PIL's buffer is read-only; torch only reads it
        return torch.from_numpy(array).permute(2, 0, 1)[None]


def resize_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic stretch of a uint8 [1, 3, H, W] image, PIL-compatible (anti-aliased, a = -0.5).

    torch has a vectorised uint8 path for channels_last input; it stays in 8 bits like PIL.
    """
    if image.shape[-2:] == (height, width):
        return image
    image = image.contiguous(memory_format=torch.channels_last)
    return F.interpolate(
        image, size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
