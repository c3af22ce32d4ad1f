"""Draw where the model looks: the medium and high crop grids over the image, with crop indices.

Indices are the crops' positions in model order (0 = the low view of the whole image, then the
medium crops row-major, then the high crops row-major), the same order as the crop gallery, so a
clinician can match "crop 7" in the gallery to its place on the image.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from dragonfly_med.geometry import CropPlan


@dataclass(frozen=True)
class LevelStyle:
    colour: tuple[int, int, int]
    width: int
    font_size: int
    corner: str  # where the index sits inside the crop: "top-left" or "bottom-right"


STYLES = {
    "medium": LevelStyle((255, 170, 0), 4, 22, "top-left"),
    "high": LevelStyle((0, 210, 255), 1, 12, "bottom-right"),
}
LEGEND = "orange: medium grid · cyan: high grid · numbers: crop order (0 = whole image)"


def display_copy(image: Image.Image, min_side: int = 512, max_side: int = 1024) -> Image.Image:
    """A copy scaled so that labels stay legible on small scans and large photos stay light."""
    w, h = image.size
    scale = min(max(1.0, min_side / min(w, h)), max_side / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS) if size != (w, h) else image.convert("RGB")


def _label(draw: ImageDraw.ImageDraw, text: str, box: tuple[float, ...], style: LevelStyle) -> None:
    font = ImageFont.load_default(size=style.font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    pad = 2 + style.width
    if style.corner == "top-left":
        x, y = box[0] + pad, box[1] + pad
    else:
        x, y = box[2] - tw - pad - 2, box[3] - th - pad - 2
    draw.rectangle((x - 2, y - 2, x + tw + 2, y + th + 2), fill=(0, 0, 0))
    draw.text((x - left, y - top), text, fill=style.colour, font=font)


def draw_grids(image: Image.Image, plan: CropPlan) -> Image.Image:
    """The image (display-sized) with every medium and high crop outlined and numbered."""
    canvas = display_copy(image)
    sx, sy = canvas.width / plan.image_size[0], canvas.height / plan.image_size[1]
    draw = ImageDraw.Draw(canvas)
    # high first so the thicker medium lines stay on top
    for level in ("high", "medium"):
        style = STYLES[level]
        for index, crop in enumerate(plan.crops):
            if crop.level != level:
                continue
            x0, y0, x1, y1 = crop.box
            box = (x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1)
            draw.rectangle(box, outline=style.colour, width=style.width)
            _label(draw, str(index), box, style)
    return canvas
