"""Seeded data mixtures: a recipe's (dataset, weight or count) entries -> a plan of optimizer steps.

The plan depends only on the seed: which samples form each global batch, and which steps are
text-only interleaved steps. A run's data position is then just a step index, so resuming is
exact and every process reads the same plan. Records come from `training.engine.records`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.engine.recipe import DatasetSpec, Recipe
from training.engine.records import Record, read_records


def resolve_spec(spec: DatasetSpec, data_root: Path) -> tuple[Path, Path | None]:
    """The data file and image root of a mixture entry; `builtin:` data is generated on first use."""
    if spec.path.startswith("builtin:"):
        from training.engine.builtin_data import ensure_builtin

        return ensure_builtin(spec.path.removeprefix("builtin:"))
    path = Path(spec.path) if Path(spec.path).is_absolute() else data_root / spec.path
    root = None
    if spec.image_root is not None:
        root = Path(spec.image_root) if Path(spec.image_root).is_absolute() else data_root / spec.image_root
    return path, root


def load_spec(spec: DatasetSpec, data_root: Path, seed: int) -> list[Record]:
    """Read one mixture entry, drop excluded sources and cap instructions per image."""
    path, image_root = resolve_spec(spec, data_root)
    records = read_records(path, image_root, spec.name)
    if spec.exclude_sources:
        excluded = set(spec.exclude_sources)
        records = [r for r in records if r.source not in excluded]
    if spec.max_per_image:
        records = cap_per_image(records, spec.max_per_image, seed)
    if spec.turns_per_image:
        records = join_per_image(records, spec.turns_per_image, seed)
    if not records:
        raise ValueError(f"dataset {spec.name} ({path}) has no records")
    return records


def cap_per_image(records: list[Record], k: int, seed: int) -> list[Record]:
    """Keep at most k records per image, drawn by seed (appendix A: SVIT at 8 per image)."""
    by_image: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_image.setdefault(str(record.image), []).append(index)
    rng = random.Random(seed)
    keep = sorted(i for indices in by_image.values() for i in (indices if len(indices) <= k else rng.sample(indices, k)))
    return [records[i] for i in keep]


def join_per_image(records: list[Record], max_turns: int, seed: int) -> list[Record]:
    """Join the records of each image, in a seeded order, into conversations of at most
    `max_turns` turns; a record is never split (one longer than `max_turns` stays alone).

    On this model ~75% of a single-question sample's tokens are the image's, so a conversation
    of four questions costs little more than one. The joined record keeps the first record's
    id and metadata, with the ids it holds under `meta["joined"]`. Text-only records stay alone."""
    by_image: dict[str, list[Record]] = {}
    for index, record in enumerate(records):
        by_image.setdefault(str(record.image) if record.image is not None else f"text-{index}", []).append(record)
    rng = random.Random(f"{seed}-join")
    joined = []
    for group in by_image.values():
        rng.shuffle(group)
        chunk: list[Record] = []
        for record in group:
            if chunk and sum(len(r.turns) for r in chunk) + len(record.turns) > max_turns:
                joined.append(join_records(chunk))
                chunk = []
            chunk.append(record)
        joined.append(join_records(chunk))
    return joined


def join_records(records: list[Record]) -> Record:
    """One conversation from records about the same image (a single record is returned as is)."""
    if len(records) == 1:
        return records[0]
    first = records[0]
    turns = [turn for record in records for turn in record.turns]
    meta = first.meta | {"joined": [r.id for r in records]}
    return Record(first.id, first.image, turns, first.source, meta)


def draw(size: int, n: int, rng: random.Random) -> list[int]:
    """n indices into a dataset of `size`: whole passes, then a seeded sample without replacement."""
    full, rest = divmod(n, size)
    return [i for _ in range(full) for i in range(size)] + rng.sample(range(size), rest)


@dataclass(frozen=True)
class Step:
    """One optimizer step's global batch: (dataset index, record index) pairs, one stream."""

    stream: int
    refs: tuple[tuple[int, int], ...]


