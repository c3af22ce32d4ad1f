"""`python -m training bench-step [--json] [--docs]`: what one CPU training step of the tiny model
costs per trained answer, in the ways reproduce-tiny's stages 2-3 can run it.

The tiny model as packaged (SmolLM2-135M, Lite0, seeded projector) with rank-16 LoRA adapters on
every LLM projection, bf16 autocast where the CPU runs bf16 natively (fp32 elsewhere, as
reproduce-tiny), tower features computed once (as the trainer's cache does),
a global batch of two samples about a 1024 x 1024 photo. Three ways, timed round-robin in the
same run (medians; the ratios are what to read on a shared CPU):

- `micro_batch_1`: one question per sample, one sample per forward pass (how reproduce-tiny's
  stages 2-3 run);
- `micro_batch_2`: both samples in one forward pass (`micro_batch_size=2`);
- `joined`: and each sample a conversation of four questions about its image
  (`turns_per_image`), so a step trains eight answers instead of two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

QUESTIONS = (
    ("What imaging modality is this: ultrasound or CT?", "CT"),
    ("Which body region does this image show?", "chest"),
    ("Is this slice in the axial plane? Answer yes or no.", "yes"),
    ("Is this CT shown in a bone window or a soft-tissue window?", "soft-tissue window"),
)
WAYS = ("micro_batch_1", "micro_batch_2", "joined")
SECTION = "## Training step"


def micro_batches(way: str) -> list[list[list[tuple[str, str]]]]:
    """The step's micro-batches, each a list of conversations (one per sample)."""
    if way == "joined":
        return [[list(QUESTIONS), list(reversed(QUESTIONS))]]
    singles = [[QUESTIONS[0]], [QUESTIONS[1]]]
    return [singles] if way == "micro_batch_2" else [[singles[0]], [singles[1]]]


def step_seconds(model, processor, cache, path: Path, image, way: str) -> tuple[float, int]:
    """Forward and backward of one optimizer step's micro-batches, each projecting the cached
    tower features anew through the trainer's own `cached_embeds`; (seconds, answers trained)."""
    from training.engine.trainer import MODEL_INPUTS, answer_loss, cached_embeds, cpu_runs_bf16

    answers, started = 0, time.perf_counter()
    for conversations in micro_batches(way):
        batch = processor(images=[image] * len(conversations), conversation=conversations, return_labels=True, return_pixels=False)
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_runs_bf16()):
            embeds = cached_embeds(cache, model, processor, [str(path)] * len(conversations))
            loss = answer_loss(model, inputs | {"image_embeds": embeds})
        loss.backward()
        answers += sum(len(c) for c in conversations)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, answers


def bench_training_step(repeats: int) -> dict[str, Any]:
    from dragonfly_med.checkpoints.tiny import base_model_dir
    from dragonfly_med.cli.bench import photo
    from training.engine.feature_cache import FeatureCache
    from training.engine.recipe import Tune
    from training.engine.trainer import apply_tune, cpu_runs_bf16, load_for_training
    from training.tiny.reproduce import LORA_ALPHA, LORA_RANK

    model, processor = load_for_training(str(base_model_dir()))
    apply_tune(model, Tune(projector=True, vision_encoder=False, llm=True), LORA_RANK, LORA_ALPHA)
    image = photo(1024, 1024)
    cache = FeatureCache()  # in memory: the tower runs once, as the trainer's disk cache makes it
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    answers: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo.png"
        image.save(path)
        for repeat in range(repeats + 1):  # round-robin; the first round warms up (and runs the tower)
            for way in WAYS:
                seconds, answers[way] = step_seconds(model, processor, cache, path, image, way)
                if repeat:
                    times[way].append(seconds)
    step = {way: statistics.median(times[way]) for way in WAYS}
    per_answer = {way: step[way] / answers[way] for way in WAYS}
    return {
        "repeats": repeats,
        "precision": "bf16 autocast" if cpu_runs_bf16() else "fp32",
        "step_s": step,
        "answers_per_step": answers,
        "per_answer_s": per_answer,
        "speedup_per_answer": {way: per_answer["micro_batch_1"] / per_answer[way] for way in WAYS},
    }


def markdown(results: dict[str, Any]) -> str:
    rows = [
        f"| `{way}` | {results['answers_per_step'][way]} | {results['step_s'][way]:.2f} s | "
        f"{results['per_answer_s'][way]:.3f} s | {results['speedup_per_answer'][way]:.2f}x |"
        for way in WAYS
    ]
    return "\n".join(
        [
            SECTION,
            "`python -m training bench-step --docs` (`training/tiny/bench_step.py`). Machine: " + results["machine"] + ".",
            f"Tiny model with rank-16 LoRA, {results['precision']}, cached tower features, a step of two samples about",
            f"a 1024 x 1024 photo; forward + backward, median of {results['repeats']} round-robin repeats.",
            "",
            "| way | answers per step | step | per answer | vs `micro_batch_1` |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "reproduce-tiny's stages 2-3 run `micro_batch_1`. Samples here are of equal length; on offline-med,",
            "whose joined samples differ in length, micro-batch 2 pads and a step of two joined samples",
            "(up to 6 turns) took 2.0 s against 2.2 s for two single questions (docs/tiny-default.md).",
            "",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--docs", action="store_true", help=f"write the {SECTION!r} section of docs/benchmarks.md")


def run(args: argparse.Namespace) -> int:
    from dragonfly_med.cli.bench import DOCS, machine
    from dragonfly_med.cli.timing import write_section

    stdout, sys.stdout = sys.stdout, sys.stderr  # keep stdout for the JSON
    try:
        results = {"machine": machine()} | bench_training_step(args.repeats)
    finally:
        sys.stdout = stdout
    if args.docs:
        write_section(DOCS, SECTION, markdown(results))
    print(json.dumps(results, indent=2) if args.json else markdown(results))
    return 0
