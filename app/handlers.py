"""The page's event handlers: image or series, window and frame, chat turns, export, history.

Each handler finds the page's `UserSession` (kept in a `gr.State`), calls it and turns the
result into component updates; the rules live in the session (app/session.py), the words and
pictures in app/panels.py. `Handlers` is mixed into `Page` (app/ui.py), which makes the
components these handlers update (`self.image`, `self.chatbot`, ...) and wires the events.

A chat turn is two events: a quick one at once (`on_send`, `on_regenerate`) that gives the turn
a ticket, then the generation (`respond`, `regenerate`) in the model's concurrency group, so that
Stop or Clear pressed while it waits in the queue reach it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from app.overlay import display_copy, draw_heat
from app.panels import (
    CUSTOM,
    FILE_DEFAULT,
    crop_gallery,
    describe_facts,
    export_warning,
    facts_markdown,
    is_greyscale_dicom,
    loaded_message,
    sees_markdown,
    window_choices,
)
from app.session import UserSession, read_uploads
from dragonfly_med.chat import SamplingParams
from dragonfly_med.imaging.errors import IngestError

MODEL_GROUP = "model"  # the concurrency group of every event that runs the model


class Handlers:
    """The page's handlers; `Page` gives them `services`, `examples`, `exports` and the components."""

    def session(self, state: UserSession | None, request: gr.Request) -> UserSession:
        """The page's session: from its gr.State, or new on the page's first event."""
        if state is not None:
            return state
        return self.services.session_for(request.session_hash, request.username)

    def view_updates(self, session: UserSession, message: str = "") -> dict:
        """Every component that shows the image or depends on it, from the session's view."""
        view = session.view
        facts = view.loaded.facts
        window = session.window if isinstance(session.window, str) else (CUSTOM if session.window else FILE_DEFAULT)
        greyscale = is_greyscale_dicom(view)
        return {
            self.upload_msg: message, self.upload: None,
            self.image: display_copy(view.loaded.image), self.facts: facts_markdown(view),
            self.window: gr.update(choices=window_choices(view), value=window, visible=greyscale),
            self.centre: gr.update(value=(facts.window or {}).get("center"), visible=greyscale),
            self.width: gr.update(value=(facts.window or {}).get("width"), visible=greyscale),
            self.apply: gr.update(visible=greyscale),
            self.frame: gr.update(minimum=1, maximum=max(facts.frames, 2), value=facts.frame_index + 1,
                                  label=f"Frame {facts.frame_index + 1} / {facts.frames}", visible=facts.frames > 1),
            self.overlay: view.overlay, self.sees: sees_markdown(view),
            self.crops: crop_gallery(view),
            self.export_warning: gr.update(value=export_warning(view), visible=bool(view.pixel_warning)),
            self.export_confirm: gr.update(value=False, visible=bool(view.pixel_warning)),
            self.chatbot: [], self.suggestions: gr.update(choices=[], value=None, visible=False), self.state: session,
            **self.series_updates(session),
        }

    def series_updates(self, session: UserSession) -> dict:
        """The series picker (several series) and the slice slider `Slice n / N` (several slices)."""
        if session.upload is None:
            return {self.series_pick: gr.update(choices=[], value=None, visible=False), self.slice: gr.update(visible=False)}
        everything, current = session.upload.series, session.upload.series[session.series_index]
        count, index = len(current.slices), session.slice_index
        return {
            self.series_pick: gr.update(choices=[(s.label, str(i)) for i, s in enumerate(everything)],
                                        value=str(session.series_index), visible=len(everything) > 1),
            self.slice: gr.update(minimum=1, maximum=max(count, 2), value=index + 1, label=f"Slice {index + 1} / {count}",
                                  visible=count > 1),
        }

    # ------------------------------------------------------------------ image handlers

    def on_upload(self, path: list[str] | str | None, state: UserSession | None, request: gr.Request) -> dict:
        """Files chosen or dropped (one, several, a .zip) or a folder: an image, or a series."""
        session = self.session(state, request)
        paths = [path] if isinstance(path, str) else list(path or [])
        if not paths:
            return {self.state: session}
        try:
            sources = read_uploads(paths, [is_upload(p) for p in paths], self.services.limits.max_file_bytes)
            session.load_files(sources)
        except IngestError as exc:
            return {self.upload_msg: f"⚠️ {exc}", self.upload: None, self.state: session}
        return self.view_updates(session, loaded_message(session))

    def on_window(self, choice: str, state: UserSession | None, request: gr.Request) -> dict:
        """A window from the dropdown; "Custom" waits for the Apply button and its numbers."""
        session = self.session(state, request)
        if choice == CUSTOM:
            return {self.state: session}
        return self._redisplay(session, None if choice == FILE_DEFAULT else choice, session.frame, "Window")

    def on_custom_window(self, centre: float | None, width: float | None, state: UserSession | None, request: gr.Request) -> dict:
        session = self.session(state, request)
        if centre is None or width is None:
            return {self.upload_msg: "⚠️ Enter both a centre and a width, e.g. 40 and 400.", self.state: session}
        return self._redisplay(session, (float(centre), float(width)), session.frame, "Window")

    def on_frame(self, frame: float, state: UserSession | None, request: gr.Request) -> dict:
        session = self.session(state, request)
        return self._redisplay(session, session.window, int(frame) - 1, "Frame")

    def on_slice(self, number: float, state: UserSession | None, request: gr.Request) -> dict:
        """The slice slider (1-based on the page): new pixels, so a new conversation."""
        return self._select(self.session(state, request), int(number) - 1, None, "Slice")

    def on_series(self, choice: str | None, state: UserSession | None, request: gr.Request) -> dict:
        """The series picker: that series' middle slice, a new conversation."""
        session = self.session(state, request)
        if choice in (None, ""):
            return {self.state: session}
        return self._select(session, None, int(choice), "Series")

    def _select(self, session: UserSession, index: int | None, series_index: int | None, what: str) -> dict:
        """Show another slice or series of the upload."""
        if session.upload is None:
            return {self.state: session}
        return self._change_view(session, lambda: session.select_slice(index, series_index), what)

    def _redisplay(self, session: UserSession, window, frame: int | None, what: str) -> dict:
        """Re-decode the session's file with another window or frame."""
        if session.view is None:
            return {self.state: session}
        return self._change_view(session, lambda: session.redisplay(window, frame), what)

    def _change_view(self, session: UserSession, change: Callable[[], bool], what: str) -> dict:
        """Apply a change of view; only the state comes back when nothing changed, and a file
        that cannot show the new view leaves the old one with a warning."""
        try:
            if not change():
                return {self.state: session}
        except IngestError as exc:
            return {self.upload_msg: f"⚠️ {exc}", self.state: session}
        return self.view_updates(session, f"{what} changed: new conversation about the new pixels.")

    def on_example(self, state: UserSession | None, evt: gr.SelectData, request: gr.Request) -> dict:
        session = self.session(state, request)
        example = self.examples[evt.index]
        session.load(example.path.read_bytes())
        updates = self.view_updates(session, f"Example loaded: {example.title}.")
        updates[self.suggestions] = gr.update(choices=list(example.questions), value=None, visible=True)
        return updates

    # ------------------------------------------------------------------ chat handlers

    def on_send(self, message: str, state: UserSession | None, request: gr.Request) -> tuple:
        """Send/Enter, at once (not queued behind the model): take the question off the box and
        give the turn a ticket, so that Stop or Clear pressed while it waits in the queue reach it."""
        session = self.session(state, request)
        if not message or not message.strip():
            return None, message, session
        return (session.request_turn(), message), "", session

    def on_regenerate(self, state: UserSession | None, request: gr.Request) -> tuple:
        """Regenerate, at once: stop the answer being generated (if any), then queue a new one."""
        session = self.session(state, request)
        session.stop()
        return (session.request_turn(), None), session

    def respond(self, ticket: tuple | None, history: list, temperature: float, top_p: float, max_new_tokens: int,
                state: UserSession | None, request: gr.Request):
        """Stream the answer into the chat, token by token; Stop ends it with the answer so far."""
        session = self.session(state, request)
        if ticket is None:
            yield history, session
            return
        number, message = ticket
        # Shown with the first token (or the empty answer), i.e. once the turn exists: every
        # answer on the page then has its row in the log, which thumbs up/down rely on.
        history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        shown = False
        with contextlib.closing(session.ask(message, params(temperature, top_p, max_new_tokens), number)) as stream:
            for answer in stream:
                if session.cleared(number):  # stopped too: it ends by itself, logged with its stats
                    continue
                history[-1], shown = {"role": "assistant", "content": answer}, True
                yield history, session
        if session.cleared(number):  # Clear or a new image: this conversation is gone from the page
            yield [], session
        elif not shown:
            yield history, session

    def regenerate(self, ticket: tuple | None, history: list, temperature: float, top_p: float, max_new_tokens: int,
                   state: UserSession | None, request: gr.Request):
        """A new answer to the last question, in place of the one shown (or stopped) last."""
        session = self.session(state, request)
        number = ticket[0] if ticket else None
        if session.cleared(number):  # Clear (or a new image) while it waited in the queue
            yield [], session
            return
        if number is None or session.last_question is None:
            gr.Warning("Nothing to regenerate yet: ask a question first.")
            yield history, session
            return
        # the page's history was read when Regenerate was pressed: the answer it stopped may not
        # have been shown yet, so the last question is put back from the session if need be
        history = [*through_last_question(history, session.last_question), {"role": "assistant", "content": ""}]
        shown = False
        with contextlib.closing(session.regenerate(params(temperature, top_p, max_new_tokens), number)) as stream:
            for answer in stream:
                if session.cleared(number):  # stopped too: it ends by itself, logged with its stats
                    continue
                history[-1], shown = {"role": "assistant", "content": answer}, True
                yield history, session
        if session.cleared(number):
            yield [], session
        elif not shown:
            yield history, session

    def on_stop(self, state: UserSession | None) -> None:
        """Stop: the generation ends by itself (the partial answer stays, the turn is logged as
        stopped). Not Gradio's `cancels=`, which kills the event and leaves an Error badge."""
        if state is not None:
            state.stop()

    def on_clear(self, state: UserSession | None, request: gr.Request) -> tuple[list, UserSession]:
        session = self.session(state, request)
        session.clear()
        return [], session

    def on_like(self, history: list, state: UserSession | None, data: gr.LikeData) -> None:
        if state is None or not isinstance(data.liked, bool) or not isinstance(data.index, int):
            return
        ordinal = sum(1 for m in history[: data.index] if m["role"] == "assistant")
        state.feedback(ordinal, data.liked)

    def on_explained(self, show: bool, state: UserSession | None, request: gr.Request) -> dict:
        """After an answer (or the toggle): the grid picture and the gallery, with where the
        model looked for the last answer when shown; waits for the background relevance pass."""
        session = self.session(state, request)
        view = session.view
        if view is None:
            return {self.state: session}
        relevance = None
        if show and session.turn_ids:
            relevance = session.last_relevance()
        if relevance is None:
            return {self.overlay: view.overlay, self.crops: crop_gallery(view), self.sees: sees_markdown(view),
                    self.state: session}
        crops = relevance.to_dict()["crops"]
        return {self.overlay: draw_heat(view.loaded.image, crops), self.crops: crop_gallery(view, crops),
                self.sees: sees_markdown(view, heat=True), self.state: session}

    def on_export(self, include_image: bool, identify: bool, state: UserSession | None,
                  request: gr.Request) -> tuple[str, UserSession]:
        """`/export_teaching_file` (include_image, identify) and the page's button: the session as
        one HTML file to download (app/teaching.py)."""
        session = self.session(state, request)
        try:
            text = session.teaching_file(bool(include_image), bool(identify))
        except LookupError as exc:
            raise gr.Error(f"Nothing to export: {exc}.", print_exception=False) from None
        # one folder per export: every download is named teaching-file.html, users never share one
        path = Path(tempfile.mkdtemp(dir=self.exports.name)) / "teaching-file.html"
        path.write_text(text, encoding="utf-8")
        return str(path), session

    def on_unload(self, request: gr.Request) -> None:
        self.services.close_session(request.session_hash)

    # ------------------------------------------------------------------ history tab

    def history_rows(self, request: gr.Request) -> tuple[list[list], dict]:
        """Past sessions (only the signed-in user's own when login is on)."""
        sessions = self.services.log.list_sessions(user=request.username)
        rows = [[s["started_at"], s["user"] or "", s["model_id"], describe_facts(s["facts"]), s["images"], s["turns"], s["id"]]
                for s in sessions]
        choices = [(f"{s['started_at']} · {describe_facts(s['facts'])} · {s['turns']} turn(s)", s["id"]) for s in sessions]
        return rows, gr.update(choices=choices, value=None)

    def history_session(self, session_id: str | None, request: gr.Request) -> tuple[list, str | None, str]:
        if not session_id:
            return [], None, ""
        data = self.services.log.export(session_id)
        if not data["sessions"] or (request.username and data["sessions"][0]["user"] != request.username):
            return [], None, ""
        chat = []
        for turn in data["sessions"][0]["turns"]:
            chat += [{"role": "user", "content": turn["question"]},
                     {"role": "assistant", "content": f"{turn['answer']}\n\n<small>{turn['status']}</small>"}]
        text = json.dumps(data, indent=2)
        path = Path(self.exports.name) / f"session-{session_id}.json"
        path.write_text(text)
        return chat, str(path), text


def message_text(message: dict) -> str:
    """A chat message's text: Gradio hands back content as a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def through_last_question(history: list, question: str) -> list:
    """The chat up to and including the last question; that question is appended if missing."""
    users = [i for i, m in enumerate(history) if m.get("role") == "user"]
    if users and message_text(history[users[-1]]) == question:
        return list(history[: users[-1] + 1])
    return [*history, {"role": "user", "content": question}]


def params(temperature: float, top_p: float, max_new_tokens: float) -> SamplingParams:
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))


def is_upload(path: str) -> bool:
    """Only files inside Gradio's upload cache are ours to delete."""
    return Path(path).resolve().is_relative_to(Path(get_upload_folder()).resolve())


def close_state(session: UserSession | None) -> None:
    """Gradio drops a page's state some time after the page closes: end its session too."""
    if session is not None:
        session.services.close_session(session.key)
