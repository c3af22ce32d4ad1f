"""`python -m training probe-features`: what the tiny model's frozen vision tower tells of
held-out images, read out by linear classifiers.

    python -m training probe-features [--split test] [--out F.json]   # per-family ceilings on the eval's questions
    python -m training probe-features --by-source [--levels low medium high]   # modality/region per held-out source

The default reads out the evaluation's own drawn questions (`training/tiny/probe_ceilings.py`); its
JSON is what `eval --probe` reads. `--by-source` is the source-level probe below.

Why: the tiny model must name the modality and body region of held-out offline-med sources, and
its LLM sees an image only through the tower's features. A linear classifier trained on the
training sources' views and scored on the validation and test sources' views shows what those
features carry across sources, whatever projector and LLM read them. Each crop level the
processor makes (low, medium, high: the zoom-in) is pooled into the mean and spread of every
channel over its crops and positions, so each level, and zooming in, is probed on its own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.offline_med.catalogue import catalogue, load_views
from training.offline_med.sources import SCALES

FAMILIES = ("modality", "body_region")
LEVELS = ("low", "medium", "high")


@dataclass
class ProbedView:
    """One view of a source: its facts and its pooled features per crop level."""

    source: str
    split: str
    facts: dict[str, str | None]
    levels: dict[str, torch.Tensor]


def tiny_tower_and_processor(levels: tuple[str, ...] = LEVELS):
    """The tiny model's tower (ImageNet Lite0 as packaged, frozen) and image processor, built
    from the packaged weights alone: the LLM is not needed to probe the tower. The processor's
    geometry keeps only the probed levels (and the low view, which every geometry has), so no
    crop is cut that the probe does not read."""
    from dragonfly_med.model.configuration_dragonfly import tiny_geometry
    from dragonfly_med.model.efficientnet_lite import (
        EfficientNetLite0Config,
        load_pretrained_state_dict,
    )
    from dragonfly_med.model.image_processing_dragonfly import (
        DragonflyImageProcessor,
        normalization_for,
    )
    from dragonfly_med.model.vision import build_vision_tower

    config = EfficientNetLite0Config()
    tower = build_vision_tower(config)
    tower.model.load_state_dict(load_pretrained_state_dict(with_classifier=False))
    geometry = replace(tiny_geometry(config), levels=("low", *levels))
    processor = DragonflyImageProcessor(geometry=geometry, **normalization_for(config))
    return tower.eval(), processor


@torch.no_grad()
def level_features(tower, processor, image, levels: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Mean and standard deviation of each channel over a level's crops and feature positions."""
    plan = processor.plan(image)
    pixels = processor(image)["pixel_values"]
    wanted = [i for i, crop in enumerate(plan.crops) if crop.level in levels]
    tokens = tower(pixels[wanted])  # [crops, positions, channels]
    out = {}
    for level in levels:
        rows = [n for n, i in enumerate(wanted) if plan.crops[i].level == level]
        flat = tokens[rows].flatten(0, 1)
        out[level] = torch.cat([flat.mean(0), flat.std(0)])
    return out


def probe_views(scale_name: str, levels: tuple[str, ...]) -> list[ProbedView]:
    """Every view of every installed source (as offline-med renders them), with its features."""
    tower, processor = tiny_tower_and_processor(levels)
    probed = []
    for source in tqdm(catalogue(), desc="sources", file=sys.stderr):
        for view in load_views(source, random.Random(f"probe:{source.id}"), SCALES[scale_name]):
            facts = {"modality": view.modality, "body_region": view.body_region}
            probed.append(ProbedView(source.id, source.split, facts, level_features(tower, processor, view.image, levels)))
    return probed


def stacked(views: list[ProbedView], levels: tuple[str, ...]) -> torch.Tensor:
    """[views, features]: each view's pooled levels side by side."""
    return torch.stack([torch.cat([v.levels[level] for level in levels]) for v in views])


