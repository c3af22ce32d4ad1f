"""Training data: LLaVA-style records, the release's parquet layout, and seeded mixtures.

One in-memory form, `Record`: an optional image path and a list of (user, assistant) turns.
Readers accept
- LLaVA-style JSON (a list) or JSONL: `{"id", "image", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...], "source"}`; `image` is
  relative to an image root; records without `image` are text-only;
- the release's parquet layout: columns `image_url` (relative to the image root; empty for
  text-only), `source`, and either `conversations` (a Llama-3 formatted string) or `text`
  (a caption, turned into an instruction + answer).

The mixture turns a recipe's (dataset, weight or count) entries into a plan of optimizer steps
that depends only on the seed: which samples form each global batch, and which steps are
text-only interleaved steps. A run's data position is then just a step index, so resuming is
exact and every process reads the same plan.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.engine.recipe import DatasetSpec, Recipe

# Instructions for caption-only records (the release drew one at random per use; we draw by
# the record's id so that a record always reads the same).
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What does this image show?",
    "Summarise the content of the image in one sentence.",
    "Write a concise description of the picture.",
)
LLAMA3_TURN = re.compile(
    r"<\|start_header_id\|>(user|assistant)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S
)


@dataclass
class Record:
    """One training or evaluation sample: an optional image and alternating turns."""

    id: str
    image: Path | None
    turns: list[tuple[str, str]]
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def instruction_text(self) -> str:
        """The user side of the conversation, normalised: what dedup compares."""
        return " ".join(" ".join(q.lower().split()) for q, _ in self.turns)


def strip_image_marker(text: str) -> str:
    """Remove LLaVA's `<image>` marker: the processor places the image block itself."""
    return text.replace("<image>", "").strip()


def turns_from_conversations(conversations: list[dict]) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> (user, assistant) pairs; system turns are not supported."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns, pending = [], None
    for message in conversations:
        role = roles.get(message.get("from") or message.get("role"))
        text = strip_image_marker(str(message.get("value", message.get("content", ""))))
        if role == "user" and pending is None:
            pending = text
        elif role == "assistant" and pending is not None:
            turns.append((pending, text))
            pending = None
        else:
            raise ValueError(f"conversation does not alternate human/gpt: {message}")
    if pending is not None:
        raise ValueError("conversation ends with a human turn")
    return turns


def caption_turn(record_id: str, caption: str) -> tuple[str, str]:
    digest = int(hashlib.sha1(record_id.encode()).hexdigest(), 16)
    return CAPTION_INSTRUCTIONS[digest % len(CAPTION_INSTRUCTIONS)], caption.strip()


def record_from_llava(raw: dict, image_root: Path | None, default_id: str, source: str) -> Record:
    image = raw.get("image")
    if isinstance(image, list):  # LLaVA allows a list; Dragonfly takes one image per sample
        if len(image) != 1:
            raise ValueError(f"record {raw.get('id', default_id)}: one image per sample")
        image = image[0]
    record_id = str(raw.get("id", default_id))
    path = None
    if image:
        path = Path(image) if image_root is None else image_root / image
    meta = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations", "source")}
    return Record(record_id, path, turns_from_conversations(raw["conversations"]), raw.get("source", source), meta)


def record_from_release_row(row: dict, image_root: Path | None, default_id: str, source: str) -> Record:
    record_id = str(row.get("id") or default_id)
    url = (row.get("image_url") or "").strip()
    path = None
    if url:
        path = Path(url) if Path(url).is_absolute() or image_root is None else image_root / url
    if row.get("conversations"):
        turns = [(q.strip(), a.strip()) for q, a in pairwise_turns(row["conversations"])]
    else:
        turns = [caption_turn(record_id, row["text"])]
    return Record(record_id, path, turns, row.get("source") or source)


def pairwise_turns(formatted: str) -> Iterator[tuple[str, str]]:
    """Split a Llama-3 formatted conversation string into (user, assistant) pairs."""
    messages = LLAMA3_TURN.findall(formatted)
    if not messages or len(messages) % 2:
        raise ValueError("release conversation string does not hold user/assistant pairs")
    for (r1, q), (r2, a) in zip(messages[::2], messages[1::2], strict=True):
        if (r1, r2) != ("user", "assistant"):
            raise ValueError("release conversation string does not alternate user/assistant")
        yield strip_image_marker(q), a


def read_records(path: Path, image_root: Path | None = None, source: str = "") -> list[Record]:
    """Read JSON, JSONL, a parquet file or a folder of parquet files into records."""
    path = Path(path)
    source = source or path.stem
    if path.is_dir() or path.suffix == ".parquet":
        import pyarrow.parquet as pq

        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no parquet files in {path}")
        rows = [row for f in files for row in pq.read_table(f).to_pylist()]
        return [record_from_release_row(r, image_root, f"{source}-{i}", source) for i, r in enumerate(rows)]
    text = path.read_text()
    if path.suffix == ".jsonl":
        raws = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        raws = json.loads(text)
    return [record_from_llava(r, image_root, f"{source}-{i}", source) for i, r in enumerate(raws)]


def record_to_llava(record: Record, image_root: Path | None = None) -> dict:
    """The inverse of `record_from_llava`: what converters and dedup write."""
    out: dict = {"id": record.id}
    if record.image is not None:
        image = record.image
        if image_root is not None and image.is_relative_to(image_root):
            image = image.relative_to(image_root)
        out["image"] = str(image)
    conversations = []
    for index, (question, answer) in enumerate(record.turns):
        if index == 0 and record.image is not None:
            question = f"<image>\n{question}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    out["conversations"] = conversations
    if record.source:
        out["source"] = record.source
    out.update(record.meta)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


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
