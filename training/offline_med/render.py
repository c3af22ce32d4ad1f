"""Pixel operations of the offline medical data builder: windows, marks, lesions, fine details.

Everything drawn here is a fact the questions can rely on, so each function returns where and
what it drew. Fine details are drawn on square canvases and sized as fractions f of the side,
because the model's low view squashes the whole image to one crop: a detail covers about 224*f
low-view pixels and 6*224*f high-view pixels (high canvas of a 2x2 medium grid), whatever the
canvas size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

# CT display windows as (centre, width) in HU, the ones radiologists use for the head.
WINDOWS = {"brain": (40, 80), "bone": (480, 2500), "soft tissue": (40, 400)}
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
LABEL_FRACTION = (0.0055, 0.0065)  # glyph height: ~1.3 low-view px (strokes << 1), ~8 high-view px
LABEL_CHARS = "ACEHKLMNPRTX"
# A round lesion of 3.5-5% of the width (~8-11 low-view px, ~60-90 high-view px), its inside
# stippled in a checker of 2-px cells or uniform at the same mean: the low view averages the
# stipple away.
TEXTURED_LESION_FRACTION = (0.035, 0.05)
TEXTURES = ("speckled", "uniform")
STIPPLE_CELL, STIPPLE_CONTRAST = 2, 70


def apply_window(hu: np.ndarray, window: str) -> Image.Image:
    """Map Hounsfield units to 8-bit grey with a named CT window."""
    centre, width = WINDOWS[window]
    scaled = (hu.astype(np.float32) - (centre - width / 2)) / width
    return Image.fromarray((np.clip(scaled, 0, 1) * 255).astype(np.uint8))


def autocontrast(values: np.ndarray) -> Image.Image:
    """8-bit grey (or RGB) from any array, stretched between its 1st and 99.5th percentiles."""
    values = values.astype(np.float32)
    lo, hi = np.percentile(values, [1, 99.5])
    scaled = np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1)
    return Image.fromarray((scaled * 255).astype(np.uint8))


def quadrant(x: float, y: float, width: int, height: int) -> str:
    """Image quadrant (viewer's, not the patient's) of a point."""
    return QUADRANTS[2 * int(y >= height / 2) + int(x >= width / 2)]


def foreground_point(image: Image.Image, rng: random.Random, margin: float = 0.1) -> tuple[int, int]:
    """A random pixel inside the imaged object (brighter than the darkest quarter), off the edges.

    Marks and lesions drawn on air or on the burned-in text of an ultrasound frame would be
    trivially visible, so they are placed on tissue.
    """
    step = max(1, max(image.size) // 512)  # candidates on a coarse grid: canvases are large
    grey = np.asarray(image.convert("L"), dtype=np.float32)[::step, ::step]
    h, w = grey.shape
    mx, my = int(w * margin), int(h * margin)
    inner = grey[my : h - my, mx : w - mx]
    ys, xs = np.nonzero(inner > max(np.percentile(grey, 25), 20))
    if len(xs) == 0:
        return step * rng.randrange(mx, w - mx), step * rng.randrange(my, h - my)
    i = rng.randrange(len(xs))
    return step * (int(xs[i]) + mx), step * (int(ys[i]) + my)


def draw_marker(image: Image.Image, x: int, y: int) -> Image.Image:
    """A red ring with a centre dot around (x, y): the 'marked point' questions refer to."""
    out = image.convert("RGB")
    r = max(4, round(0.025 * max(out.size)))
    draw = ImageDraw.Draw(out)
    draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 32, 32), width=max(1, r // 4))
    draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(255, 32, 32))
    return out


@dataclass(frozen=True)
class Drawn:
    """Where a lesion or fine detail was drawn: its box in pixels of the returned image and its
    signed contrast to the surroundings in grey levels."""

    box: tuple[int, int, int, int]
    contrast: float

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def _contrast_sign(pixels: np.ndarray, x: int, y: int, radius: int) -> int:
    """+1 to draw brighter than the neighbourhood, -1 darker, so the mark always shows."""
    h, w = pixels.shape[:2]
    patch = pixels[max(0, y - radius) : min(h, y + radius + 1), max(0, x - radius) : min(w, x + radius + 1)]
    return 1 if patch.mean() < 128 else -1


def draw_disk(image: Image.Image, x: int, y: int, diameter: float, contrast: float) -> tuple[Image.Image, Drawn]:
    """Add a soft-edged disk that differs from its surroundings by about `contrast` grey levels."""
    pixels = np.array(image)
    sign = _contrast_sign(pixels, x, y, max(2, int(diameter)))
    reach = int(diameter / 2) + 2  # only the disk's bounding box is touched: canvases are large
    x0, y0 = max(0, x - reach), max(0, y - reach)
    patch = pixels[y0 : y + reach + 1, x0 : x + reach + 1].astype(np.float32)
    yy, xx = np.ogrid[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]]
    weight = np.clip(diameter / 2 + 0.5 - np.sqrt((xx - x) ** 2 + (yy - y) ** 2), 0, 1)  # antialiased edge
    if pixels.ndim == 3:
        weight = weight[..., None]
    pixels[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = np.clip(patch + sign * contrast * weight, 0, 255)
    r = diameter / 2
    box = (round(x - r), round(y - r), round(x + r), round(y + r))
    return Image.fromarray(pixels), Drawn(box, sign * contrast)


def draw_lesion(image: Image.Image, rng: random.Random) -> tuple[Image.Image, Drawn]:
    """A simulated focal lesion, 6-10% of the width: plainly visible in the low view."""
    x, y = foreground_point(image, rng, margin=0.15)
    diameter = rng.uniform(0.06, 0.10) * image.width
    return draw_disk(image, x, y, diameter, rng.uniform(70, 110))


def upsample_canvas(image: Image.Image, side: int) -> Image.Image:
    """Enlarge an image onto a black square canvas of `side` px (bicubic), as a large scan.

    Square, so that a detail's fraction of the side is the same in both directions of the
    (squashed) low view.
    """
    return ImageOps.pad(image, (side, side), Image.BICUBIC, color="black")


def detail_position(canvas: Image.Image, rng: random.Random) -> tuple[int, int]:
    """A random position for a fine detail, anywhere on tissue but away from the border."""
    return foreground_point(canvas, rng, margin=0.06)


def draw_textured_lesion(canvas: Image.Image, texture: str, rng: random.Random) -> tuple[Image.Image, Drawn]:
    """A round lesion, bright on dark tissue and dark on bright, whose inside is `texture`:
    'speckled' (a checker of STIPPLE_CELL-px cells, +/- STIPPLE_CONTRAST, as a fine stipple)
    or 'uniform' at the same mean.

    Measured before it joined the set (linear read-out of the tiny tower's pooled features,
    held-out pairs identical but for the texture): 50% from the low view, 50% from the medium
    crops, 100% from the high crops (docs/tiny-default.md).
    """
    x, y = detail_position(canvas, rng)
    diameter = rng.uniform(*TEXTURED_LESION_FRACTION) * canvas.width
    pixels = np.array(canvas.convert("RGB"), dtype=np.float32)
    r = int(diameter / 2) + 1
    x0, y0 = max(0, x - r), max(0, y - r)
    patch = pixels[y0 : y + r, x0 : x + r]
    yy, xx = np.mgrid[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]]
    inside = (xx - x) ** 2 + (yy - y) ** 2 <= (diameter / 2) ** 2
    surround = float(patch[inside].mean())
    fill = np.full(inside.shape, 200.0 if surround < 128 else 60.0, dtype=np.float32)
    if texture == "speckled":  # a checker: it cancels exactly when averaged, random cells would not
        fill += STIPPLE_CONTRAST * np.where((yy // STIPPLE_CELL + xx // STIPPLE_CELL) % 2 == 0, 1.0, -1.0).astype(np.float32)
    patch[inside] = np.clip(fill[inside], 0, 255)[:, None]
    pixels[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch
    box = (round(x - diameter / 2), round(y - diameter / 2), round(x + diameter / 2), round(y + diameter / 2))
    return Image.fromarray(pixels.astype(np.uint8)).convert(canvas.mode), Drawn(box, float(fill[inside].mean()) - surround)


def label_font(height: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at a given glyph height (no system fonts needed)."""
    return ImageFont.load_default(size=max(6, round(height * 1.35)))


