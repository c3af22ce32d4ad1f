"""Read-out ceilings: how well a linear classifier on the frozen tower's features answers the
evaluation's own closed questions, family by family.

Why: the tiny LLM sees an image only through these features. If a linear read-out trained on the
training records cannot answer a held-out question, no projector or adapter can be expected to:
the family's gap is a data or geometry problem, not a training one. `eval --json` reports each
family's `probe_ceiling` beside the model's accuracy, on the same drawn questions.

What is read: the features the LLM receives (`FeatureCache`: the low view's tokens and every
medium and high crop pooled to `pooled_grid`), summarised per crop level by the mean, spread
and maximum of each channel, so a small detail in one crop still moves the level's vector.
What is predicted: the fact behind each question (a modality, a side, a quadrant, whether a
lesion is there, the texture inside one), with one classifier per fact; a question is answered from it as the
model must: the offered option the classifier ranks first, or "yes" when the option asked is
the classifier's first choice. Questions about a label's text are not probed (a linear read-out
cannot compare a crop with arbitrary strings): fine-detail ceilings cover the
lesion-texture questions.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.engine.feature_cache import FeatureCache, ImageFeatures, default_cache_dir
from training.offline_med.questions import MODALITIES, PLANES, REGIONS
from training.offline_med.render import TEXTURES, WINDOWS

LEVELS = ("low", "medium", "high")
VOCABULARY = {
    "modality": MODALITIES,
    "body_region": REGIONS,
    "plane": PLANES,
    "window": tuple(WINDOWS),
    "laterality": ("left", "right"),
}
TRAIN_PER_FACT = 200  # training records per fact: enough for a linear read-out, bounded tower time
# Fine-detail canvases (1344-1792 px, ~36 high crops) cost ~10x a view's tower time; 60 pairs
# already read the lesion texture at 100% from the high crops.
TRAIN_PER_FINE_FACT = 100


@dataclass(frozen=True)
class Question:
    """What a closed record asks, in probe terms: the fact (`task`), the option a yes/no
    question names (`asked`), and the fact's value where the record tells it (`label`)."""

    record: dict
    task: str
    asked: str | None
    label: str | None


def named_value(question: str, vocabulary: tuple[str, ...]) -> str | None:
    """The vocabulary value a question names (the longest, so "soft tissue" beats "tissue")."""
    found = [v for v in vocabulary if re.search(rf"\b{re.escape(v)}\b", question)]
    return max(found, key=len) if found else None


def as_question(record: dict) -> Question | None:
    """The probe's view of a closed (or fact-naming open) record; None where none applies."""
    family, truth, options = record["family"], record.get("truth"), record.get("options")
    if truth is None:
        return None
    text = record["conversations"][0]["value"]
    yes_no = options == ["yes", "no"]
    if family in VOCABULARY:
        if not yes_no:
            return Question(record, family, None, truth)
        asked = named_value(text.split("?")[0].split(".")[-1], VOCABULARY[family])  # the asking sentence
        return Question(record, family, asked, asked if truth == "yes" else None)
    if family == "finding":
        return Question(record, "finding_presence", None, truth) if yes_no else Question(record, "finding_quadrant", None, truth)
    if family == "fine_detail" and set(options or ()) == set(TEXTURES):
        return Question(record, "fine_texture", None, truth)
    return None


def level_summary(found: ImageFeatures, level: str) -> torch.Tensor:
    """Mean, spread and maximum of each channel over one level's crops and positions."""
    if level == "low":
        flat = found.low
    elif level == "medium":
        flat = found.pooled[: found.n_medium].flatten(0, 1)
    else:
        flat = found.pooled[found.n_medium :].flatten(0, 1)
    if flat.shape[0] == 0:
        flat = torch.zeros(1, found.low.shape[-1])
    return torch.cat([flat.mean(0), flat.std(0, correction=0), flat.max(0).values])


