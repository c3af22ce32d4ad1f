"""Score a model on the offline-med test split, next to two baselines measured in the same run.

    python -m training eval --benchmark offline-med --model tiny --json        # via training/benchmarks/evaluate.py
    python -m training eval --benchmark offline-med --model runs/x/final --data runs/offline-med --json

Metrics are the paper's VQA metrics (training/benchmarks/metrics.py): closed-question accuracy and token
F1 over all questions, overall and per family, as fractions in [0, 1]. offline-med answers with
the evidence first ("This is a CT, so no."), so closed accuracy scores the option an answer
commits to after its evidence (`committed_answer`) against the record's `truth`;
`closed_accuracy_strict` asks for the reference sentence word for word. `yes_rate` and
`truth_yes_rate` (share of "yes" among the committed answers to yes/no questions, and in the
truth) show an answer prior that accuracy hides. With `--probe F.json` (written by
`python -m training probe-features`), each family also gets its `probe_ceiling`: how well a
linear read-out of the frozen tower's features answers the same questions. Baselines, measured on the same records:
- `no_image`: the same LLM asked the same question without the image block, i.e. what the
  question text alone (options, priors of the language model) buys;
- `untrained_projector`: the tiny model as it was before any training (SmolLM2 + EfficientNet
  + the seeded, calibrated random projector), i.e. what training bought.

Why the image features are cached: on this 2-core CPU the vision tower costs as much as the
LLM prefill (41 crops per image). The tower is frozen in every tiny recipe we run, so its
features are identical for the model and its baselines (and for the ablation's geometries,
whose crops are subsets of the full plan's): we run it once per image and key the cache by a
fingerprint of the tower's weights, so a tower that was trained gets its own entries.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from training.engine.feature_cache import FeatureCache, default_cache_dir
from training.offline_med.build import DEFAULT_DATA, add_data_argument, ensure_built
from training.offline_med.scoring import score, table

BASELINES = ("no_image", "untrained_projector")
PER_FAMILY = 24  # test questions per family that the model card reports


# ---- records ---------------------------------------------------------------------------------


def load_split(data_dir: Path, split: str = "test") -> list[dict]:
    """Single-turn records of one split (multi-turn conversations are training-only)."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; build the data with `python -m training build-offline-med --out {data_dir}`"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if len(r["conversations"]) == 2]


def question_answer(record: dict) -> tuple[str, str]:
    human, gpt = record["conversations"]
    return human["value"].replace("<image>", "").strip(), gpt["value"].strip()


