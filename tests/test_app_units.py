"""The app's pure helpers: users file, grid overlay, example gallery (no server, no model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.auth import add_user, checker, load_users
from app.examples import find_examples
from app.overlay import STYLES, draw_grids
from dragonfly_med.model.geometry import Geometry, plan_crops

ROOT = Path(__file__).resolve().parents[1]


def test_users_file_holds_salted_hashes_only(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    add_user(path, "alice", "correct horse")
    add_user(path, "bob", "correct horse")
    text = path.read_text()
    assert "correct horse" not in text and (path.stat().st_mode & 0o777) == 0o600
    users = load_users(path)
    assert users["alice"].salt != users["bob"].salt and users["alice"].digest != users["bob"].digest
    check = checker(path)
    assert check("alice", "correct horse") and not check("alice", "wrong") and not check("eve", "correct horse")


def test_auth_cli_reads_password_from_stdin(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    result = subprocess.run(
        [sys.executable, "-m", "app.auth", "add", "--file", str(path), "--user", "carol"],
        input="s3cret\n", cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert checker(path)("carol", "s3cret") and "s3cret" not in result.stdout


def test_bad_user_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        add_user(tmp_path / "u.txt", "a:b", "pw")


def test_overlay_draws_both_grids_in_their_colours() -> None:
    geometry = Geometry(crop_size=224, feature_grid=7, pooled_grid=4, cls_token=False)
    image = Image.new("RGB", (400, 300), (128, 128, 128))
    overlay = draw_grids(image, plan_crops(400, 300, geometry))
    pixels = {tuple(p) for p in np.asarray(overlay).reshape(-1, 3)}
    assert STYLES["medium"].colour in pixels and STYLES["high"].colour in pixels
    assert min(overlay.size) >= 512  # small scans are enlarged so indices stay legible


def test_examples_are_real_files_on_disk() -> None:
    examples = find_examples()
    names = {e.path.name for e in examples}
    assert {"CT_small.dcm", "MR_small.dcm", "retina.jpg", "ihc.png", "microaneurysms.png"} <= names
    assert all(e.path.is_file() and e.questions for e in examples)