def draw_label(canvas: Image.Image, text: str, rng: random.Random) -> tuple[Image.Image, Drawn]:
    """Print `text` white on a black box, glyphs ~0.6% of the width, at a random position.

    In the low view the box is at most a grey smudge of one or two pixels; its characters can
    only be read in the high view.
    """
    out = canvas.copy()
    glyph = rng.uniform(*LABEL_FRACTION) * canvas.width
    font = label_font(round(glyph))
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, round(glyph * 0.2))
    x, y = detail_position(canvas, rng)
    x0, y0 = x - (right - left) // 2 - pad, y - (bottom - top) // 2 - pad
    draw.rectangle([x0, y0, x0 + right - left + 2 * pad - 1, y0 + bottom - top + 2 * pad - 1], fill="black")
    draw.text((x0 + pad - left, y0 + pad - top), text, fill="white", font=font)
    box = (x0, y0, x0 + right - left + 2 * pad, y0 + bottom - top + 2 * pad)
    return out, Drawn(box, 255.0)


def random_label(rng: random.Random, length: int | None = None) -> str:
    """A digit, or a 2-3 character code like 'K7' or 'RT3' as burned-in annotations read."""
    length = length or rng.choice((1, 1, 2, 3))
    return "".join(rng.choice(LABEL_CHARS) for _ in range(length - 1)) + str(rng.randrange(10))
