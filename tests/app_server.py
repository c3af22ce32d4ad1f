"""Start `python app.py` as a real subprocess on a free 127.0.0.1 port, for the app's tests.

A subprocess (not an in-process launch) is what users run, lets a test kill -9 it, and gives
its console output as a file the PHI test can search.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240  # first start may build the tiny model's cache

# Distinctive identifiers written into the PHI test file; none may leave the server.
PHI_VALUES = {
    "PatientName": "Zyxqwort^Quilliam",
    "PatientID": "PID-7301-QXZ",
    "PatientBirthDate": "19020304",
    "InstitutionName": "Kwyjibo Memorial",
    "ReferringPhysicianName": "Drvobrazny^Feliks",
    "AccessionNumber": "ACC99173XQ",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    console: Path
    cache: Path

    def output(self) -> str:
        return self.console.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: what a power cut or OOM killer does."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def start_server(workdir: Path, db: Path, *args: str, name: str = "server") -> Server:
    """Launch the app and wait until it answers HTTP; fail with its console tail otherwise."""
    port = free_port()
    console, cache = workdir / f"{name}-{port}.log", workdir / f"{name}-{port}-cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(cache)}
    with console.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), "--db", str(db), *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    server = Server(proc, f"http://127.0.0.1:{port}/", console, cache)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}:\n{server.output()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"app did not answer within {START_TIMEOUT_S} s:\n{server.output()[-3000:]}")


def phi_dicom(folder: Path) -> Path:
    """pydicom's CT_small with distinctive identifiers, saved WITHOUT an extension (as on CDs)."""
    ds = pydicom.dcmread(get_testdata_files("CT_small.dcm")[0])
    for keyword, value in PHI_VALUES.items():
        setattr(ds, keyword, value)
    path = folder / "IM000001"
    ds.save_as(path)
    return path


def phi_leaks(text_or_bytes: str | bytes) -> list[str]:
    """Which identifier values (or their name parts) occur in the given text or bytes."""
    data = text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode(errors="replace")
    data = data.lower()
    needles = set()
    for value in PHI_VALUES.values():
        needles.add(value)
        needles.update(part for part in value.split("^") if len(part) > 3)
    return sorted(n for n in needles if n.lower().encode() in data)
