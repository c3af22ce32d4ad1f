"""bench-step: the three ways train the answers they claim, with the real packaged tiny model
(SmolLM2 + Lite0 + LoRA), and the command writes only its own section of the benchmarks page."""

from __future__ import annotations

import json
from argparse import Namespace

from training.tiny import bench_step


def test_each_way_trains_its_answers_and_the_docs_section_is_replaced(tmp_path, monkeypatch, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Model\nkeep me\n\n## Training step\nold figures\n")
    monkeypatch.setattr("dragonfly_med.cli.bench.DOCS", docs)
    assert bench_step.run(Namespace(repeats=1, json=True, docs=True)) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["answers_per_step"] == {"micro_batch_1": 2, "micro_batch_2": 2, "joined": 8}
    assert all(results["step_s"][way] > 0 for way in bench_step.WAYS)
    assert results["speedup_per_answer"]["micro_batch_1"] == 1.0
    text = docs.read_text()
    assert "old figures" not in text and "## Model\nkeep me" in text and text.count(bench_step.SECTION) == 1


def test_micro_batches_hold_the_questions_of_each_way():
    batches = {way: bench_step.micro_batches(way) for way in bench_step.WAYS}
    assert [len(b) for b in batches.values()] == [2, 1, 1]  # micro-batches per step
    assert [len(b[0]) for b in batches.values()] == [1, 2, 2]  # samples per micro-batch
    assert sorted(batches["joined"][0][0]) == sorted(bench_step.QUESTIONS)
