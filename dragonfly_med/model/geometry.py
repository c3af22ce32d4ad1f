"""Crop geometry of Dragonfly's multi-resolution zoom-in encoding, as pure functions.

Every image is seen three times: a low view (the whole image squashed to one crop), a medium
canvas of a few crops and a high canvas `high_scale` times larger in each direction, which
usually zooms in beyond the image's native size. This module decides the canvases, where each
crop falls in the original image and how many LLM positions the image block takes. It imports
no torch so that the UI, the CLI and tests can plan crops without loading a model; every size
comes from a `Geometry`, never from constants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

LEVELS = ("low", "medium", "high")


@dataclass(frozen=True)
class Geometry:
    """The sizes that define how an image becomes crops and tokens.

    `feature_grid` is the side of the token grid the vision tower yields per crop (24 for
    CLIP ViT-L/14 at 336 px); medium and high crops are mean-pooled to `pooled_grid` per side,
    the low view is not. `levels` selects which views are used (the paper's L / L+M / L+H /
    L+M+H ablation); the released model uses all three.
    """

    crop_size: int
    feature_grid: int
    pooled_grid: int
    cls_token: bool
    medium_grids: tuple[tuple[int, int], ...] = ((2, 2), (1, 4), (4, 1))
    high_scale: int = 3
    levels: tuple[str, ...] = LEVELS

    def __post_init__(self) -> None:
        if self.crop_size <= 0 or self.feature_grid <= 0 or self.pooled_grid <= 0:
            raise ValueError("crop_size, feature_grid and pooled_grid must be positive")
        if self.pooled_grid > self.feature_grid:
            raise ValueError("pooled_grid cannot exceed feature_grid")
        if not self.medium_grids or self.high_scale < 1:
            raise ValueError("need at least one medium grid and high_scale >= 1")
        if "low" not in self.levels or not set(self.levels) <= set(LEVELS):
            raise ValueError(f"levels must include 'low' and be drawn from {LEVELS}")
        object.__setattr__(self, "medium_grids", tuple(tuple(g) for g in self.medium_grids))
        object.__setattr__(self, "levels", tuple(lv for lv in LEVELS if lv in self.levels))

    @property
    def low_tokens(self) -> int:
        """Visual tokens of the low view: the full feature grid (+ CLS)."""
        return self.feature_grid**2 + int(self.cls_token)

    @property
    def pooled_tokens(self) -> int:
        """Visual tokens of one medium or high crop after pooling (+ CLS)."""
        return self.pooled_grid**2 + int(self.cls_token)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        data = dict(data)
        data["medium_grids"] = tuple(tuple(g) for g in data.get("medium_grids", ((2, 2), (1, 4), (4, 1))))
        data["levels"] = tuple(data.get("levels", LEVELS))
        return cls(**data)


@dataclass(frozen=True)
class Crop:
    """One crop: its level, its (col, row) in its grid and its box in original-image pixels."""

    level: str
    col: int
    row: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class TokenBudget:
    """How many LLM positions each part of the image block takes."""

    low: int
    medium: int
    high: int
    separators: int

    @property
    def visual_tokens(self) -> int:
        return self.low + self.medium + self.high

    @property
    def image_positions(self) -> int:
        return self.visual_tokens + self.separators


@dataclass(frozen=True)
class CropPlan:
    """Everything decided about one image before any pixel is touched."""

    image_size: tuple[int, int]
    medium_grid: tuple[int, int]
    high_grid: tuple[int, int]
    crops: tuple[Crop, ...]
    zoom: float
    budget: TokenBudget
    crop_tokens: tuple[int, ...] = field(repr=False)

    @property
    def num_crops(self) -> int:
        return len(self.crops)

    @property
    def separator_offsets(self) -> tuple[int, ...]:
        """Offsets, inside the image block, of the separator that closes each crop."""
        offsets, position = [], 0
        for tokens in self.crop_tokens:
            position += tokens
            offsets.append(position)
            position += 1
        return tuple(offsets)

    def to_dict(self) -> dict:
        """JSON-ready summary, the shape the CLI and the app print."""
        b = self.budget
        return {
            "image_size": list(self.image_size),
            "medium_grid": list(self.medium_grid),
            "high_grid": list(self.high_grid),
            "num_crops": self.num_crops,
            "zoom": round(self.zoom, 4),
            "visual_tokens": b.visual_tokens,
            "separators": b.separators,
            "image_positions": b.image_positions,
            "tokens": {"low": b.low, "medium": b.medium, "high": b.high},
            "crops": [{"level": c.level, "col": c.col, "row": c.row, "box": [round(v, 2) for v in c.box]} for c in self.crops],
        }


def select_medium_grid(width: int, height: int, geometry: Geometry) -> tuple[int, int]:
    """Pick the medium grid with the released (LLaVA-NeXT) rule.

    For each candidate canvas the image is scaled to fit; prefer the canvas that keeps the most
    effective pixels (capped at the native count), then the one that wastes the least area,
    then the earlier candidate.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    best, best_key = None, None
    for index, (cols, rows) in enumerate(geometry.medium_grids):
        canvas_w, canvas_h = cols * geometry.crop_size, rows * geometry.crop_size
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        key = (-effective, wasted, index)
        if best_key is None or key < best_key:
            best, best_key = (cols, rows), key
    return best


def grid_crops(level: str, grid: tuple[int, int], width: int, height: int) -> list[Crop]:
    """Tile an image of width x height into grid (cols, rows), row-major, in original pixels."""
    cols, rows = grid
    step_x, step_y = width / cols, height / rows
    return [
        Crop(level, c, r, (c * step_x, r * step_y, (c + 1) * step_x, (r + 1) * step_y))
        for r in range(rows)
        for c in range(cols)
    ]


def plan_crops(width: int, height: int, geometry: Geometry) -> CropPlan:
    """Plan the crops of a width x height image: grids, boxes, zoom ratio and token budget."""
    medium = select_medium_grid(width, height, geometry)
    high = (medium[0] * geometry.high_scale, medium[1] * geometry.high_scale)
    crops = [Crop("low", 0, 0, (0.0, 0.0, float(width), float(height)))]
    if "medium" in geometry.levels:
        crops += grid_crops("medium", medium, width, height)
    if "high" in geometry.levels:
        crops += grid_crops("high", high, width, height)
    crop_tokens = tuple(geometry.low_tokens if c.level == "low" else geometry.pooled_tokens for c in crops)
    n_medium = sum(c.level == "medium" for c in crops)
    n_high = sum(c.level == "high" for c in crops)
    budget = TokenBudget(
        low=geometry.low_tokens,
        medium=n_medium * geometry.pooled_tokens,
        high=n_high * geometry.pooled_tokens,
        separators=len(crops),
    )
    zoom = max(high) * geometry.crop_size / max(width, height)
    return CropPlan((width, height), medium, high, tuple(crops), zoom, budget, crop_tokens)


def parse_size(text: str) -> tuple[int, int] | None:
    """Read 'WxH' (e.g. '2000x800'); None when text is not of that form."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])
