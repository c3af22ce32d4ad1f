"""Score a model on a biomedical benchmark, beside the paper's tables 5 and 6.

    python -m training eval --benchmark vqa-rad --data DIR --model MODEL [--json]

DIR is either a folder written by `python -m training convert` (it holds `{split}.jsonl`) or the
benchmark's official layout (converted on the fly). Answers are generated greedily, as released,
through the app's chat engine (`ChatEngine.answer`), one question per sample. Every prediction is
written to `predictions.jsonl` (id, question, reference, prediction, answer_type) next to
`scores.json`, so anyone can recompute the scores. Metrics are percentages, as in the paper.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from training.benchmarks.convert import BENCHMARKS
from training.benchmarks.metrics import caption_metrics, vqa_metrics
from training.engine.records import Record, read_records

# (metric key, label) per task, in the paper's row order.
METRICS = {
    "vqa": (("closed_accuracy", "Acc (closed)"), ("token_f1", "Token F1")),
    "caption": (("rouge_l", "ROUGE-L"), ("meteor", "METEOR"), ("cider", "CIDEr")),
}
# The paper's comparison columns: table 6 (VQA) and table 5 (captioning / report generation).
PAPER_COLUMNS = {
    "vqa": ("LLaVA-Med", "Med-Gemini", "SOTA", "Dragonfly-Med (paper)"),
    "caption": ("BiomedGPT", "SOTA", "Dragonfly-Med (paper)"),
}
PAPER = {
    "vqa-rad": {"closed_accuracy": (84.2, 69.7, 87.1, 78.1), "token_f1": (None, 50.1, 62.1, 61.4)},
    "slake": {"closed_accuracy": (83.2, 84.8, 91.6, 91.6), "token_f1": (None, 75.8, 89.3, 89.3)},
    "path-vqa": {"closed_accuracy": (91.7, 83.3, 91.7, 90.6), "token_f1": (None, 58.7, 62.7, 67.1)},
    "iu-xray": {"rouge_l": (28.5, 44.8, 29.1), "meteor": (12.9, 24.2, 30.5), "cider": (40.1, 43.5, 61.7)},
    "peir-gross": {"rouge_l": (36.0, 36.0, 42.0), "meteor": (15.4, 15.4, 40.2), "cider": (122.7, 122.7, 198.5)},
    "roco": {"rouge_l": (18.2, 18.2, 19.2), "meteor": (7.8, 7.8, 15.5), "cider": (24.2, 24.2, 45.2)},
    "mimic-cxr": {"rouge_l": (23.8, 33.5, 25.2), "meteor": (14.2, 19.0, 23.6), "cider": (14.7, 50.9, 50.9)},
}
Predictor = Callable[[Image.Image | None, str], str]


def load_split(benchmark: str, data: Path, split: str) -> list[Record]:
    """The split's records, from converted JSONL if present, else from the official layout."""
    converted = data / f"{split}.jsonl"
    if converted.exists():
        return read_records(converted, data, benchmark)
    records = [r for r in BENCHMARKS[benchmark].convert(data) if r.meta["split"] == split]
    if not records:
        raise FileNotFoundError(f"no {split} split of {benchmark} in {data} (neither {converted.name} nor the official layout)")
    return records


def chat_predictor(model: str, max_new_tokens: int) -> tuple[Predictor, str]:
    """Greedy answers from the app's chat engine; returns (predict, model id)."""
    from dragonfly_med.chat import ChatEngine, SamplingParams

    engine = ChatEngine.load(model)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    return (lambda image, question: engine.answer(image, question, params)), engine.model_id


def evaluate(benchmark: str, records: list[Record], predict: Predictor, output: Path) -> dict:
    """Predict every record, write predictions.jsonl + scores.json, return the scores."""
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    predictions_file = output / "predictions.jsonl"
    with predictions_file.open("w") as handle:
        for record in records:
            question, reference = record.turns[0]
            image = Image.open(record.image).convert("RGB") if record.image is not None else None
            row = {
                "id": record.id,
                "question": question,
                "reference": reference,
                "prediction": predict(image, question).strip(),
                "answer_type": record.meta.get("answer_type", "open"),
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows.append(row)
    predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    if BENCHMARKS[benchmark].task == "vqa":
        metrics = vqa_metrics(predictions, references, [r["answer_type"] for r in rows])
    else:
        metrics = caption_metrics(predictions, references)
    scores = {
        "benchmark": benchmark,
        "n": len(rows),
        "metrics": {k: round(v, 2) for k, v in metrics.items()},
        "predictions_file": str(predictions_file),
    }
    (output / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores


def paper_table(scores: dict) -> str:
    """A table shaped like the paper's table 5 or 6, with our column last."""
    benchmark = scores["benchmark"]
    task = BENCHMARKS[benchmark].task
    header = ["Dataset", "Metric", *PAPER_COLUMNS[task], "Ours"]
    lines = [header]
    for index, (key, label) in enumerate(METRICS[task]):
        paper = ["-" if v is None else f"{v:.1f}" for v in PAPER[benchmark][key]]
        ours = scores["metrics"].get(key)
        lines.append([benchmark if index == 0 else "", label, *paper, "-" if ours is None else f"{ours:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text) + f"\n(n = {scores['n']}; predictions: {scores['predictions_file']})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--data", type=Path, required=True, help="converted folder ({split}.jsonl) or the official layout")
    parser.add_argument("--model", default="tiny", help="tiny, a model folder (e.g. runs/med-stage3/final) or a hub id")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N samples (quick checks)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 for VQA, 256 for captions/reports")
    parser.add_argument("--output", type=Path, default=None, help="folder for predictions.jsonl and scores.json")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    records = load_split(args.benchmark, args.data, args.split)[: args.limit]
    task = BENCHMARKS[args.benchmark].task
    predict, model_id = chat_predictor(args.model, args.max_new_tokens or (64 if task == "vqa" else 256))
    slug = re.sub(r"[^\w.-]+", "_", model_id).strip("_")
    output = args.output or Path("runs/eval") / f"{args.benchmark}-{args.split}-{slug}"
    scores = evaluate(args.benchmark, records, predict, output) | {"model": model_id, "split": args.split}
    print(json.dumps(scores, indent=2) if args.json else paper_table(scores))
    return 0