def subsample(
    records: list[dict],
    per_family: int | None,
    families: tuple[str, ...] | None = None,
    seed: int = 0,
) -> list[dict]:
    """At most `per_family` records of each family, drawn by seed, closed questions first.

    CPU time, not data, limits how many questions we can ask; a seeded draw per family keeps
    every family represented and makes two runs with the same seed ask the same questions.
    Closed questions are preferred because accuracy is the headline metric. Complementary
    questions (records sharing a `group`: one text asked of images with different answers) are
    drawn whole, so that the question text alone stays at chance on the draw too.
    """
    by_family: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if families is None or record["family"] in families:
            by_family[record["family"]].append(record)
    chosen = []
    for family in sorted(by_family):
        group = by_family[family]
        if per_family is not None and len(group) > per_family:
            rng = random.Random(f"{seed}-{family}")
            closed = [r for r in group if r["answer_type"] == "closed"]
            opened = [r for r in group if r["answer_type"] != "closed"]
            rng.shuffle(opened)
            n_open = min(len(opened), per_family // 4)
            group = whole_groups(closed, per_family - n_open, rng) + opened[:n_open]
            group = group + opened[n_open : n_open + per_family - len(group)]
        chosen += group
    return chosen


def whole_groups(records: list[dict], limit: int, rng: random.Random) -> list[dict]:
    """A seeded draw of at most `limit` records that takes each `group` whole or not at all
    (a record without one is a group of its own)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for n, record in enumerate(records):
        groups[record.get("group") or f"#{n}"].append(record)
    units = list(groups.values())
    rng.shuffle(units)
    drawn: list[dict] = []
    for unit in units:
        if len(drawn) + len(unit) <= limit:
            drawn += unit
    return drawn


# ---- answering -------------------------------------------------------------------------------


SHORT_ANSWER_TOKENS = 32  # "The marked point is in the Frontal_Sup_Medial_L, so no." fits


def max_tokens_for(record: dict, cap: int) -> int:
    """Closed and short answers are one sentence; descriptions get `cap`. Reference length
    bounds the budget: a longer answer could only lower precision."""
    return SHORT_ANSWER_TOKENS if record["family"] != "description" else cap


ANSWER_BATCH = 8  # questions decoded together (see `generate_batch`)


def generate_batch(
    model, processor, prompts: list[tuple[str, torch.Tensor | None, object]], max_new_tokens: int
) -> list[str]:
    """Greedy answers to several (question, image embeds or None, plan) at once, left-padded.

    Why batched: decoding a 135M-parameter LLM on a CPU is bound by reading its weights (~0.5 GB
    per token in fp32), and a batch reads them once per step for all its rows: eight questions
    cost little more than one. Padding is masked, so each answer is the one it gets alone, up to
    float rounding."""
    batch = processor.collate(
        [processor.build_prompt_ids([(question, None)], plan) for question, _, plan in prompts]
    )
    images = [embeds for _, embeds, _ in prompts if embeds is not None]
    eos = list(processor.eos_token_ids) + [
        i for i in (model.config.eos_token_ids or []) if i not in processor.eos_token_ids
    ]
    with torch.inference_mode():
        out = model.generate(
            **batch,
            image_embeds=images or None,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=processor.pad_token_id,
        )
    width = batch["input_ids"].shape[1]
    return [processor.decode(row).strip() for row in out[:, width:]]


def with_options(rows: list[dict], data_dir: Path, split: str = "test") -> list[dict]:
    """Attach each record's offered `options` and `truth` (by id) to prediction rows written
    without them."""
    records = {r["id"]: r for r in load_split(data_dir, split)}
    return [
        r | {key: r.get(key, records.get(r["id"], {}).get(key)) for key in ("options", "truth")}
        for r in rows
    ]


def rescore(predictions_file: Path, data_dir: Path, split: str = "test") -> dict:
    """Scores recomputed from a predictions JSONL (model and baselines), without any model."""
    rows = [json.loads(line) for line in Path(predictions_file).read_text().splitlines() if line]
    rows = with_options(rows, data_dir, split)
    systems = {}
    for row in rows:
        systems.setdefault(row.get("system", "model"), []).append(row)
    result = score(systems.pop("model"))
    result["baselines"] = {name: score(group) for name, group in systems.items()}
    return result


def image_prompt(
    model, processor, record: dict, data_dir: Path, cache: FeatureCache, use_image: bool, levels: tuple[str, ...]
) -> tuple[str, torch.Tensor | None, object]:
    """(question, visual embeddings of `levels` or None, crop plan or None) of one record."""
    question, _ = question_answer(record)
    if not use_image:
        return question, None, None
    found = cache.features(model, processor.image_processor, data_dir / record["image"])
    with torch.inference_mode():
        embeds = cache.embeds(model, found, levels)
    return question, embeds, processor.image_processor.plan(found.image_size)


def answer_all(
    model,
    processor,
    records: list[dict],
    data_dir: Path,
    cache: FeatureCache,
    *,
    use_image: bool = True,
    levels: tuple[str, ...] | None = None,
    max_new_tokens: int = 64,
    label: str = "model",
    batch_size: int = ANSWER_BATCH,
) -> list[dict]:
    """Predictions of one model on `records` (one row per record, in their order, JSON-ready);
    questions with the same answer budget are decoded `batch_size` at a time."""
    from tqdm import tqdm

    levels = levels or model.config.get_geometry().levels
    batches: dict[int, list[int]] = defaultdict(list)  # answer budget -> record indices
    for index, record in enumerate(records):
        batches[max_tokens_for(record, max_new_tokens)].append(index)
    predictions: dict[int, str] = {}
    with tqdm(total=len(records), desc=label, file=sys.stderr, disable=len(records) < 4) as bar:
        for budget, indices in batches.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                prompts = [image_prompt(model, processor, records[i], data_dir, cache, use_image, levels) for i in chunk]
                predictions.update(zip(chunk, generate_batch(model, processor, prompts, budget), strict=True))
                bar.update(len(chunk))
    rows = []
    for index, record in enumerate(records):
        question, reference = question_answer(record)
        rows.append(
            {
                "id": record["id"],
                "family": record["family"],
                "answer_type": record["answer_type"],
                "question": question,
                "reference": reference,
                "options": record.get("options"),
                "truth": record.get("truth"),
                "prediction": predictions[index],
            }
        )
    return rows


# ---- models ----------------------------------------------------------------------------------


def untrained_tiny():
    """(model, processor) of the untrained tiny model: the `untrained_projector` baseline."""
    from dragonfly_med.checkpoints.loading import load_model

    return load_model("tiny-base", dtype=torch.float32, device_map="cpu")


def evaluate_offline_med(
    model,
    processor,
    data_dir: str | Path = DEFAULT_DATA,
    *,
    split: str = "test",
    per_family: int | None = PER_FAMILY,
    families: tuple[str, ...] | None = None,
    baselines: tuple[str, ...] = BASELINES,
    max_new_tokens: int = 64,
    seed: int = 0,
    predictions_file: str | Path | None = None,
    baseline_models: dict | None = None,
    probe_ceilings: dict[str, float] | None = None,
) -> dict:
    """Scores of `model` on the offline-med `split`, with baselines measured on the same records.

    Returns {closed_accuracy, token_f1, n, n_closed, by_family, baselines: {name: same keys},
    split, records, seconds}; every score is a fraction in [0, 1] or None when a group has no
    (closed) questions. `baseline_models` may supply {"untrained_projector": (model, processor)}
    (tests pass tiny random models); by default the untrained tiny model is built.
    `probe_ceilings` (family -> fraction, `read_probe_ceilings`) are reported per family.
    """
    started = time.time()
    data_dir = Path(data_dir)
    records = subsample(load_split(data_dir, split), per_family, families, seed)
    cache = FeatureCache(default_cache_dir())
    rows = answer_all(
        model, processor, records, data_dir, cache, max_new_tokens=max_new_tokens, label="model"
    )
    result = score(rows, probe_ceilings)
    result["baselines"] = {}
    all_rows = {"model": rows}
    for name in baselines:
        if name == "no_image":
            base_rows = answer_all(
                model,
                processor,
                records,
                data_dir,
                cache,
                use_image=False,
                max_new_tokens=max_new_tokens,
                label=name,
            )
        elif name == "untrained_projector":
            base_model, base_processor = (baseline_models or {}).get(name) or untrained_tiny()
            base_rows = answer_all(
                base_model,
                base_processor,
                records,
                data_dir,
                cache,
                max_new_tokens=max_new_tokens,
                label=name,
            )
        else:
            raise ValueError(f"unknown baseline {name!r}; known: {BASELINES}")
        all_rows[name] = base_rows
        result["baselines"][name] = score(base_rows)
    if predictions_file is not None:
        path = Path(predictions_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for name, group in all_rows.items():
                for row in group:
                    handle.write(json.dumps(row | {"system": name}) + "\n")
        result["predictions_file"] = str(path)
    result.update(
        split=split, per_family=per_family, seed=seed, seconds=round(time.time() - started, 1)
    )
    return result


def read_probe_ceilings(path: Path, split: str) -> dict[str, float]:
    """family -> the probe's accuracy on `split`'s questions, from probe-features' JSON
    (`ceilings.<split>.<family>`)."""
    data = json.loads(Path(path).read_text())
    ceilings = data.get("ceilings", {}).get(split)
    if ceilings is None:
        raise ValueError(f"{path} has no probe ceilings for the {split!r} split; rerun probe-features")
    return {family: value for family, value in ceilings.items() if value is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", default="offline-med", choices=["offline-med"])
    parser.add_argument(
        "--model", default="tiny", help="'tiny', a model directory or a run's final folder"
    )
    add_data_argument(parser)
    parser.add_argument(
        "--split", default="test", choices=["test", "val", "train"], help="train: how well it fits what it saw"
    )
    parser.add_argument(
        "--per-family",
        type=int,
        default=PER_FAMILY,
        help=f"questions per family (CPU time; {PER_FAMILY} = the model card); 0 = all",
    )
    parser.add_argument(
        "--baselines", default=",".join(BASELINES), help="comma-separated; '' for none"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="cap for open (description) answers"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="which questions the per-family draw picks"
    )
    parser.add_argument(
        "--predictions", type=Path, default=None, help="write every prediction (JSONL)"
    )
    parser.add_argument(
        "--probe", type=Path, default=None, help="probe-features JSON: adds each family's probe_ceiling"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the JSON result instead of a table"
    )


def run(args: argparse.Namespace) -> int:
    from dragonfly_med.checkpoints.loading import load_model

    ensure_built(args.data)
    model, processor = load_model(args.model, dtype=torch.float32, device_map="cpu")
    result = evaluate_offline_med(
        model,
        processor,
        args.data,
        split=args.split,
        per_family=args.per_family or None,
        baselines=tuple(b for b in args.baselines.split(",") if b),
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        predictions_file=args.predictions,
        probe_ceilings=read_probe_ceilings(args.probe, args.split) if args.probe else None,
    )
    result = {"benchmark": "offline-med", "model": str(args.model)} | result
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0