def readout_vector(found: ImageFeatures, levels: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([level_summary(found, level) for level in levels])


def fit_classifier(x: torch.Tensor, y: torch.Tensor, n_labels: int, steps: int = 600, seed: int = 0):
    """Standardised features, AdamW on cross-entropy: a plain linear read-out."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-4
    classifier = torch.nn.Linear(x.shape[1], n_labels)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        batch = torch.randint(0, x.shape[0], (min(64, x.shape[0]),))
        loss = F.cross_entropy(classifier((x[batch] - mean) / std), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lambda features: classifier((features - mean) / std)


def answer_from(scores: torch.Tensor, labels: list[str], question: Question) -> str | None:
    """The probe's answer: the offered option ranked first, or yes/no for the option asked."""
    options = question.record.get("options") or []
    if options == ["yes", "no"] and question.asked is not None:
        return "yes" if labels[int(scores.argmax())] == question.asked else "no"
    offered = [o for o in options if o in labels] or labels
    return max(offered, key=lambda o: float(scores[labels.index(o)]))


def image_facts(questions: list[Question]) -> dict[tuple[str, str], str]:
    """(image, task) -> the fact, from every record that tells it (a yes/no answered "no"
    does not; another record about the same image usually does)."""
    facts = {}
    for q in questions:
        if q.label is not None:
            facts[(q.record["image"], q.task)] = q.label
    return facts


def probe_ceilings(
    model,
    image_processor,
    data_dir: Path,
    held_out: list[dict],
    *,
    fine_levels: tuple[tuple[str, ...], ...] = (("low",), ("medium",), ("high",), LEVELS),
    cache: FeatureCache | None = None,
    seed: int = 0,
) -> dict:
    """Ceilings on `held_out` (the evaluation's drawn records): {"ceilings": {family: accuracy},
    "n": {family: questions probed}, "fine_detail_by_level": {"low+medium+high": accuracy, ...}}.
    Classifiers are trained on `data_dir`'s train.jsonl; every family reads all three levels."""
    from training.offline_med.evaluate import load_split

    cache = cache or FeatureCache(default_cache_dir())
    train = [q for q in map(as_question, load_split(data_dir, "train")) if q is not None]
    held = [q for q in map(as_question, held_out) if q is not None]
    facts = image_facts(train)
    by_task: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (image, task), label in facts.items():
        by_task[task].append((image, label))
    features: dict[str, ImageFeatures] = {}

    def feats(image: str) -> ImageFeatures:
        if image not in features:
            features[image] = cache.features(model, image_processor, data_dir / image)
        return features[image]

    # Each task draws its training records with its own seeded generator, so a task's read-out
    # does not depend on which other tasks are asked, nor on the set order of a process.
    needed = sorted({q.task for q in held})
    for task in needed:
        random.Random(f"{seed}-{task}").shuffle(by_task[task])
        by_task[task] = by_task[task][: TRAIN_PER_FINE_FACT if task.startswith("fine_") else TRAIN_PER_FACT]
    images = sorted({image for task in needed for image, _ in by_task[task]} | {q.record["image"] for q in held})
    for image in tqdm(images, desc="probe features", file=sys.stderr, disable=len(images) < 4):
        feats(image)

    def score(levels: tuple[str, ...], family_filter: str | None = None) -> dict[str, tuple[int, int]]:
        hits: dict[str, list[bool]] = defaultdict(list)
        for task in needed:
            pairs = by_task[task]
            labels = sorted({label for _, label in pairs})
            asked_here = [q for q in held if q.task == task and (family_filter is None or q.record["family"] == family_filter)]
            if not asked_here:
                continue
            if len(labels) < 2:
                for q in asked_here:
                    hits[q.record["family"]].append(False)
                continue
            x = torch.stack([readout_vector(feats(image), levels) for image, _ in pairs])
            y = torch.tensor([labels.index(label) for _, label in pairs])
            read = fit_classifier(x, y, len(labels), seed=seed)
            with torch.no_grad():
                for q in asked_here:
                    scores = read(readout_vector(feats(q.record["image"]), levels)[None])[0]
                    hits[q.record["family"]].append(answer_from(scores, labels, q) == q.record["truth"])
        return {family: (sum(h), len(h)) for family, h in hits.items()}

    overall = score(LEVELS)
    fine = {"+".join(levels): score(levels, "fine_detail").get("fine_detail", (0, 0)) for levels in fine_levels}
    return {
        "ceilings": {family: round(k / n, 4) for family, (k, n) in overall.items() if n},
        "n": {family: n for family, (_, n) in overall.items()},
        "fine_detail_by_level": {name: round(k / n, 4) if n else None for name, (k, n) in fine.items()},
    }


def write_ceilings(result: dict, split: str, path: Path) -> None:
    """The JSON `eval --probe` reads: `ceilings.<split>.<family>`."""
    payload = {"ceilings": {split: result["ceilings"]}, "n": {split: result["n"]}, "fine_detail_by_level": {split: result["fine_detail_by_level"]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
