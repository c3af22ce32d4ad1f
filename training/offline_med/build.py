"""`python -m training build-offline-med --out DIR`: a medical VQA set built from offline images.

Writes LLaVA-style JSONL (train.jsonl, val.jsonl, test.jsonl, captions.jsonl for stage 1) and
PNGs under DIR/images/, from the DICOMs, photos and volumes that ship inside pydicom, nibabel,
scikit-image and two Debian packages (see docs/offline-med.md). Every answer is a known fact
about its image, splits never share a source, and the build is deterministic for a given seed.
Sources whose package is missing are skipped with a warning; the build still succeeds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

from tqdm import tqdm

from training.engine.records import write_jsonl
from training.offline_med.catalogue import catalogue, load_views
from training.offline_med.questions import (
    Balancer,
    Sample,
    atlas_sample,
    caption_sample,
    complements,
    fact_samples,
    finding_samples,
    fine_detail_caption,
    fine_detail_sample,
    laterality_sample,
    multi_turn_sample,
    truths_present,
)
from training.offline_med.sources import (
    SCALES,
    Scale,
    Source,
    View,
    aal_names,
)

SPLITS = ("train", "val", "test")
MULTI_TURN_EVERY = 8  # one multi-turn conversation per this many training views
LATERALITY_PER_VIEW, ATLAS_PER_VIEW = 2, 3  # marked points per slice: cheap, and few slices exist


def sources_by_split(sources: list[Source]) -> dict[str, list[Source]]:
    return {split: [s for s in sources if s.split == split] for split in SPLITS}


def view_samples(split: str, views: list[View], rng: random.Random, bal: Balancer, pick: random.Random) -> Iterator[Sample]:
    """Fact questions, a finding, and where known laterality and atlas questions, per view;
    then the complements of every closed fact question (`complements`, images picked by
    `pick`), so that a question's text alone scores at chance in every split."""
    names = aal_names() if any(v.atlas is not None for v in views) else {}
    keyed = [(f"{view.source}#{i}", view) for i, view in enumerate(views)]
    present = truths_present(views)
    to_complement = []
    for i, (key, view) in enumerate(keyed):
        for sample in fact_samples(view, key, rng, bal, paired=split == "train", present=present):
            if sample.answer_type == "closed":
                sample.group = f"{key}:{sample.turns[0].question}"
                to_complement.append(sample)
            yield sample
        yield from finding_samples(view, rng, bal, paired=split == "train")
        if view.midline_x is not None:
            yield from filter(None, [laterality_sample(view, rng, bal) for _ in range(LATERALITY_PER_VIEW)])
        if view.atlas is not None:
            yield from filter(None, [atlas_sample(view, names, rng, bal) for _ in range(ATLAS_PER_VIEW)])
        if split == "train":
            yield caption_sample(view, key, rng)
            if i % MULTI_TURN_EVERY == 0:
                yield multi_turn_sample(view, key, rng, bal)
    for sample in to_complement:
        yield from complements(sample, keyed, pick)


