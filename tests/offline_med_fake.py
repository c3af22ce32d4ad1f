"""A fake offline-med folder and a random tiny model folder, for the evaluation, reproduction
and ablation tests: the same record format as `training.offline_med.build` writes (docs/offline-med.md),
small PNGs, and a CLIP-28px + 2-layer Llama Dragonfly that answers in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from dragonfly_test_assets import smollm2_tokenizer, tiny_random_model
from PIL import Image


def record(
    split: str,
    family: str,
    index: int,
    image: str,
    question: str,
    answer: str,
    options: list[str] | None,
) -> dict:
    row = {
        "id": f"offline-med-{split}-{family}-{index:05d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "source": f"fake:{split}",
        "family": family,
        "answer_type": "closed" if options else "open",
        "split": split,
    }
    if options:
        row["options"] = options
    return row


def write_fake_offline_med(root: Path, per_family: int = 3) -> Path:
    """train/val/test.jsonl + captions.jsonl + manifest.json + PNGs (64 px, and a 96 px 'canvas')."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        rows, captions = [], []
        for i in range(per_family):
            image = f"images/{split}/fake/{i:05d}.png"
            path = root / image
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(
                rng.integers(0, 255, (64, 96 if i % 2 else 64, 3), dtype=np.uint8)
            ).save(path)
            rows += [
                record(
                    split,
                    "modality",
                    i,
                    image,
                    "What imaging modality is this: CT or MRI?",
                    "CT",
                    ["CT", "MRI"],
                ),
                record(
                    split,
                    "body_region",
                    i,
                    image,
                    "Is this the head? Answer yes or no.",
                    "yes",
                    ["yes", "no"],
                ),
                record(
                    split,
                    "fine_detail",
                    i,
                    image,
                    "Is there a small dot in the image? Answer yes or no.",
                    "no",
                    ["yes", "no"],
                ),
                record(
                    split,
                    "description",
                    i,
                    image,
                    "Describe the image.",
                    "A CT image of the head, axial.",
                    None,
                ),
            ]
            captions.append(
                record(
                    split,
                    "caption",
                    i,
                    image,
                    "Give a short caption for this image.",
                    "A CT image.",
                    None,
                )
            )
        rows.append(rows[0] | {"id": f"{split}-multi", "family": "multi_turn", "answer_type": "open",
                               "conversations": rows[0]["conversations"] + rows[1]["conversations"][:1] + [{"from": "gpt", "value": "yes"}]})  # fmt: skip
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if split == "train":
            (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    manifest = {
        "seed": 0,
        "scale": "fake",
        "sources": {"train": ["fake:train"], "val": ["fake:val"], "test": ["fake:test"]},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def random_model(seed: int = 0):
    """(model, processor) of a random tiny Dragonfly with the SmolLM2 tokenizer (ChatML)."""
    return tiny_random_model(smollm2_tokenizer(), "chatml", seed=seed)


def random_model_dir(target: Path, seed: int = 0) -> Path:
    model, processor = random_model(seed)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
