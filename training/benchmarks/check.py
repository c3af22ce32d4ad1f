"""Check a recipe's data (or record files) before a run: what would fail or silently mislead.

Reports, per dataset: missing or unreadable images, samples with an empty answer, and samples
longer than max_seq_length (which the trainer would truncate); a malformed record (turns that
do not alternate human/gpt) stops the check with its reader's message. Lengths are
exact and cheap: the processor builds each sample's token ids with the image block that the
model's geometry plans for the image's size (read from its header; no pixels are decoded).
Exit status 1 when anything is found, so a launch script can stop before spending GPU hours.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from training.engine.mixture import resolve_spec
from training.engine.recipe import load_recipe
from training.engine.records import Record, read_records

EXAMPLES = 5


@dataclass
class Report:
    """Problems found in one dataset; lists hold record ids (at most EXAMPLES kept each)."""

    records: int = 0
    missing_images: list[str] = field(default_factory=list)
    empty_answers: list[str] = field(default_factory=list)
    over_long: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"missing_images": 0, "empty_answers": 0, "over_long": 0})
    max_length: int = 0

    def add(self, kind: str, record_id: str) -> None:
        self.counts[kind] += 1
        examples = getattr(self, kind)
        if len(examples) < EXAMPLES:
            examples.append(record_id)

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())


def sample_length(processor, record: Record, size: tuple[int, int] | None) -> int:
    plan = processor.image_processor.plan(size) if size is not None else None
    return len(processor.build_prompt_ids(list(record.turns), plan, add_generation_prompt=False).input_ids)


def check_records(records: list[Record], processor=None, max_seq_length: int | None = None) -> Report:
    report = Report(records=len(records))
    for record in records:
        size = None
        if record.image is not None:
            try:
                with Image.open(record.image) as image:
                    size = image.size
            except (FileNotFoundError, OSError):
                report.add("missing_images", record.id)
        if any(not answer.strip() for _, answer in record.turns):
            report.add("empty_answers", record.id)
        if processor is not None and (record.image is None or size is not None):
            length = sample_length(processor, record, size)
            report.max_length = max(report.max_length, length)
            if max_seq_length is not None and length > max_seq_length:
                report.add("over_long", record.id)
    return report


def load_processor(model: str):
    """The processor of a model name/folder without loading its weights."""
    from dragonfly_med.checkpoints.loading import load_processor as load
    from dragonfly_med.checkpoints.loading import resolve_model_dir
    from dragonfly_med.checkpoints.released import is_released_layout, released_config
    from dragonfly_med.model.configuration_dragonfly import DragonflyConfig

    directory = resolve_model_dir(model)
    config = released_config(directory) if is_released_layout(directory) else DragonflyConfig.from_pretrained(directory)
    return load(directory, config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="check every dataset of this recipe")
    parser.add_argument("--data", type=Path, nargs="*", default=[], help="or these record files")
    parser.add_argument("--image-root", type=Path, default=None)
    parser.add_argument("--model", default=None, help="model whose processor measures lengths (default: the recipe's init, else tiny)")
    parser.add_argument("--max-seq-length", type=int, default=None)
    parser.add_argument("--no-lengths", action="store_true", help="skip length checks (no tokenizer needed)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value")


def run(args: argparse.Namespace) -> int:
    if not args.recipe and not args.data:
        raise SystemExit("give --recipe NAME or --data FILE ...")
    datasets: dict[str, list[Record]] = {}
    max_len, model = args.max_seq_length, args.model
    if args.recipe:
        from training.engine.trainer import resolve_init

        recipe = load_recipe(args.recipe, args.overrides)
        for spec in recipe.datasets:
            path, root = resolve_spec(spec, Path(recipe.data_root))
            datasets[spec.name] = read_records(path, root, spec.name)
        max_len = max_len or recipe.max_seq_length
        model = model or resolve_init(recipe)
    for path in args.data:
        datasets[str(path)] = read_records(path, args.image_root)
    processor = None if args.no_lengths else load_processor(model or "tiny")
    reports = {name: check_records(records, processor, max_len) for name, records in datasets.items()}
    print(json.dumps({"max_seq_length": max_len, "datasets": {k: vars(v) for k, v in reports.items()}}, indent=2))
    return 0 if all(r.ok for r in reports.values()) else 1
