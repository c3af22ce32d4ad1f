"""`python -m dragonfly_med plan IMAGE_OR_WxH [--model NAME|DIR] [--json]`: the crop plan.

Needs no weights: the geometry comes from a named geometry (`tiny`, `dragonfly-med-v2`) or from a
model directory's config.json (our `geometry` field, or the released CLIP tower it names).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dragonfly_med.model.geometry import CropPlan, Geometry, parse_size, plan_crops

EXIT_REFUSED = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Show how an image is cut into crops and how many LLM positions it takes."
    parser.add_argument("image", help="an image / DICOM file, or a size WxH such as 2000x800")
    parser.add_argument(
        "--model", default="tiny", help="tiny (default), dragonfly-med-v2, or a model directory"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def geometry_for(model: str) -> Geometry:
    """The geometry of a model name or directory, without building the model."""
    from dragonfly_med.checkpoints.loading import HUB_ALIASES
    from dragonfly_med.model.configuration_dragonfly import named_geometry

    path = Path(model).expanduser()
    if not path.is_dir():
        released_ids = {hub_id: name for name, hub_id in HUB_ALIASES.items()}
        return named_geometry(released_ids.get(model, model))
    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if raw.get("geometry"):
        return Geometry.from_dict(raw["geometry"])
    if raw.get("model_type") == "dragonfly":
        from dragonfly_med.checkpoints.released import released_vision_config
        from dragonfly_med.model.configuration_dragonfly import released_v2_geometry

        return released_v2_geometry(released_vision_config(raw))
    raise ValueError(f"{path} has no Dragonfly config.json")


def image_size(source: str) -> tuple[int, int]:
    """(width, height) of 'WxH' or of an image file as the model will see it (oriented)."""
    size = parse_size(source)
    if size is not None:
        if min(size) <= 0:
            raise ValueError(f"size must be positive, got {source}")
        return size
    from dragonfly_med.imaging.ingest import load_image

    return load_image(source).image.size


def describe(plan: CropPlan, model: str) -> str:
    """Human-readable summary."""
    b = plan.budget
    w, h = plan.image_size
    return "\n".join(
        [
            f"model geometry : {model}",
            f"image          : {w} x {h}",
            f"medium grid    : {plan.medium_grid[0]} x {plan.medium_grid[1]} (cols x rows)",
            f"high grid      : {plan.high_grid[0]} x {plan.high_grid[1]} (cols x rows)",
            f"crops          : {plan.num_crops}",
            f"zoom           : {plan.zoom:.2f}x (high canvas vs native longest side)",
            f"visual tokens  : {b.visual_tokens} (low {b.low}, medium {b.medium}, high {b.high})",
            f"image positions: {b.image_positions} (with {b.separators} separators)",
        ]
    )


def run(args: argparse.Namespace) -> int:
    try:
        geometry = geometry_for(args.model)
        plan = plan_crops(*image_size(args.image), geometry)
    except Exception as err:  # user input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps({"model": args.model, **plan.to_dict(), "geometry": geometry.to_dict()}))
    else:
        print(describe(plan, args.model))
    return 0
