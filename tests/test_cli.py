"""`plan` and `ask` on the command line: JSON keys, the released geometry without weights,
model directories, and one-line errors with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dragonfly_test_assets import smollm2_tokenizer, tiny_random_model
from PIL import Image

from dragonfly_med.__main__ import main

REPO = Path(__file__).resolve().parent.parent
PLAN_KEYS = {"medium_grid", "high_grid", "num_crops", "zoom", "visual_tokens", "image_positions"}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_released_geometry_json(capsys):
    code, out, _ = run_cli(capsys, "plan", "2000x800", "--model", "dragonfly-med-v2", "--json")
    data = json.loads(out)
    assert code == 0 and PLAN_KEYS <= data.keys()
    assert data["medium_grid"] == [4, 1] and data["high_grid"] == [12, 3]
    assert data["num_crops"] == 41 and data["visual_tokens"] == 2057 and data["image_positions"] == 2098
    assert data["zoom"] == pytest.approx(12 * 336 / 2000, abs=1e-3)


def test_plan_accepts_the_released_hub_id(capsys):
    code, out, _ = run_cli(capsys, "plan", "640x480", "--model", "togethercomputer/Llama-3.1-8B-Dragonfly-Med-v2", "--json")
    assert code == 0 and json.loads(out)["image_positions"] == 2098


def test_plan_tiny_is_default_and_human_readable(capsys):
    code, out, _ = run_cli(capsys, "plan", "1024x1024")
    assert code == 0
    assert "medium grid    : 2 x 2" in out and "image positions: 250" in out


def test_plan_reads_image_files(tmp_path, capsys):
    path = tmp_path / "tall.png"
    Image.new("RGB", (600, 3000), (10, 20, 30)).save(path)
    code, out, _ = run_cli(capsys, "plan", str(path), "--model", "dragonfly-med-v2", "--json")
    data = json.loads(out)
    assert code == 0 and data["image_size"] == [600, 3000]
    assert data["medium_grid"] == [1, 4] and data["high_grid"] == [3, 12]


def test_plan_reads_geometry_from_model_directories(tmp_path, capsys):
    ours = tmp_path / "ours"
    ours.mkdir()
    geometry = {"crop_size": 64, "feature_grid": 8, "pooled_grid": 2, "cls_token": False}
    (ours / "config.json").write_text(json.dumps({"model_type": "dragonfly", "geometry": geometry}))
    code, out, _ = run_cli(capsys, "plan", "640x480", "--model", str(ours), "--json")
    assert code == 0 and json.loads(out)["visual_tokens"] == 64 + 40 * 4
    released = tmp_path / "released"
    released.mkdir()
    (released / "config.json").write_text(json.dumps({"model_type": "dragonfly", "text_config": {},
                                                      "image_encoder": "openai/clip-vit-large-patch14-336"}))  # fmt: skip
    code, out, _ = run_cli(capsys, "plan", "640x480", "--model", str(released), "--json")
    assert code == 0 and json.loads(out)["image_positions"] == 2098


@pytest.mark.parametrize("argv", [["plan", "missing.png"], ["plan", "10x10", "--model", "no-such-geometry"]])
def test_plan_errors_are_one_line(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1


def test_plan_as_a_real_process():
    result = subprocess.run([sys.executable, "-m", "dragonfly_med", "plan", "2000x800", "--model", "dragonfly-med-v2", "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["image_positions"] == 2098


def test_ask_refuses_a_non_image(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    code, out, err = run_cli(capsys, "ask", str(path), "--question", "What is this?")
    assert code == 2 and out == "" and err.startswith("error: ")


def test_ask_with_a_model_directory(tmp_path):
    model, processor = tiny_random_model(smollm2_tokenizer(), "chatml")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    image_path = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(image_path)
    # a real process: stdout must hold only the JSON (libraries' import-time prints go to stderr)
    result = subprocess.run([sys.executable, "-m", "dragonfly_med", "ask", str(image_path), "-q", "What is this?",
                             "--model", str(model_dir), "--max-new-tokens", "3", "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"answer", "model", "ttft_s", "tokens_per_s", "plan"} <= data.keys()
    assert data["model"] == str(model_dir) and isinstance(data["answer"], str)
    assert data["plan"]["num_crops"] == 41 and data["ttft_s"] > 0


def test_bench_writes_only_its_section(tmp_path):
    from dragonfly_med.cli.bench import SECTION, markdown, write_docs

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Ingestion\nkeep me\n\n## Model\nold figures\n\n## App\nkeep me too\n")
    results = {"machine": "test", "preprocess_speedup": 6.0, "preprocess_speedup_vs_released": 7.0,
               "preprocess": [{"size": "512x512", "ours_ms": 10.0, "per_crop_ms": 60.0, "released_ms": 70.0,
                               "per_crop_ratio": 6.0, "released_ratio": 7.0}]}  # fmt: skip
    write_docs(results, docs)
    text = docs.read_text()
    assert "old figures" not in text and "keep me\n" in text and "## App\nkeep me too" in text
    assert text.count(SECTION) == 1 and "**6.0x**" in text
    assert markdown(results).startswith(SECTION)


def test_bench_preprocess_ratio_is_the_smallest(monkeypatch):
    from dragonfly_med.cli import bench

    monkeypatch.setattr(bench, "PREPROCESS_SIZES", ((64, 48),))
    result = bench.bench_preprocess(repeats=1)
    row = result["preprocess"][0]
    assert result["preprocess_speedup"] == row["per_crop_ratio"]
    assert result["preprocess_speedup_vs_released"] == row["released_ratio"]
