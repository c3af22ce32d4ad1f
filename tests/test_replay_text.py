"""Replay data: the packaged LLM (SmolLM2, real weights) answers general requests greedily and in
batches exactly as it answers them one by one; cut-off answers are dropped; records are LLaVA
style, text-only, some again with a training image; the file is written once and reused."""

from __future__ import annotations

import json

import pytest
import torch
from offline_med_fake import write_fake_offline_med

from dragonfly_med.checkpoints.loading import load_model
from dragonfly_med.checkpoints.tiny import base_model_dir
from training.engine.records import read_records
from training.tiny.replay_text import (
    ensure_replay,
    generate_answers,
    replay_prompts,
    replay_records,
    training_images,
)


def test_prompts_are_distinct_and_general():
    prompts = replay_prompts()
    assert len(prompts) == len(set(prompts)) >= 100
    assert "Count from 1 to 10." in prompts and not any("<image>" in p for p in prompts)


@pytest.mark.slow
def test_batched_answers_match_one_by_one_generation():
    """Left padding must not change a greedy answer: each is compared with the model answering
    that request alone; a 24-token limit cuts the long ones, which come back empty."""
    prompts = ["Hello! How are you today?", "What is the capital of France?", "Why is the sky blue?"]
    answers = generate_answers(base_model_dir(), prompts, max_new_tokens=24, batch_size=3)
    model, processor = load_model(base_model_dir(), dtype=torch.float32, device_map="cpu")
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([processor.build_prompt_ids(prompt).input_ids])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=24, eos_token_id=processor.eos_token_ids)[0, ids.shape[1] :].tolist()
        finished = any(t in processor.eos_token_ids for t in out)
        assert answer == (processor.decode(out, skip_special_tokens=True).strip() if finished else "")
    assert answers[2] == ""  # the sky needs more than 24 tokens
    assert answers[0]  # the greeting does not


def test_records_are_text_only_with_a_share_again_on_an_image(tmp_path):
    prompts = [f"request {i}" for i in range(40)]
    answers = ["" if i % 10 == 0 else f"answer {i}" for i in range(40)]
    rows = replay_records(prompts, answers, ["images/train/a.png", "images/train/b.png"], seed=0)
    text = [r for r in rows if "image" not in r]
    imaged = [r for r in rows if "image" in r]
    assert len(text) == 36 and all(r["conversations"][1]["value"] for r in rows)
    assert 4 <= len(imaged) <= 20 and all(r["conversations"][0]["value"].startswith("<image>\n") for r in imaged)
    assert {r["conversations"][1]["value"] for r in imaged} <= {r["conversations"][1]["value"] for r in text}
    assert rows == replay_records(prompts, answers, ["images/train/a.png", "images/train/b.png"], seed=0)
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(path, image_root=tmp_path)
    assert sum(r.image is None for r in records) == 36 and records[0].turns == [("request 1", "answer 1")]


@pytest.mark.slow
def test_ensure_replay_writes_once_and_points_at_training_images(tmp_path):
    data_dir = write_fake_offline_med(tmp_path / "data")
    path = ensure_replay(data_dir, base_model_dir(), max_new_tokens=24, limit=len(replay_prompts()))
    assert path.name == f"replay-{len(replay_prompts())}x24-seed0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and {r["image"] for r in rows if "image" in r} <= set(training_images(data_dir))
    stamp = path.stat().st_mtime_ns
    assert ensure_replay(data_dir, base_model_dir(), max_new_tokens=24) == path
    assert path.stat().st_mtime_ns == stamp