def fit_and_score(views: list[ProbedView], family: str, levels: tuple[str, ...], steps: int = 600, seed: int = 0) -> dict:
    """Train a linear classifier on the training views (every source weighing the same, features
    standardised) and score it per view on validation and test: overall and per source."""
    torch.manual_seed(seed)
    known = [v for v in views if v.facts[family] is not None]
    train = [v for v in known if v.split == "train"]
    labels = sorted({v.facts[family] for v in train})
    if not labels:
        return {"labels": labels}
    x = stacked(train, levels)
    y = torch.tensor([labels.index(v.facts[family]) for v in train])
    mean, std = x.mean(0), x.std(0) + 1e-4
    per_source = defaultdict(int)
    for v in train:
        per_source[v.source] += 1
    weights = torch.tensor([1.0 / per_source[v.source] for v in train])
    classifier = torch.nn.Linear(x.shape[1], len(labels))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        batch = torch.multinomial(weights, 64, replacement=True)
        loss = F.cross_entropy(classifier((x[batch] - mean) / std), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = {}
    with torch.no_grad():
        for split in ("val", "test"):
            held = [v for v in known if v.split == split]
            if not held:
                continue
            predicted = classifier((stacked(held, levels) - mean) / std).argmax(1).tolist()
            hits = defaultdict(list)
            for view, p in zip(held, predicted, strict=True):
                hits[view.source].append(labels[p] == view.facts[family])
            every = [h for source in hits.values() for h in source]
            scores[split] = {
                "accuracy": sum(every) / len(every),
                "by_source": {source: sum(h) / len(h) for source, h in hits.items()},
            }
    return {"labels": labels, **scores}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.offline_med.build import add_data_argument
    from training.offline_med.evaluate import PER_FAMILY

    add_data_argument(parser)
    parser.add_argument("--split", default="test", choices=["test", "val"], help="whose questions the ceilings are measured on")
    parser.add_argument("--per-family", type=int, default=PER_FAMILY, help="questions per family, drawn as eval draws them; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="the eval's draw seed")
    parser.add_argument("--by-source", action="store_true", help="the source-level modality/region probe instead")
    parser.add_argument("--scale", default="full", choices=sorted(SCALES), help="--by-source: views per source, as offline-med builds them")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS, help="--by-source: crop levels to probe (high: 36 crops per view, the slow one)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    return run_by_source(args) if args.by_source else run_ceilings(args)


def run_ceilings(args: argparse.Namespace) -> int:
    """Per-family ceilings on the evaluation's questions, printed and written for `eval --probe`."""
    from dragonfly_med.checkpoints.loading import load_model
    from training.offline_med.build import ensure_built
    from training.offline_med.evaluate import load_split, subsample
    from training.tiny.probe_ceilings import probe_ceilings, write_ceilings

    ensure_built(args.data)
    model, processor = load_model("tiny-base", dtype=torch.float32, device_map="cpu")
    held_out = subsample(load_split(args.data, args.split), args.per_family or None, seed=args.seed)
    result = probe_ceilings(model, processor.image_processor, args.data, held_out, seed=args.seed)
    for family, ceiling in sorted(result["ceilings"].items()):
        print(f"{family:<14} {ceiling:.1%}  ({result['n'][family]} questions)")
    for name, accuracy in result["fine_detail_by_level"].items():
        print(f"fine_detail {name:<20} {'-' if accuracy is None else f'{accuracy:.1%}'}")
    if args.out:
        write_ceilings(result, args.split, args.out)
    return 0


def run_by_source(args: argparse.Namespace) -> int:
    levels = tuple(level for level in LEVELS if level in args.levels)
    views = probe_views(args.scale, levels)
    readouts = [(level,) for level in levels] + ([levels] if len(levels) > 1 else [])
    results = {}
    for family in FAMILIES:
        for readout in readouts:
            name = f"{family} {'+'.join(readout)}"
            results[name] = fit_and_score(views, family, readout)
            held = "  ".join(f"{split} {results[name][split]['accuracy']:.1%}" for split in ("val", "test") if split in results[name])
            print(f"{name:<32} {held}")
            for split in ("val", "test"):
                for source, accuracy in results[name].get(split, {}).get("by_source", {}).items():
                    print(f"    {split:<5} {source:<36} {accuracy:.0%}")
    if args.out:
        args.out.write_text(json.dumps({"scale": args.scale, "views": len(views), "results": results}, indent=1))
    return 0
