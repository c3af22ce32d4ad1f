"""reproduce-tiny and the ablation: recipe overrides resolve, stages chain and resume by skipping
finished ones, the exported projector and LoRA adapters have the shapes and dtype the tiny model loads, the ablation's variant
folders differ only in geometry levels, and its summary has the documented keys."""

from __future__ import annotations

import argparse
import json
from argparse import Namespace

import pytest
import torch
from offline_med_fake import random_model_dir, write_fake_offline_med
from safetensors.torch import load_file

from training.engine import trainer
from training.engine.recipe import load_recipe
from training.engine.records import write_jsonl
from training.engine.trainer import fast_precision
from training.offline_med.scoring import score
from training.tiny import ablation
from training.tiny.model_card import model_card
from training.tiny.replay_text import replay_records, training_images
from training.tiny.reproduce import (
    BUDGETS,
    LORA_ALPHA,
    LORA_RANK,
    add_arguments,
    export_adapters,
    export_projector,
    run_stages,
    stage_overrides,
    stage_plans,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fake_offline_med(tmp_path_factory.mktemp("offline-med"))


def test_overrides_freeze_the_tower_and_give_the_llm_adapters(data_dir):
    for index, plan in enumerate(BUDGETS["cpu"], start=1):
        recipe = load_recipe(plan.recipe, stage_overrides(plan, "tiny", data_dir, seed=3, replay="replay.jsonl"))
        trains_llm = index > 1  # the recipes: stage 1 aligns the projector, 2-3 train the LLM
        assert (recipe.tune.projector, recipe.tune.vision_encoder, recipe.tune.llm) == (
            True,
            False,
            trains_llm,
        )
        assert recipe.lora_rank == (LORA_RANK if trains_llm else 0)
        assert (
            recipe.init_from == "tiny"
            and recipe.seed == 3
            and recipe.gradient_checkpointing is False
            and recipe.mixed_precision == fast_precision()
            and recipe.epochs == 1
        )
        assert [(d.path, d.count, d.image_root, d.interleave_every) for d in recipe.datasets] == [
            (plan.data, plan.count, ".", None)
        ] + ([("replay.jsonl", None, ".", plan.replay_every)] if trains_llm else [])
    assert (
        load_recipe("tiny-med-stage1").tune.vision_encoder is True
    )  # the recipe file is untouched


def test_stages_train_in_fp32_where_the_cpu_only_emulates_bf16(data_dir, monkeypatch):
    """Emulated bf16 made a stage-1 step 27x slower on an AVX2-only CPU: reproduce-tiny and the
    ablation train in fp32 there, in bf16 where the hardware runs it."""
    files = ("fine.jsonl", "coarse.jsonl")
    for native, on_cpu in ((False, "no"), (True, "bf16")):
        monkeypatch.setattr(trainer, "cpu_runs_bf16", lambda native=native: native)
        recipes = [load_recipe(p.recipe, stage_overrides(p, "tiny", data_dir)) for p in BUDGETS["cpu"]]
        recipes.append(load_recipe("tiny-med-stage3", ablation.overrides(data_dir, data_dir, files, 8, 0)))
        expected = "bf16" if torch.cuda.is_available() else on_cpu
        assert [trainer.mixed_precision(r) for r in recipes] == [expected] * 4


def test_stages_chain_skip_when_done_and_export_the_assets(data_dir, tmp_path):
    init = random_model_dir(tmp_path / "init")
    replay = replay_records(["Count from 1 to 3.", "Say hi."], ["1, 2, 3", "Hi!"], training_images(data_dir), seed=0, with_image=1.0)
    write_jsonl(data_dir / "replay-test.jsonl", replay)
    final, log = run_stages(BUDGETS["smoke"], data_dir, tmp_path / "run", init=str(init), replay="replay-test.jsonl")
    assert final.endswith("stage3/final") and [e["recipe"] for e in log] == [
        "tiny-med-stage1",
        "tiny-med-stage2",
        "tiny-med-stage3",
    ]
    assert log[1]["overrides"][0] == f"init_from={tmp_path / 'run' / 'stage1' / 'final'}"
    # stages 2-3 of the smoke budget: 4 samples = 2 main steps, with a replay step between them
    assert [e["resolved"].get("interleaved") for e in log] == [{}, {"replay": 2}, {"replay": 2}]
    assert [e["steps"] for e in log] == [1, 3, 3]
    _, again = run_stages(BUDGETS["smoke"], data_dir, tmp_path / "run", init=str(init))
    assert all(e.get("skipped") for e in again)
    assert again[2]["resolved"]["tune"] == {
        "projector": True,
        "vision_encoder": False,
        "llm": True,
    }
    rows = [{"family": "modality", "answer_type": "closed", "reference": "CT", "prediction": "CT"}]
    scores = score(rows) | {"seed": 0}
    result = scores | {"baselines": {"no_image": score(rows), "untrained_projector": score(rows)}}
    card = model_card(result, again, "smoke", data_dir, LORA_RANK, LORA_ALPHA)
    assert "| 3 | `tiny-med-stage3` | 4 x 1 epochs + replay every 2 steps |" in card and "**100.0%**" in card
    projector = load_file(
        export_projector(
            tmp_path / "run" / "stage3" / "final", tmp_path / "assets" / "projector.safetensors"
        )
    )
    assert set(projector) == {"weight", "bias"} and projector["weight"].shape == (32, 32)
    shipped = export_adapters(tmp_path / "run" / "stage3" / "final", tmp_path / "assets")
    assert shipped == tmp_path / "assets" / "adapter_model.safetensors"
    adapters = load_file(shipped)
    assert {t.dtype for t in adapters.values()} == {torch.float16}
    assert {t.shape[0] for k, t in adapters.items() if k.endswith("lora_A.weight")} == {2 * LORA_RANK}
    config = json.loads((tmp_path / "assets" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2 * LORA_RANK, 2 * LORA_RANK)


def test_ablation_variants_differ_only_in_levels(tmp_path):
    base = random_model_dir(tmp_path / "base")
    folders = {
        name: ablation.variant_init(base, levels, tmp_path / name.replace("+", ""))
        for name, levels in ablation.VARIANTS.items()
    }
    configs = {name: json.loads((f / "config.json").read_text()) for name, f in folders.items()}
    for name, config in configs.items():
        assert tuple(config["geometry"].pop("levels")) == ablation.VARIANTS[name]
        processor = json.loads((folders[name] / "preprocessor_config.json").read_text())
        assert tuple(processor["geometry"]["levels"]) == ablation.VARIANTS[name]
    assert all(c == configs["L"] for c in configs.values())
    assert (folders["L"] / "model.safetensors").resolve() == (base / "model.safetensors").resolve()


def test_ablation_summary_keys():
    results = [
        {
            "variant": v,
            "seed": s,
            "fine_detail": f,
            "coarse": 0.6,
            "n_fine_detail": 4,
            "n_coarse": 4,
            "train_seconds": 1.0,
            "last_loss": 1.0,
        }
        for s in (0, 1)
        for v, f in (("L", 0.5), ("L+M", 0.5), ("L+H", 0.75), ("L+M+H", 0.75))
    ]
    summary = ablation.summarise(results, Namespace(samples=8, init="runs/x/stage1/final", output="runs/x-ablation"), n_train=10)
    assert set(summary["variants"]) == {"L", "L+M", "L+H", "L+M+H"} and summary["seeds"] == [0, 1]
    assert summary["init"] == "runs/x/stage1/final" and "runs/x/stage1/final" in ablation.markdown(summary)
    assert (
        summary["variants"]["L+M+H"]["fine_detail"] == 0.75
        and summary["delta_LMH_minus_L"]["fine_detail"] == 0.25
    )
    assert "**met**" in ablation.markdown(summary)
    # the page's command reproduces the run: a non-default budget and the seeds are part of it
    assert "--output runs/x-ablation --samples 8 --seeds 0,1 --json`" in ablation.markdown(summary)
    default = ablation.summarise(results, Namespace(samples=ablation.DEFAULT_SAMPLES, init="tiny-base", output="runs/ablation"), n_train=10)
    assert "`python -m training ablation --report-only`" in ablation.markdown(default)


def test_ablation_gap_uses_the_seeds_both_variants_finished():
    """A variant with an extra seed keeps it in its own mean, but the headline gap compares L and
    L+M+H on the seeds both finished; a page for a subset of variants names them in its command."""
    def result(variant, seed, fine):
        return {"variant": variant, "seed": seed, "fine_detail": fine, "coarse": 0.5, "n_fine_detail": 4,
                "n_coarse": 4, "train_seconds": 1.0, "last_loss": 1.0}

    results = [result("L", 0, 0.5), result("L", 1, 0.5), result("L", 2, 0.25), result("L+M+H", 0, 0.75), result("L+M+H", 1, 1.0)]
    summary = ablation.summarise(results, Namespace(samples=ablation.DEFAULT_SAMPLES, init="tiny-base", output="runs/ablation"), n_train=10)
    assert summary["variants"]["L"]["seeds"] == [0, 1, 2] and summary["variants"]["L"]["fine_detail"] == 0.4167
    assert summary["delta_LMH_minus_L"] == {"fine_detail": 0.375, "coarse": 0.0, "seeds": [0, 1]}
    page = ablation.markdown(summary)
    assert "L+M+H minus L (seeds 0, 1): **+37.5 points**" in page
    assert "`python -m training ablation --variants L,L+M+H --seeds 0,1,2 --json`" in page
    for r in results:
        r["fine_detail_by_kind"] = {"dot": r["fine_detail"]}
    page = ablation.markdown(ablation.summarise(results, Namespace(samples=8, init="tiny-base", output="runs/ablation"), n_train=10))
    assert "| L | 41.7 (50 / 50 / 25) |" in page  # the kind of detail each seed learnt to read
    with pytest.raises(ValueError, match=r"unknown variant 'L\+X'"):
        ablation.chosen_variants("L,L+X")


def test_replay_cadence_can_be_changed_or_turned_off():
    assert stage_plans("cpu") == BUDGETS["cpu"]
    assert [p.replay_every for p in stage_plans("cpu", 10)] == [None, 10, 10]
    assert [p.replay_every for p in stage_plans("cpu", 0)] == [None, None, None]
    assert [p.count for p in stage_plans("cpu", 10)] == [p.count for p in BUDGETS["cpu"]]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--replay-every", "0"]).replay_every == 0
    for bad in ("1", "-3"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--replay-every", bad])


def test_ablation_fine_detail_draw_is_balanced():
    """The ablation's fine-detail test questions, from a lopsided pool: as many of each kind and,
    within a kind, of each answer and answer position; the same draw every time."""
    def question(n, kind, truth, options):
        return {"id": f"{kind}-{n}", "detail": {"kind": kind}, "options": options, "truth": truth}

    both = (["speckled", "uniform"], ["uniform", "speckled"])
    pool = (
        [question(n, "texture", "uniform", both[n % 2]) for n in range(40)]
        + [question(40 + n, "texture", "speckled", both[n % 2]) for n in range(10)]
        + [question(n, "dot", "no", ["yes", "no"]) for n in range(30)]
        + [question(30 + n, "dot", "yes", ["yes", "no"]) for n in range(8)]
        + [question(n, "label", f"A{n}", [f"A{n}", f"B{n}"]) for n in range(12)]
        + [question(12 + n, "label", f"C{n}", [f"D{n}", f"C{n}"]) for n in range(12)]
    )
    drawn = ablation.balanced_fine_detail(pool, 48)
    cells = {}
    for r in drawn:
        key = (r["detail"]["kind"], r["truth"] if r["detail"]["kind"] != "label" else "", r["options"].index(r["truth"]))
        cells[key] = cells.get(key, 0) + 1
    expected = {("dot", "yes", 0): 8, ("dot", "no", 1): 8, ("label", "", 0): 8, ("label", "", 1): 8}
    expected |= {("texture", t, p): 4 for t in ("speckled", "uniform") for p in (0, 1)}
    assert cells == expected
    assert [r["id"] for r in drawn] == [r["id"] for r in ablation.balanced_fine_detail(pool, 48)]
    # always saying "no" / "uniform", or always taking the first option, scores 50%
    def share(kinds, answer):
        mine = [r for r in drawn if r["detail"]["kind"] in kinds]
        return sum(answer(r) == r["truth"] for r in mine) / len(mine)

    assert share({"dot"}, lambda r: "no") == share({"texture"}, lambda r: "uniform") == 0.5
    assert share({"dot", "label", "texture"}, lambda r: r["options"][0]) == 0.5


def test_ablation_page_names_each_kinds_gate():
    """Per-kind probe ceilings go into the summary and the page says which gate each kind meets."""
    results = [
        {"variant": v, "seed": 0, "fine_detail": 0.5, "coarse": 0.6, "n_fine_detail": 4, "n_coarse": 4,
         "train_seconds": 1.0, "last_loss": 1.0}
        for v in ("L", "L+M+H")
    ]
    by_kind = {"dot": {"low": 0.5, "high": 0.5}, "texture": {"low": 0.54, "high": 0.96}, "blob": {"low": 0.9, "high": 0.95}}
    summary = ablation.summarise(results, Namespace(samples=8, init="tiny-base", output="runs/x"), 10, {"low": 0.5, "high": 0.73}, by_kind)
    assert summary["probe_ceilings"] == {"low": 0.5, "high": 0.73} and summary["probe_ceilings_by_kind"] == by_kind
    page = ablation.markdown(summary)
    assert "- dot: low 50.0%, high 50.0% (the high crops do not carry it: a ceiling gap" in page
    assert "- texture: low 54.0%, high 96.0% (carried by the high crops only" in page
    assert "- blob: low 90.0%, high 95.0% (the low view carries it too" in page


def test_ablation_page_reads_each_kinds_score_against_its_own_ceiling():
    """A kind scored at its ceiling is learnt, one far below is a learning gap, and a kind with
    no ceiling (labels) is not compared with another kind's."""
    kinds = {"L": {"label": 0.55, "texture": 0.5}, "L+M+H": {"label": 0.47, "texture": 1.0}}
    results = [
        {"variant": v, "seed": 0, "fine_detail": 0.7, "fine_detail_by_kind": kinds[v], "coarse": 0.6,
         "n_fine_detail": 4, "n_coarse": 4, "train_seconds": 1.0, "last_loss": 1.0}
        for v in ("L", "L+M+H")
    ]
    by_kind = {"texture": {"low": 0.44, "high": 0.94}}
    summary = ablation.summarise(results, Namespace(samples=8, init="tiny-base", output="runs/x"), 10, {"low": 0.44, "high": 0.94}, by_kind)
    page = ablation.markdown(summary)
    assert "label 47.0% (no probe ceiling); texture 100.0% against the high crops' ceiling of 94.0% (learnt)" in page
    summary["variants"]["L+M+H"]["fine_detail_by_kind"]["texture"] = 0.6
    assert "texture 60.0% against the high crops' ceiling of 94.0% (a learning gap)" in ablation.markdown(summary)


def test_ablation_pools_per_kind_ceilings_by_question_count():
    """The all-kinds ceiling is the per-kind hits over all probed questions, not a plain mean."""
    parts = [({"low": 0.5, "high": 0.5}, 24), ({"low": 0.5417, "high": 0.9583}, 24), ({"low": 1.0, "high": 1.0}, 2)]
    assert ablation.pooled_accuracy(parts) == {"low": round(27 / 50, 4), "high": round(37 / 50, 4)}
    assert ablation.pooled_accuracy([]) == {}
