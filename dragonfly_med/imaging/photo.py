"""Photos (PNG, JPEG, TIFF, BMP, WebP, GIF, PPM, JPEG 2000) -> 8-bit RGB and their facts.

Clinicians bring phone pictures of screens, screenshots and exported slices as well as DICOMs.
Only an allow-list of Pillow formats is opened, the pixel count is checked from the header
before decoding, phone photos are turned upright, transparency is flattened on white and
16-bit or float images are scaled min..max like a DICOM without a window.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from dragonfly_med.imaging.errors import CorruptFileError, TooLargeError, frame_index
from dragonfly_med.imaging.facts import ImageFacts
from dragonfly_med.imaging.windowing import Window, apply_window

# Photo formats we accept. An allow-list keeps Pillow away from formats that run external
# programs (EPS -> Ghostscript) or that are never clinical images.
PHOTO_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DIB", "WEBP", "GIF", "PPM", "JPEG2000")


def load_photo(
    stream: BinaryIO, frame: int | None, max_pixels: int
) -> tuple[Image.Image, ImageFacts]:
    """Open lazily, check the size from the header, then decode one frame to RGB."""
    try:
        img = Image.open(stream, formats=PHOTO_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(None, max_pixels) from exc
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise _too_many_pixels((width, height), max_pixels)
        frames = int(getattr(img, "n_frames", 1) or 1)
        index = frame_index(frame, frames, default=0)
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
    return rgb, facts


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int) -> TooLargeError:
    dims = f" is {size[0]} x {size[1]} pixels," if size else ""
    return TooLargeError(
        f"This image{dims} above the limit of {max_pixels:,} pixels (it could exhaust "
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
        grey = (apply_window(arr, window) * 255.0 + 0.5).astype(np.uint8)
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