def fine_detail_samples(split: str, views: list[View], scale: Scale, rng: random.Random, bal: Balancer) -> Iterator[Sample]:
    """Large canvases from this split's own views, cycling through them in a shuffled order;
    in the training split each canvas also gets a caption naming its detail (stage 1)."""
    order = list(views)
    rng.shuffle(order)
    for i in range(scale.fine_detail[split] if order else 0):
        side = 16 * (rng.randrange(*scale.canvas) // 16)
        view = order[i % len(order)]
        sample = replace(fine_detail_sample(view, side, rng, bal), image_key=f"fine-detail-{split}-{i}")
        yield sample
        if split == "train":
            yield fine_detail_caption(view, sample, rng)


@dataclass
class Writer:
    """Saves images under DIR/images/<split>/<source>/ and turns samples into JSONL records.

    A view image shared by several samples is written once; derived images (marks, lesions,
    canvases) are written as they come, so that large canvases never pile up in memory.
    """

    root: Path
    saved: dict[str, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def image_path(self, split: str, sample: Sample) -> str:
        if sample.image_key in self.saved:
            return self.saved[sample.image_key]
        folder = sample.source.replace(":", "_")
        self.counts[(split, folder)] += 1
        relative = f"images/{split}/{folder}/{self.counts[(split, folder)]:05d}.png"
        (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
        sample.image.save(self.root / relative, compress_level=1)
        if sample.image_key:
            self.saved[sample.image_key] = relative
        return relative

    def record(self, split: str, index: int, sample: Sample) -> dict:
        conversations = []
        for n, turn in enumerate(sample.turns):
            question = f"<image>\n{turn.question}" if n == 0 else turn.question
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": turn.answer}]
        record = {
            "id": f"offline-med-{split}-{sample.family}-{index:05d}",
            "image": self.image_path(split, sample),
            "conversations": conversations,
            "source": sample.source,
            "family": sample.family,
            "answer_type": sample.answer_type,
            "split": split,
        }
        if len(sample.turns) == 1 and sample.turns[0].options:
            record["options"] = list(sample.turns[0].options)
        if len(sample.turns) == 1 and sample.turns[0].truth is not None:
            record["truth"] = sample.turns[0].truth
        if sample.detail:
            record["detail"] = sample.detail
        if sample.group:
            record["group"] = sample.group
        return record


def build(out: Path, seed: int = 0, scale_name: str = "full") -> dict:
    """Build the whole set into `out`; returns the manifest (also written as manifest.json)."""
    start = time.time()
    scale = SCALES[scale_name]
    out.mkdir(parents=True, exist_ok=True)
    writer = Writer(out)
    manifest = {"seed": seed, "scale": scale_name, "sources": {}, "skipped": [], "counts": {}}
    captions: list[dict] = []
    for split, sources in sources_by_split(catalogue()).items():
        views = []
        for source in tqdm(sources, desc=f"{split} sources", file=sys.stderr, leave=False):
            loaded = load_views(source, random.Random(f"{seed}:{source.id}"), scale)
            views += loaded
            (manifest["sources"].setdefault(split, []) if loaded else manifest["skipped"]).append(source.id)
        rng = random.Random(f"{seed}:{split}")
        bal = Balancer(random.Random(f"{seed}:{split}:balance"))
        pick = random.Random(f"{seed}:{split}:complements")
        samples = chain(view_samples(split, views, rng, bal, pick), fine_detail_samples(split, views, scale, rng, bal))
        records, index = [], Counter()
        for sample in tqdm(samples, desc=f"{split} samples", file=sys.stderr, leave=False):  # streamed: canvases are large
            index[sample.family] += 1
            record = writer.record(split, index[sample.family], sample)
            (captions if sample.family == "caption" else records).append(record)
        write_jsonl(out / f"{split}.jsonl", records)
        manifest["counts"][split] = dict(sorted(Counter(r["family"] for r in records).items()))
    write_jsonl(out / "captions.jsonl", captions)
    manifest["counts"]["captions"] = len(captions)
    manifest["seconds"] = round(time.time() - start, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


DEFAULT_DATA = Path("runs/offline-med")


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """`--data`, shared by eval, reproduce-tiny and the ablation: they reuse one built set."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="offline-med folder (built if missing)")


def ensure_built(out: Path, seed: int = 0, scale_name: str = "full") -> None:
    """Build the set into `out` unless a finished build is there (its manifest is written last),
    so that eval, reproduce-tiny and the ablation work on a fresh clone and reuse each other's data."""
    if (out / "manifest.json").is_file():
        print(f"[offline-med] reusing {out}", file=sys.stderr)
        return
    print(f"[offline-med] building ({scale_name}, seed {seed}) into {out}", file=sys.stderr)
    print(count_table(build(out, seed, scale_name)), file=sys.stderr)


def count_table(manifest: dict) -> str:
    """Samples per family (rows) and split (columns), as printed after a build."""
    families = sorted({f for split in SPLITS for f in manifest["counts"].get(split, {})})
    lines = [f"{'family':<14}" + "".join(f"{s:>8}" for s in SPLITS)]
    for family in families:
        lines.append(f"{family:<14}" + "".join(f"{manifest['counts'][s].get(family, 0):>8}" for s in SPLITS))
    totals = [sum(manifest["counts"][s].values()) for s in SPLITS]
    lines.append(f"{'total':<14}" + "".join(f"{t:>8}" for t in totals))
    lines.append(f"captions (stage 1, train sources only): {manifest['counts']['captions']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="small: < 1 min, for tests; full: a few thousand samples")


def run(args: argparse.Namespace) -> int:
    manifest = build(args.out, args.seed, args.scale)
    print(count_table(manifest))
    if manifest["skipped"]:
        print(f"skipped sources (see warnings): {', '.join(manifest['skipped'])}")
    print(f"wrote {args.out} in {manifest['seconds']} s")
    return 0 if any(manifest["counts"][s] for s in SPLITS) else 1