@dataclass
class Mixture:
    """Loaded datasets plus the seeded step plan of a recipe."""

    names: list[str]
    datasets: list[list[Record]]
    steps: list[Step]

    def records(self, step: Step) -> list[Record]:
        return [self.datasets[d][i] for d, i in step.refs]

    def summary(self) -> dict:
        """Samples per dataset over the plan, the check the 85/15 kind of split is met."""
        counts = {name: 0 for name in self.names}
        for step in self.steps:
            for d, _ in step.refs:
                counts[self.names[d]] += 1
        return {"steps": len(self.steps), "samples": counts}


def epoch_order(specs: list[DatasetSpec], sizes: list[int], seed: int, epochs: float) -> list[tuple[int, int]]:
    """All main-stream samples of the run, shuffled together, each epoch drawn anew."""
    order: list[tuple[int, int]] = []
    whole = int(epochs) + (epochs % 1 > 0)
    for epoch in range(whole):
        rng = random.Random(f"{seed}-epoch-{epoch}")
        chunk = []
        for d, (spec, size) in enumerate(zip(specs, sizes, strict=True)):
            if spec.interleave_every is not None:
                continue
            n = spec.count if spec.count is not None else round(spec.weight * size)
            chunk += [(d, i) for i in draw(size, n, rng)]
        rng.shuffle(chunk)
        if epoch == whole - 1 and epochs % 1:
            chunk = chunk[: round(len(chunk) * (epochs % 1))]
        order += chunk
    return order


def plan_steps(specs: list[DatasetSpec], sizes: list[int], seed: int, epochs: float, global_batch: int) -> list[Step]:
    """Cut the main stream into global batches and insert the interleaved text-only steps.

    Step s (1-based) belongs to the interleaved stream with the largest `interleave_every`
    dividing s (so math every 50 wins over text every 10), else to the main stream. Interleaved
    steps are extra: they do not consume image samples, and they keep the number of
    micro-batches per step constant, which DeepSpeed's accumulation requires.
    """
    order = epoch_order(specs, sizes, seed, epochs)
    main_batches = [tuple(order[i : i + global_batch]) for i in range(0, len(order) - global_batch + 1, global_batch)]
    streams = sorted(
        ((spec.interleave_every, d) for d, spec in enumerate(specs) if spec.interleave_every is not None),
        reverse=True,
    )
    cycles = {d: stream_cycle(d, sizes[d], seed) for _, d in streams}
    steps, s, main_index = [], 0, 0
    while main_index < len(main_batches):
        s += 1
        due = next((d for every, d in streams if s % every == 0), None)
        if due is None:
            steps.append(Step(-1, main_batches[main_index]))
            main_index += 1
        else:
            steps.append(Step(due, tuple((due, next(cycles[due])) for _ in range(global_batch))))
    return steps


def stream_cycle(dataset: int, size: int, seed: int) -> Iterator[int]:
    """An interleaved stream: endless seeded passes, each in a new order."""
    cycle = 0
    while True:
        permutation = list(range(size))
        random.Random(f"{seed}-stream-{dataset}-{cycle}").shuffle(permutation)
        yield from permutation
        cycle += 1


def build_mixture(recipe: Recipe) -> Mixture:
    """Load every dataset of a recipe and plan its steps (deterministic in `recipe.seed`)."""
    root = Path(recipe.data_root)
    datasets = [load_spec(spec, root, recipe.seed) for spec in recipe.datasets]
    sizes = [len(d) for d in datasets]
    steps = plan_steps(recipe.datasets, sizes, recipe.seed, recipe.epochs, recipe.global_batch_size)
    if not steps:
        raise ValueError(f"the mixture has fewer samples than one global batch ({recipe.global_batch_size})")
    return Mixture([s.name for s in recipe.datasets], datasets, steps)


def plan_fingerprint(mixture: Mixture) -> str:
    """Hash of the step plan: a checkpoint only resumes the run it was planned for."""
    h = hashlib.sha256()
    for step in mixture.steps:
        h.update(repr((step.stream, step.refs)).encode())
    return h.hexdigest()[:16]
