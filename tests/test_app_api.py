"""The app end to end through its API (gradio_client), on the real tiny model as packaged.

One server (with login) serves most tests; the crash test runs its own, which it kills -9. They
run `--model tiny-base` (SmolLM2 as packaged + the seeded projector): streaming, Stop and a kill
mid-answer need answers long enough to interrupt, which a retrained `tiny` may no longer give
(it was taught one-word answers). The browser test runs the shipped `tiny`.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from app_server import ROOT, Server, phi_dicom, phi_leaks, start_server
from gradio_client import Client, handle_file
from pydicom.data import get_testdata_files

from app.auth import add_user

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
USER, PASSWORD = "alice", "correct horse battery"
SHORT = (0.0, 1.0, 12)  # temperature, top-p, max new tokens: greedy and quick
BASE = ("--model", "tiny-base")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def server(workdir: Path):
    add_user(workdir / "users.txt", USER, PASSWORD)
    server = start_server(workdir, workdir / "log.sqlite", "--auth-file", str(workdir / "users.txt"), *BASE)
    yield server
    server.stop()


def client(server: Server) -> Client:
    return Client(server.url, auth=(USER, PASSWORD), verbose=False)


def db_rows(db: Path, sql: str, *args) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def stream(c: Client, message: str, sampling: tuple = SHORT) -> list[str]:
    """Every partial answer /send streamed, in order."""
    job = c.submit(message, *sampling, api_name="/send")
    outputs = list(job)
    assert outputs and outputs[-1] == job.result()
    return outputs


def test_dicom_two_turns_streamed_and_logged(server: Server, workdir: Path) -> None:
    c = client(server)
    info = c.predict(handle_file(get_testdata_files("CT_small.dcm")[0]), api_name="/load_image")
    assert info["facts"]["modality"] == "CT" and info["facts"]["rows"] == 128
    assert info["plan"]["num_crops"] == len(info["plan"]["crops"]) and info["plan"]["zoom"] > 1
    answers, updates = [], []
    for question in ("What imaging modality is this?", "Which body region is shown?"):
        partials = stream(c, question)
        assert all(partials[-1].startswith(p.rstrip()) for p in partials), partials  # each extends the last
        answers.append(partials[-1])
        updates.append(len(partials))
    assert max(updates) >= 3, updates  # streamed token by token, not in one piece
    db = workdir / "log.sqlite"
    (session_id, user, model_id), = db_rows(
        db, "SELECT s.id, s.user, s.model_id FROM sessions s JOIN turns t ON t.session_id = s.id WHERE t.question = ?",
        "What imaging modality is this?")
    assert user == USER and model_id
    turns = db_rows(db, "SELECT question, answer, status, image_id, ttft_s FROM turns WHERE session_id = ? ORDER BY id", session_id)
    assert [t[0] for t in turns] == ["What imaging modality is this?", "Which body region is shown?"]
    assert [t[1] for t in turns] == answers and {t[2] for t in turns} == {"ok"}
    assert all(t[3] is not None and t[4] is not None for t in turns)
    (facts, zoom), = db_rows(db, "SELECT facts, zoom FROM images WHERE session_id = ?", session_id)
    assert '"modality": "CT"' in facts and zoom == pytest.approx(info["plan"]["zoom"])


def test_explain_gives_the_last_answers_crop_shares_and_the_log_keeps_them(server: Server, workdir: Path) -> None:
    c = client(server)
    info = c.predict(handle_file(get_testdata_files("CT_small.dcm")[0]), api_name="/load_image")
    stream(c, "Where is the brightest part of this image?")
    explained = c.predict(api_name="/explain")
    assert explained["method"] == "gradient x input" and len(explained["crops"]) == info["plan"]["num_crops"]
    assert [c["box"] for c in explained["crops"]] == [c["box"] for c in info["plan"]["crops"]]
    assert sum(c["share"] for c in explained["crops"]) == pytest.approx(1.0, abs=1e-4)
    db = workdir / "log.sqlite"
    (session_id,), = db_rows(db, "SELECT session_id FROM turns WHERE question = ?", "Where is the brightest part of this image?")
    out = subprocess.run([sys.executable, "-m", "app.log", "export", "--db", str(db), "--session", session_id, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    (turn,) = json.loads(out)["sessions"][0]["turns"]
    assert turn["crop_shares"] == explained["crops"]


def test_text_only_turn(server: Server, workdir: Path) -> None:
    c = client(server)
    answer = stream(c, "What is a CT scan? Answer in one sentence.")[-1]
    assert answer.strip()
    rows = db_rows(workdir / "log.sqlite", "SELECT image_id, status, crop_shares FROM turns WHERE answer = ?", answer)
    assert rows and rows[-1] == (None, "ok", None)
    assert c.predict(api_name="/explain") == {"method": "gradient x input", "crops": []}


def test_refused_file_gives_the_ingestion_message(server: Server, workdir: Path) -> None:
    junk = workdir / "notes.dcm"
    junk.write_bytes(b"these are clinic notes, not an image\n" * 20)
    with pytest.raises(Exception, match="neither a DICOM nor a supported photo"):
        client(server).predict(handle_file(junk), api_name="/load_image")
    with pytest.raises(Exception, match="non-empty message"):
        client(server).predict("  ", api_name="/send")
    assert "Traceback" not in server.output()


def test_login_is_required(server: Server) -> None:
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises different types per version
        Client(server.url, auth=(USER, "wrong"), verbose=False)


def test_eight_clients_three_turns_each_in_their_own_sessions(server: Server, workdir: Path) -> None:
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            c = client(server)
            results[n] = [stream(c, f"Client {n}, question {k}: say hello.", (0.0, 1.0, 6))[-1] for k in range(3)]
        except BaseException as exc:  # surfaced below with the failing client
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    assert not errors, errors
    assert sorted(results) == list(range(8)) and all(len(r) == 3 for r in results.values())
    db = workdir / "log.sqlite"
    for n in range(8):
        sessions = db_rows(db, "SELECT DISTINCT session_id FROM turns WHERE question LIKE ?", f"Client {n},%")
        assert len(sessions) == 1, f"client {n} spread over {sessions}"
        questions = db_rows(db, "SELECT question FROM turns WHERE session_id = ? ORDER BY id", sessions[0][0])
        assert [q for (q,) in questions] == [f"Client {n}, question {k}: say hello." for k in range(3)]
    assert db_rows(db, "SELECT count(*) FROM turns WHERE question LIKE 'Client %'") == [(24,)]


def test_phi_never_leaves_the_dicom(server: Server, workdir: Path) -> None:
    c = client(server)
    info = c.predict(handle_file(phi_dicom(workdir)), api_name="/load_image")  # extensionless DICOM
    assert info["facts"]["modality"] == "CT"
    answer = stream(c, "Describe this image.")[-1]
    assert phi_leaks(str(info)) == [] and phi_leaks(answer) == []
    teaching = Path(c.predict(True, False, api_name="/export_teaching_file")).read_bytes()
    assert phi_leaks(teaching) == [] and USER.encode() not in teaching  # the user is named only when asked
    db = workdir / "log.sqlite"
    for path in db.parent.glob(db.name + "*"):  # the database, its WAL and shared-memory files
        assert phi_leaks(path.read_bytes()) == [], path
    assert phi_leaks(server.output()) == []
    cached = [p for p in server.cache.rglob("*") if p.is_file()]
    assert all(phi_leaks(p.read_bytes()) == [] for p in cached), "the upload stayed in Gradio's cache"


def test_kill_during_generation_keeps_earlier_turns(tmp_path: Path) -> None:
    db = tmp_path / "crash.sqlite"
    server = start_server(tmp_path, db, *BASE, name="crash")
    try:
        c = Client(server.url, verbose=False)
        first = stream(c, "Say hello.")[-1]
        job = c.submit("Count from 1 to 1000, separated by commas.", 0.0, 1.0, 1024, api_name="/send")
        for _partial in job:
            break  # generation is under way
        server.kill()
    finally:
        server.stop()
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
    restarted = start_server(tmp_path, db, *BASE, name="restarted")
    try:
        assert db_rows(db, "SELECT question, answer FROM turns ORDER BY id")[0] == ("Say hello.", first)
        assert stream(Client(restarted.url, verbose=False), "Say hello again.")[-1]
    finally:
        restarted.stop()
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert [q for (q,) in db_rows(db, "SELECT question FROM turns ORDER BY id")] == ["Say hello.", "Say hello again."]


def test_model_that_fails_to_load_stops_start_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "app.py", "--model", str(tmp_path / "no-such-model"), "--db", str(tmp_path / "x.sqlite")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model")


def test_busy_port_stops_start_up_before_loading_the_model(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "app.py", "--port", str(port), "--db", str(tmp_path / "x.sqlite")],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode != 0 and "loading model" not in result.stdout
    assert result.stderr.strip() == f"error: cannot serve on 127.0.0.1:{port}: Address already in use (choose another --port)"
