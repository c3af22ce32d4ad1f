"""`python -m dragonfly_med inspect`: facts as JSON, the 8-bit image, one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from PIL import Image

from dragonfly_med.cli import inspect as inspect_cli
from dragonfly_med.imaging.ingest import load_image

REPO = Path(__file__).resolve().parents[1]
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CT_SMALL = str(TEST_FILES / "CT_small.dcm")
YBR = str(TEST_FILES / "examples_ybr_color.dcm")
REQUIRED_KEYS = {"kind", "modality", "rows", "columns", "frames", "photometric", "window"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = inspect_cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(status: int, out: str, err: str) -> str:
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def test_json_facts_and_png(capsys, tmp_path):
    out_png = tmp_path / "sub" / "ct.png"
    status, out, err = run_cli(
        capsys, CT_SMALL, "--json", "--window", "lung", "--out", str(out_png)
    )
    assert status == 0 and err == ""
    facts = json.loads(out)
    assert REQUIRED_KEYS <= set(facts)
    assert (facts["kind"], facts["modality"], facts["rows"], facts["columns"]) == (
        "dicom",
        "CT",
        128,
        128,
    )
    assert facts["window"]["source"] == "preset:lung"
    written = Image.open(out_png)
    assert written.format == "PNG" and written.mode == "RGB"
    expected = load_image(CT_SMALL, window="lung").image
    assert np.array_equal(np.asarray(written), np.asarray(expected))


def test_frame_and_custom_window(capsys):
    status, out, _ = run_cli(capsys, YBR, "--json", "--frame", "3")
    facts = json.loads(out)
    assert status == 0 and facts["frames"] == 30 and facts["frame_index"] == 3
    status, out, _ = run_cli(capsys, CT_SMALL, "--json", "--window=-600,1500")
    assert json.loads(out)["window"]["source"] == "custom"


def test_text_output(capsys):
    status, out, _ = run_cli(capsys, CT_SMALL)
    assert status == 0
    assert "kind: dicom" in out and "modality: CT" in out and "rows: 128" in out


def test_header_is_deidentified(capsys):
    status, out, _ = run_cli(capsys, CT_SMALL, "--json", "--header")
    header = json.loads(out)["header"]
    assert status == 0 and header["PatientIdentityRemoved"] == "YES"
    assert "PatientName" not in header and "CompressedSamples" not in out


def test_photo(capsys, tmp_path):
    photo = tmp_path / "skin.jpg"
    Image.new("RGB", (64, 48), (180, 120, 90)).save(photo)
    status, out, _ = run_cli(capsys, str(photo), "--json")
    facts = json.loads(out)
    assert (
        status == 0 and facts["kind"] == "photo" and (facts["rows"], facts["columns"]) == (48, 64)
    )


@pytest.mark.parametrize(
    "make, argv_extra, words",
    [
        (lambda p: p.write_text("just text"), [], "neither a DICOM nor a supported photo"),
        (lambda p: p.write_bytes(b""), [], "empty"),
        (None, [], "could not be found"),
        (lambda p: p.write_bytes(Path(CT_SMALL).read_bytes()), ["--frame", "5"], "Frame 5"),
        (lambda p: p.write_bytes(Path(CT_SMALL).read_bytes()), ["--frame", "x"], "--frame"),
        (lambda p: p.write_bytes(Path(CT_SMALL).read_bytes()), ["--window", "spleen"], "preset"),
        (
            lambda p: p.write_bytes((TEST_FILES / "reportsi.dcm").read_bytes()),
            [],
            "structured report, not an image: export the image series instead",
        ),
    ],
)
def test_refused_input_one_error_line_exit_2(capsys, tmp_path, make, argv_extra, words):
    path = tmp_path / "input.dcm"
    if make:
        make(path)
    line = assert_refused(*run_cli(capsys, str(path), *argv_extra))
    assert words in line
    assert str(tmp_path) not in line, "paths may carry patient names: never echoed"


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = assert_refused(*run_cli(capsys, CT_SMALL, "--out", str(blocker / "x.png")))
    assert "--out" in line


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_module_entry_points_in_a_real_process(tmp_path):
    """Both `python -m dragonfly_med inspect` and `python -m dragonfly_med.cli.inspect`."""
    ok = _subprocess("-m", "dragonfly_med", "inspect", CT_SMALL, "--json")
    assert ok.returncode == 0, ok.stderr
    assert REQUIRED_KEYS <= set(json.loads(ok.stdout))
    bad = tmp_path / "notes.dcm"
    bad.write_text("not an image")
    refused = _subprocess("-m", "dragonfly_med.cli.inspect", str(bad))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: ") and len(refused.stderr.strip().splitlines()) == 1
    broken = _subprocess("-m", "dragonfly_med", "inspect", str(TEST_FILES / "MR_truncated.dcm"))
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1
