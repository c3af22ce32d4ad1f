"""Crop planning against the released checkpoint's facts (released-checkpoint.md)."""

import pytest

from dragonfly_med.model.geometry import Geometry, parse_size, plan_crops, select_medium_grid

# The released v2 geometry, stated as the checkpoint's facts: CLIP ViT-L/14 at 336 px.
RELEASED = Geometry(crop_size=336, feature_grid=336 // 14, pooled_grid=336 // 14 // 4, cls_token=True)


@pytest.mark.parametrize(
    ("size", "medium", "high"),
    [
        ((640, 480), (2, 2), (6, 6)),
        ((1920, 1080), (2, 2), (6, 6)),
        ((1080, 1920), (2, 2), (6, 6)),
        ((4000, 3000), (2, 2), (6, 6)),
        ((800, 1600), (2, 2), (6, 6)),
        ((2000, 800), (4, 1), (12, 3)),
        ((3000, 600), (4, 1), (12, 3)),
        ((600, 3000), (1, 4), (3, 12)),
    ],
)
def test_released_grid_choice(size, medium, high):
    plan = plan_crops(*size, RELEASED)
    assert plan.medium_grid == medium
    assert plan.high_grid == high


def test_released_token_budget():
    plan = plan_crops(640, 480, RELEASED)
    assert plan.num_crops == 41
    assert plan.budget.low == 577
    assert plan.budget.visual_tokens == 2057
    assert plan.budget.image_positions == 2098
    assert plan.separator_offsets[0] == 577
    assert plan.separator_offsets[-1] == 2097


@pytest.mark.parametrize("size", [(640, 480), (2000, 800), (600, 3000), (1, 4000), (7, 3)])
def test_crops_tile_image_exactly(size):
    w, h = size
    plan = plan_crops(w, h, RELEASED)
    for level in ("medium", "high"):
        boxes = [c.box for c in plan.crops if c.level == level]
        area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes)
        assert area == pytest.approx(w * h)
        assert max(b[2] for b in boxes) == pytest.approx(w)
        assert max(b[3] for b in boxes) == pytest.approx(h)
        # row-major: rows non-decreasing, columns increasing inside a row
        keys = [(c.row, c.col) for c in plan.crops if c.level == level]
        assert keys == sorted(keys)


def test_zoom_ratio():
    plan = plan_crops(640, 480, RELEASED)
    assert plan.zoom == pytest.approx(6 * 336 / 640)
    assert plan_crops(4000, 3000, RELEASED).zoom < 1


def test_levels_for_ablation():
    low_only = Geometry(224, 7, 2, False, levels=("low",))
    plan = plan_crops(512, 512, low_only)
    assert plan.num_crops == 1
    assert plan.budget.image_positions == 49 + 1
    low_high = Geometry(224, 7, 2, False, levels=("low", "high"))
    assert plan_crops(512, 512, low_high).num_crops == 1 + 36


def test_tie_breaks_by_list_order():
    square = Geometry(10, 2, 1, False, medium_grids=((1, 1), (1, 1)))
    assert select_medium_grid(5, 5, square) == (1, 1)


def test_geometry_round_trip_and_validation():
    assert Geometry.from_dict(RELEASED.to_dict()) == RELEASED
    with pytest.raises(ValueError):
        Geometry(336, 24, 30, True)
    with pytest.raises(ValueError):
        plan_crops(0, 10, RELEASED)


def test_parse_size():
    assert parse_size("2000x800") == (2000, 800)
    assert parse_size("scan.png") is None
