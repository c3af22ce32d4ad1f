"""Draw where the model looks: the medium and high crop grids over the image, with crop indices,
and, after an answer, where it looked: each crop box shaded by its share of the answer's
relevance (dragonfly_med/relevance.py).

Indices are the crops' positions in model order (0 = the low view of the whole image, then the
medium crops row-major, then the high crops row-major), the same order as the crop gallery, so a
clinician can match "crop 7" in the gallery to its place on the image.

Crops are drawn from plain crop objects (`{"level", "col", "row", "box"[, "share"]}`, boxes in
image pixels), the shape of `/load_image`'s plan and of the log, so the page and the teaching
file exported from the log draw the same picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from dragonfly_med.model.geometry import CropPlan, grid_crops


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
HEAT_COLOUR = (255, 40, 40)
HEAT_MAX_ALPHA = 170  # the most relevant medium/high crop; the image stays visible under it
HEAT_LEGEND = ("red: where the model looked for the last answer (darker = larger share; crop 0, the whole "
               "image, has its share written top-left)")
TOP_CROPS = 3  # highlighted in the crops gallery
DIAGRAM_BACKGROUND = (70, 70, 70)


def display_size(w: int, h: int, min_side: int = 512, max_side: int = 1024) -> tuple[int, int]:
    """A size at which labels stay legible on small scans and large photos stay light."""
    scale = min(max(1.0, min_side / min(w, h)), max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def display_copy(image: Image.Image) -> Image.Image:
    """The image at its display size, RGB."""
    size = display_size(*image.size)
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS) if size != image.size else image.convert("RGB")


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
    return draw_crops(display_copy(image), plan.image_size, plan.to_dict()["crops"])


def draw_heat(image: Image.Image, crops: Sequence[dict]) -> Image.Image:
    """The grid picture from crop objects; each box shaded by its share when they carry one."""
    return draw_crops(display_copy(image), image.size, crops)


def diagram(image_size: tuple[int, int], crops: Sequence[dict]) -> Image.Image:
    """The grid picture without pixels (the log keeps none): a grey canvas of the image's shape."""
    return draw_crops(Image.new("RGB", display_size(*image_size), DIAGRAM_BACKGROUND), image_size, crops)


def plan_crops_of(image_size: tuple[int, int], medium_grid: Sequence[int], high_grid: Sequence[int]) -> list[dict]:
    """The crop objects of a logged plan (grids only): the grids tile the image evenly."""
    w, h = image_size
    crops = [{"level": "low", "col": 0, "row": 0, "box": [0.0, 0.0, float(w), float(h)]}]
    for level, grid in (("medium", medium_grid), ("high", high_grid)):
        crops += [{"level": c.level, "col": c.col, "row": c.row, "box": list(c.box)}
                  for c in grid_crops(level, tuple(grid), w, h)]
    return crops


def draw_crops(canvas: Image.Image, image_size: tuple[int, int], crops: Sequence[dict]) -> Image.Image:
    """Shade (when the crops carry shares), outline and number the crops on a display canvas."""
    scale = (canvas.width / image_size[0], canvas.height / image_size[1])
    if any("share" in c for c in crops):
        canvas = _shade(canvas, crops, scale)
    draw = ImageDraw.Draw(canvas)
    # high first so the thicker medium lines stay on top
    for level in ("high", "medium"):
        style = STYLES[level]
        for index, crop in enumerate(crops):
            if crop["level"] == level:
                box = _display_box(crop["box"], scale)
                draw.rectangle(box, outline=style.colour, width=style.width)
                _label(draw, str(index), box, style)
    low = [c for c in crops if c["level"] == "low" and "share" in c]
    if low:
        # below the first medium crop's number, which sits in the top-left corner too
        _label(draw, f"0 whole image: {low[0]['share']:.0%}", (0, 40, canvas.width, canvas.height),
               LevelStyle(HEAT_COLOUR, 2, 18, "top-left"))
    return canvas


def _display_box(box: Sequence[float], scale: tuple[float, float]) -> tuple[float, float, float, float]:
    sx, sy = scale
    return box[0] * sx, box[1] * sy, box[2] * sx - 1, box[3] * sy - 1


def _shade(canvas: Image.Image, crops: Sequence[dict], scale: tuple[float, float]) -> Image.Image:
    """Medium then high crops filled in red, alpha by share relative to the largest of them; the
    low view covers everything, so its share is written rather than painted."""
    zoomed = [c for c in crops if c["level"] != "low"]
    top = max((c["share"] for c in zoomed), default=0.0)
    if top <= 0:
        return canvas
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for level in ("medium", "high"):
        for crop in (c for c in zoomed if c["level"] == level):
            draw.rectangle(_display_box(crop["box"], scale), fill=(*HEAT_COLOUR, round(HEAT_MAX_ALPHA * crop["share"] / top)))
    return Image.alpha_composite(canvas.convert("RGBA"), layer).convert("RGB")


def top_crops(crops: Sequence[dict], count: int = TOP_CROPS) -> list[int]:
    """Indices (model order) of the crops with the largest shares, largest first."""
    return sorted(range(len(crops)), key=lambda i: -crops[i].get("share", 0.0))[:count]


def framed(crop: Image.Image, width: int = 12) -> Image.Image:
    """A gallery thumbnail with a red frame: one of the answer's top crops."""
    return ImageOps.expand(crop.convert("RGB"), border=width, fill=HEAT_COLOUR)
