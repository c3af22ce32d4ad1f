"""Recipes: the paper's tables 8 and 12 (and the issue's stage 3 / tiny twins), via show-recipe."""

import json

import pytest

from training.__main__ import main
from training.engine.recipe import available_recipes, load_recipe

# Paper table 8 (general) and table 12 (biomedical): batch, lr, scheduler, warmup, max length, tune.
TABLE_8 = {
    "general-stage1": (64, 2e-5, "cosine", 0.01, 4096, (True, False, False)),
    "general-stage2": (16, 2e-6, "cosine", 0.01, 4096, (True, True, True)),
}
TABLE_12 = {
    "med-stage1": (64, 2e-5, "cosine", 0.01, 4096, (True, True, False)),
    "med-stage2": (16, 2e-6, "cosine", 0.01, 4096, (True, True, True)),
}
STAGES = ("general-stage1", "general-stage2", "med-stage1", "med-stage2", "med-stage3")


def show(name, capsys, *overrides):
    assert main(["show-recipe", name, "--json", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("name", "expected"), [*TABLE_8.items(), *TABLE_12.items()])
def test_show_recipe_matches_paper_tables(name, expected, capsys):
    data = show(name, capsys)
    batch, lr, scheduler, warmup, max_len, tune = expected
    assert data["global_batch_size"] == batch
    assert data["learning_rate"] == pytest.approx(lr)
    assert data["lr_scheduler"] == scheduler
    assert data["warmup_ratio"] == pytest.approx(warmup)
    assert data["max_seq_length"] == max_len
    assert (data["tune"]["projector"], data["tune"]["vision_encoder"], data["tune"]["llm"]) == tune
    assert data["epochs"] == 1
    for key in ("init_from", "datasets", "weight_decay", "max_grad_norm"):
        assert key in data


def test_stage_chain_and_stage3(capsys):
    assert show("general-stage2", capsys)["init_from"] == "runs/general-stage1/final"
    assert show("med-stage2", capsys)["init_from"] == "runs/med-stage1/final"
    stage3 = show("med-stage3", capsys)
    assert stage3["init_from"] == "runs/med-stage2/final"
    assert stage3["tune"] == {"projector": True, "vision_encoder": True, "llm": True}
    assert "our choice" in stage3["sources"]["hyperparameters"]
    names = {d["name"] for d in stage3["datasets"]}
    assert names == {"vqa-rad", "slake", "path-vqa", "iu-xray", "peir-gross", "roco", "mimic-cxr"}


def test_general_stage2_mixture_follows_appendix_a(capsys):
    data = {d["name"]: d for d in show("general-stage2", capsys)["datasets"]}
    assert data["svit"]["max_per_image"] == 8
    assert len(data["cauldron"]["exclude_sources"]) == 5
    assert data["openhermes"]["interleave_every"] == 10
    assert data["mathinstruct"]["interleave_every"] == 50


def test_med_stage2_is_about_85_percent_biomedical():
    recipe = load_recipe("med-stage2")
    # weight entries are the benchmark training sets (table 11 sizes)
    sizes = {"llava-med-instruct": 60000, "vqa-rad": 1790, "slake": 4919, "path-vqa": 19654, "iu-xray": 6698, "peir-gross": 5172}
    counts = {d.name: d.count or sizes[d.name] for d in recipe.datasets}
    bio = sum(counts[d.name] for d in recipe.datasets if d.domain == "biomedical")
    share = bio / sum(counts.values())
    assert 0.83 <= share <= 0.87
    assert 700_000 <= sum(counts.values()) <= 750_000


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_twins_have_the_same_structure(stage):
    full, tiny = load_recipe(stage), load_recipe(f"tiny-{stage}")
    assert tiny.tune == full.tune
    assert tiny.lr_scheduler == full.lr_scheduler
    assert tiny.epochs == full.epochs
    assert all(d.path.startswith("builtin:") for d in tiny.datasets)
    assert any(d.interleave_every for d in tiny.datasets) == any(d.interleave_every for d in full.datasets)


def test_every_recipe_validates_and_overrides_apply():
    assert len(available_recipes()) >= 10
    recipe = load_recipe("med-stage3", ["learning_rate=1e-5", "tune.llm=false", "datasets.0.path=/data/x.jsonl"])
    assert recipe.learning_rate == 1e-5 and recipe.tune.llm is False
    assert recipe.datasets[0].path == "/data/x.jsonl"
    with pytest.raises(ValueError):
        load_recipe("med-stage3", ["global_batch_size=15", "micro_batch_size=2"])
    with pytest.raises(ValueError):
        load_recipe("med-stage3", ["no_such_key=1"])


def test_mixed_precision_no_survives_yaml():
    """YAML 1.1 reads `no` as false; `mixed_precision=no` still means fp32."""
    assert load_recipe("tiny-med-stage1", ["mixed_precision=no"]).mixed_precision == "no"
