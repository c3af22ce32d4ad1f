"""A page's session in-process on the real packaged tiny model (`tiny-base`): regenerate, clear, feedback, window and
frame changes, generation errors, the History tab's data and the end of a session."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import gradio as gr
import pytest
from pydicom.data import get_testdata_files

from app.log import SessionLog
from app.session import Services, UserSession
from app.ui import Page
from dragonfly_med.chat import WORKER_NAME, ChatEngine, SamplingParams
from dragonfly_med.imaging.errors import IngestError
from dragonfly_med.imaging.ingest import IngestLimits

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
QUICK = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    return ChatEngine.load("tiny-base")  # long answers to interrupt: see test_app_api.py


@pytest.fixture()
def services(engine: ChatEngine, tmp_path: Path):
    log = SessionLog(tmp_path / "log.sqlite")
    yield Services(engine, log, IngestLimits(), {"model": "tiny-base"})
    log.close()


def rows(services: Services, sql: str) -> list[tuple]:
    con = sqlite3.connect(services.log.path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def dicom_bytes(name: str) -> bytes:
    return Path(get_testdata_files(name)[0]).read_bytes()


def test_regenerate_feedback_clear(services: Services) -> None:
    session = services.session_for("page-1", "alice")
    session.load(dicom_bytes("CT_small.dcm"))
    first = list(session.ask("What is shown?", QUICK))[-1]
    conversation = session.conversation
    again = list(session.regenerate(QUICK))[-1]
    assert first and again and session.conversation is conversation
    assert len(session.turn_ids) == 1  # the regenerated answer replaces the first
    assert session.feedback(0, liked=False) and not session.feedback(5, liked=True)
    assert rows(services, "SELECT t.id, f.liked FROM feedback f JOIN turns t ON t.id = f.turn_id") == [(session.turn_ids[0], 0)]
    assert len(rows(services, "SELECT id FROM turns WHERE image_id IS NOT NULL")) == 2  # both answers logged
    session.clear()
    assert session.conversation is None and session.turn_ids == [] and session.view is not None
    list(session.ask("And now?", QUICK))
    assert session.conversation is not conversation


def test_window_and_frame_changes_start_new_conversations(services: Services) -> None:
    session = services.session_for("page-2", None)
    view = session.load(dicom_bytes("rtdose.dcm"))  # 15 greyscale frames
    frames = view.loaded.facts.frames
    assert frames == 15 and view.loaded.facts.frame_index == frames // 2
    list(session.ask("Hello?", QUICK))
    assert not session.redisplay(session.window, session.frame)  # a repeated choice changes nothing
    assert session.redisplay((1_000_000.0, 3_000_000.0), session.frame)
    assert session.view.loaded.facts.window["source"] == "custom" and session.conversation is None
    session.redisplay(session.window, 0)
    assert session.view.loaded.facts.frame_index == 0 and session.window == (1_000_000.0, 3_000_000.0)
    with pytest.raises(IngestError):
        session.redisplay(None, 99)
    prints = rows(services, "SELECT fingerprint, frame, window FROM images ORDER BY id")
    assert len(prints) == 3 and prints[0][0] != prints[1][0]  # other window, other pixels
    assert [p[1] for p in prints] == [frames // 2, frames // 2, 0]


def test_generation_error_is_a_chat_message_and_the_session_goes_on(services: Services) -> None:
    session = services.session_for("page-3", None)
    failed = list(session.ask("Hello?", SamplingParams(max_new_tokens=0)))
    assert len(failed) == 1 and "could not answer" in failed[0] and "max_new_tokens" in failed[0]
    assert list(session.ask("Hello again?", QUICK))[-1]
    assert rows(services, "SELECT status FROM turns ORDER BY id") == [("error",), ("ok",)]


def test_closed_generator_is_logged_as_stopped(services: Services) -> None:
    session = services.session_for("page-4", None)
    stream = session.ask("Count from 1 to 1000, separated by commas.", SamplingParams(max_new_tokens=500))
    next(stream)
    stream.close()  # what Gradio does to a cancelled event
    assert rows(services, "SELECT status FROM turns") == [("stopped",)]
    assert list(session.regenerate(QUICK))[-1]  # the engine is free again and asks the same question
    assert session.conversation.history[-1][0] == "Count from 1 to 1000, separated by commas."
    assert rows(services, "SELECT status FROM turns ORDER BY id") == [("stopped",), ("ok",)] and len(session.turn_ids) == 1


def test_stop_ends_the_stream_by_itself_and_keeps_the_answer(services: Services) -> None:
    """What the Stop button does: the generator is not killed, it ends by itself, stopped."""
    session = services.session_for("page-8", None)
    page = Page(services, max_upload_mb=10, concurrency=1)
    page.build()
    ticket, box, _ = page.on_send("Count from 1 to 1000, separated by commas.", None, gr.Request(session_hash="page-8"))
    assert box == "" and ticket[1].startswith("Count")
    updates = page.respond(ticket, [], 0.0, 1.0, 500, session, gr.Request(session_hash="page-8"))
    first = next(updates)[0][-1]["content"]
    page.on_stop(session)
    last = [u[0] for u in updates][-1]  # the generator finishes on its own
    worker_threads = [t for t in threading.enumerate() if t.name == WORKER_NAME]
    assert not worker_threads, "the model thread kept running after Stop"
    assert last[-1]["role"] == "assistant" and last[-1]["content"].startswith(first)
    assert rows(services, "SELECT status, new_tokens < 500 FROM turns") == [("stopped", 1)]
    assert session.feedback(0, liked=True)  # the stopped answer can be liked ...
    again = list(page.regenerate(page.on_regenerate(session, gr.Request(session_hash="page-8"))[0],
                                 last, 0.0, 1.0, 6, session, gr.Request(session_hash="page-8")))
    assert again[-1][0][-2]["content"].startswith("Count") and len(again[-1][0]) == 2  # ... and regenerated in place
    assert rows(services, "SELECT status FROM turns ORDER BY id") == [("stopped",), ("ok",)]


def test_regenerate_during_streaming_stops_the_answer_first(services: Services) -> None:
    session = services.session_for("page-10", None)
    page = Page(services, max_upload_mb=10, concurrency=1)
    page.build()
    request = gr.Request(session_hash="page-10")
    ticket = page.on_send("Count from 1 to 1000, separated by commas.", session, request)[0]
    running = page.respond(ticket, [], 0.0, 1.0, 500, session, request)
    shown = next(running)[0]
    again = page.on_regenerate(session, request)[0]  # pressed while the answer streams
    shown = [u[0] for u in running][-1]  # the first answer ends, stopped
    new = list(page.regenerate(again, shown, 0.0, 1.0, 6, session, request))[-1][0]
    assert [m["role"] for m in new] == ["user", "assistant"] and new[0]["content"].startswith("Count")
    assert rows(services, "SELECT status FROM turns ORDER BY id") == [("stopped",), ("ok",)]


def test_stop_and_clear_reach_turns_still_queued(services: Services) -> None:
    session = services.session_for("page-9", None)
    queued = session.request_turn()  # Send pressed, the event waits behind another user's turn
    session.stop()
    later = session.request_turn()  # a question asked after Stop is not stopped
    assert session.stopped(queued) and not session.stopped(later) and not session.cleared(queued)
    assert list(session.ask("Hello?", QUICK, queued)) == []  # ends at once, the model is not run
    assert session.conversation.history == []
    assert list(session.ask("Hello again?", QUICK, later))[-1]
    assert rows(services, "SELECT status, answer FROM turns ORDER BY id")[0] == ("stopped", "")
    page = Page(services, max_upload_mb=10, concurrency=1)
    page.build()
    ticket = (session.request_turn(), "And now?")
    page.on_clear(session, gr.Request(session_hash="page-9"))
    assert session.cleared(ticket[0])
    shown = list(page.respond(ticket, [{"role": "user", "content": "Hello again?"}], 0.0, 1.0, 6, session,
                              gr.Request(session_hash="page-9")))
    assert shown[-1][0] == []  # a cleared chat stays empty ...
    assert session.conversation is None and session.last_question is None and session.turn_ids == []
    assert len(rows(services, "SELECT id FROM turns")) == 2  # ... and the cleared question never ran


def test_history_lists_exports_and_filters_by_user(services: Services) -> None:
    session = services.session_for("page-5", "alice")
    list(session.ask("Text only?", QUICK))
    services.close_session("page-5")
    page = Page(services, max_upload_mb=10, concurrency=1)
    table, choices = page.history_rows(gr.Request(username="alice"))
    assert len(table) == 1 and table[0][1] == "alice" and table[0][3] == "text only" and table[0][5] == 1
    assert page.history_rows(gr.Request(username="bob"))[0] == []
    chat, path, text = page.history_session(table[0][6], gr.Request(username="alice"))
    assert chat[0] == {"role": "user", "content": "Text only?"}
    exported = json.loads(Path(path).read_text())
    assert exported == json.loads(text) and exported["sessions"][0]["ended_at"]
    assert page.history_session(table[0][6], gr.Request(username="bob")) == ([], None, "")


def test_sessions_are_separate(services: Services) -> None:
    a, b = services.session_for("page-a", None), services.session_for("page-b", None)
    assert isinstance(a, UserSession) and a is not b and services.session_for("page-a", None) is a
    a.load(dicom_bytes("CT_small.dcm"))
    assert b.view is None and b.source is None


def test_new_image_mid_answer_stops_it_and_keeps_rows_apart(services: Services) -> None:
    session = services.session_for("page-6", None)
    stream = session.ask("Count from 1 to 1000, separated by commas.", SamplingParams(max_new_tokens=500))
    next(stream)
    session.load(dicom_bytes("CT_small.dcm"))  # the running turn is stopped, a new conversation begins
    list(stream)
    assert session.turn_ids == [] and session.conversation is None
    assert rows(services, "SELECT status, image_id FROM turns") == [("stopped", None)]


def test_page_shows_frame_slider_and_window_only_where_they_apply(services: Services) -> None:
    page = Page(services, max_upload_mb=10, concurrency=1)
    page.build()
    session = services.session_for("page-7", None)
    session.load(dicom_bytes("rtdose.dcm"))
    updates = page.view_updates(session)
    assert updates[page.frame]["label"] == "Frame 8 / 15" and updates[page.frame]["visible"]
    assert updates[page.window]["visible"] and ("Lung (-600/1500)", "lung") in updates[page.window]["choices"]
    assert "high-resolution view:" in updates[page.sees] and "x native" in updates[page.sees]
    assert len(updates[page.crops]) == session.view.plan.num_crops
    session.load(Path(page.examples[2].path).read_bytes())  # the fundus photo
    updates = page.view_updates(session)
    assert not updates[page.frame]["visible"] and not updates[page.window]["visible"]
