"""The session log: schema, WAL, per-turn commits, concurrent writers, export and prune."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from app.log import SCHEMA_VERSION, ImageRecord, SessionLog, TurnRecord, main, utcnow

ROOT = Path(__file__).resolve().parents[1]
PLAN = {
    "medium_grid": [2, 2], "high_grid": [6, 6], "zoom": 3.9375, "separators": 41, "image_positions": 1000,
    "tokens": {"low": 49, "medium": 64, "high": 576},
}


def _turn(question: str = "What is shown?", status: str = "ok") -> TurnRecord:
    return TurnRecord(question=question, answer="A CT slice.", sampling={"temperature": 0.0}, status=status,
                      started_at=utcnow(), ttft_s=0.1, tokens_per_s=20.0, new_tokens=4)


@pytest.fixture()
def log(tmp_path: Path):
    log = SessionLog(tmp_path / "log.sqlite")
    yield log
    log.close()


def test_schema_wal_and_version(log: SessionLog) -> None:
    con = sqlite3.connect(log.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "sessions", "images", "turns", "feedback"} <= tables
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    con.close()
    SessionLog(log.path).close()  # reopening does not add a second version row
    assert sqlite3.connect(log.path).execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1


def test_newer_schema_is_refused(log: SessionLog) -> None:
    con = sqlite3.connect(log.path)
    con.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, '2030-01-01')", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match="schema version"):
        SessionLog(log.path)


def test_turn_is_visible_to_another_connection_once_it_ends(log: SessionLog) -> None:
    sid = log.start_session("tiny", {"load_in_4bit": False}, user="alice")
    image_id = log.add_image(sid, ImageRecord("ab" * 32, {"modality": "CT"}, PLAN, window=[40, 400], frame=0))
    turn_id = log.add_turn(sid, image_id, _turn())
    log.add_feedback(turn_id, liked=True)
    con = sqlite3.connect(log.path)  # a separate reader sees committed rows without any close/flush
    assert con.execute("SELECT question, status, image_id FROM turns").fetchall() == [("What is shown?", "ok", image_id)]
    assert con.execute("SELECT liked FROM feedback").fetchall() == [(1,)]
    con.close()
    data = log.export(sid)["sessions"][0]
    assert data["user"] == "alice" and data["images"][0]["budget"]["total"] == 1000
    assert data["turns"][0]["feedback"][0]["liked"] is True


def test_concurrent_sessions_write_safely(log: SessionLog) -> None:
    def client(n: int) -> None:
        sid = log.start_session("tiny", {})
        for k in range(5):
            log.add_turn(sid, None, _turn(f"client {n} turn {k}"))
        log.end_session(sid)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    sessions = log.export()["sessions"]
    assert len(sessions) == 8
    for s in sessions:
        questions = [t["question"] for t in s["turns"]]
        n = questions[0].split()[1]
        assert questions == [f"client {n} turn {k}" for k in range(5)] and s["ended_at"]
    assert sqlite3.connect(log.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_list_sessions_newest_first(log: SessionLog) -> None:
    first = log.start_session("tiny", {})
    log.add_image(first, ImageRecord("00" * 32, {"modality": "MR"}, PLAN))
    second = log.start_session("tiny", {})
    log.add_turn(second, None, _turn())
    rows = log.list_sessions()
    assert {r["id"] for r in rows} == {first, second}
    by_id = {r["id"]: r for r in rows}
    assert by_id[first]["facts"] == {"modality": "MR"} and by_id[second]["turns"] == 1


def test_prune_removes_old_sessions_and_their_rows(log: SessionLog) -> None:
    old = log.start_session("tiny", {})
    log.add_feedback(log.add_turn(old, log.add_image(old, ImageRecord("0" * 64, {}, PLAN)), _turn()), liked=False)
    new = log.start_session("tiny", {})
    con = sqlite3.connect(log.path)
    con.execute("UPDATE sessions SET started_at = ? WHERE id = ?", ((utcnow() - timedelta(days=40)).isoformat(" "), old))
    con.commit()
    assert main(["prune", "--db", str(log.path), "--older-than-days", "30"]) == 0
    assert [r[0] for r in con.execute("SELECT id FROM sessions")] == [new]
    assert [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("images", "turns", "feedback")] == [0, 0, 0]
    con.close()


def test_export_cli_prints_json(log: SessionLog) -> None:
    sid = log.start_session("tiny", {})
    log.add_turn(sid, None, _turn("text only?"))
    out = subprocess.run(
        [sys.executable, "-m", "app.log", "export", "--db", str(log.path), "--session", sid, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    data = json.loads(out)
    assert data["sessions"][0]["turns"][0]["question"] == "text only?"


def test_export_unknown_session_fails_cleanly(log: SessionLog, capsys) -> None:
    assert main(["export", "--db", str(log.path), "--session", "nope", "--json"]) == 1
    assert "no session nope" in capsys.readouterr().err


CROPS = [
    {"level": "low", "col": 0, "row": 0, "box": [0.0, 0.0, 128.0, 128.0], "share": 0.5},
    {"level": "medium", "col": 0, "row": 0, "box": [0.0, 0.0, 64.0, 64.0], "share": 0.5},
]


def test_crop_shares_are_stored_with_the_turn_and_exported(log: SessionLog) -> None:
    sid = log.start_session("tiny", {})
    image_id = log.add_image(sid, ImageRecord("ab" * 32, {"modality": "CT"}, PLAN))
    explained, pending = log.add_turn(sid, image_id, _turn()), log.add_turn(sid, image_id, _turn("again?"))
    text_only = log.add_turn(sid, None, _turn("text only?"))
    log.set_crop_shares(explained, "gradient x input", CROPS)
    turns = {t["id"]: t for t in log.export(sid)["sessions"][0]["turns"]}
    assert turns[explained]["crop_shares"] == CROPS and turns[explained]["relevance_method"] == "gradient x input"
    assert turns[pending]["crop_shares"] == [] and turns[text_only]["crop_shares"] == []


def test_version_1_log_gains_crop_shares_and_keeps_its_turns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    log = SessionLog(path)
    sid = log.start_session("tiny", {})
    log.add_turn(sid, None, _turn("from version 1"))
    log.close()
    con = sqlite3.connect(path)  # back to the version-1 schema: no relevance columns
    con.execute("ALTER TABLE turns DROP COLUMN crop_shares")
    con.execute("ALTER TABLE turns DROP COLUMN relevance_method")
    con.execute("UPDATE schema_version SET version = 1")
    con.commit()
    con.close()
    log = SessionLog(path)
    try:
        turn = log.export(sid)["sessions"][0]["turns"][0]
        assert turn["question"] == "from version 1" and turn["crop_shares"] == []
        log.set_crop_shares(turn["id"], "gradient x input", CROPS)
        assert log.export(sid)["sessions"][0]["turns"][0]["crop_shares"] == CROPS
    finally:
        log.close()
    versions = sqlite3.connect(path).execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert versions == [(1,), (SCHEMA_VERSION,)] and SCHEMA_VERSION == 2


def test_html_export_needs_a_session(log: SessionLog, tmp_path: Path, capsys) -> None:
    assert main(["export", "--db", str(log.path), "--html", str(tmp_path / "out.html")]) == 2
    assert "--html needs --session" in capsys.readouterr().err and not (tmp_path / "out.html").exists()
