"""The feature probe behind the diagnosis in docs/tiny-default.md: real tower, real processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.tiny.probe_features import (
    LEVELS,
    ProbedView,
    fit_and_score,
    level_features,
    tiny_tower_and_processor,
)


@pytest.fixture(scope="module")
def tower_and_processor():
    return tiny_tower_and_processor()


def test_each_level_is_pooled_over_its_own_crops(tower_and_processor):
    tower, processor = tower_and_processor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    features = level_features(tower, processor, image, LEVELS)
    assert set(features) == set(LEVELS)
    channels = tower.hidden_size
    assert all(f.shape == (2 * channels,) for f in features.values())
    with torch.no_grad():
        low = tower(processor(image)["pixel_values"][:1])[0]  # the plan's first crop is the low view
    torch.testing.assert_close(features["low"][:channels], low.mean(0))
    assert level_features(tower, processor, image, ("medium",)).keys() == {"medium"}
    _, medium_only = tiny_tower_and_processor(("medium",))  # cuts no high crops, same numbers
    assert {crop.level for crop in medium_only.plan(image).crops} == {"low", "medium"}
    torch.testing.assert_close(level_features(tower, medium_only, image, ("medium",))["medium"], features["medium"])


def views(split: str, source: str, label: str, center: float, n: int = 12) -> list[ProbedView]:
    generator = torch.Generator().manual_seed(sum(map(ord, split + source)))
    return [
        ProbedView(source, split, {"modality": label, "body_region": None}, {"low": center + 0.1 * torch.randn(8, generator=generator)})
        for _ in range(n)
    ]


def test_held_out_sources_are_scored_per_source_and_unknown_facts_are_skipped():
    data = (
        views("train", "a", "CT", 1.0) + views("train", "b", "CT", 1.2) + views("train", "c", "MRI", -1.0)
        + views("val", "d", "CT", 1.1) + views("test", "e", "MRI", -0.9) + views("test", "f", "CT", -1.0)
    )
    result = fit_and_score(data, "modality", ("low",))
    assert result["labels"] == ["CT", "MRI"]
    assert result["val"]["by_source"] == {"d": 1.0}
    assert result["test"]["by_source"] == {"e": 1.0, "f": 0.0}  # a CT that looks like the MRIs is missed
    assert result["test"]["accuracy"] == 0.5
    assert fit_and_score(data, "body_region", ("low",)) == {"labels": []}
