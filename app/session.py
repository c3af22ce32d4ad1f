"""One browser (or API client) session: its image, its conversation and its rows in the log.

Gradio keeps one `UserSession` per page in a `gr.State`, so users never share an image or a
conversation; they share only `Services` (the one model and the log). Nothing here imports
Gradio: the UI and the API endpoints are thin wrappers, and these rules hold for both.

PHI rules kept here: the uploaded file is read into memory and its copy in Gradio's cache is
deleted at once (window and frame changes re-decode from memory); file names are never stored;
only de-identified facts and a pixel fingerprint reach the log.

Where the model looked: when an answer about an image has streamed, an `Explainer` computes its
crop shares in the background (dragonfly_med/relevance.py) and stores them with the logged
turn; the page, `/explain` and the teaching file wait for it, the answer never does.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from app.log import ImageRecord, SessionLog, TurnRecord, utcnow
from app.overlay import draw_grids
from app.teaching import pixel_identifier_warning, teaching_html
from dragonfly_med.chat import SamplingParams
from dragonfly_med.imaging.errors import InvalidRequestError, TooLargeError, size_text
from dragonfly_med.imaging.ingest import IngestLimits, LoadedImage, load_image
from dragonfly_med.imaging.series import SeriesSet, load_slice, open_upload
from dragonfly_med.model.geometry import CropPlan
from dragonfly_med.relevance import METHOD, Explainer, Relevance, TurnSnapshot, snapshot

NO_IMAGE_HINT = "Text-only conversation: load an image to ask about it."
EXPLAIN_TIMEOUT_S = 120  # a relevance pass waits for the engine behind other users' answers


@dataclass
class Services:
    """Process-wide objects every session uses: the shared engine, the log, the upload limits."""

    engine: Any  # dragonfly_med.chat.ChatEngine (or anything with its interface)
    log: SessionLog
    limits: IngestLimits
    settings: dict  # how the model was loaded, logged with every session
    sessions: dict[str, UserSession] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def session_for(self, key: str, user: str | None) -> UserSession:
        """The session of a page (Gradio's session hash), created on its first event."""
        with self.lock:
            if key not in self.sessions:
                self.sessions[key] = UserSession(self, key, user)
            return self.sessions[key]

    def close_session(self, key: str) -> None:
        with self.lock:
            session = self.sessions.pop(key, None)
        if session is not None:
            session.close()


@dataclass
class ImageView:
    """Everything the page shows about the current image."""

    loaded: LoadedImage
    plan: CropPlan
    crops: list[Image.Image]
    overlay: Image.Image
    pixel_warning: str | None = None  # why the pixels may show identifiers (teaching export asks first)

    def to_dict(self) -> dict:
        """The `/load_image` answer: de-identified facts and the crop plan."""
        return {"facts": self.loaded.facts.to_dict(), "plan": self.plan.to_dict()}


def fingerprint(image: Image.Image) -> str:
    """SHA-256 of the displayed pixels: tells images apart in the log without storing them."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def read_upload(path: str | Path, delete: bool) -> bytes:
    """The uploaded bytes; the cached copy is removed at once so no other user can fetch it."""
    path = Path(path)
    try:
        return path.read_bytes()
    finally:
        if delete:
            remove_upload(path)


def read_uploads(paths: list[str | Path], delete: list[bool], max_bytes: int) -> list[bytes]:
    """Several uploaded files (a series, a folder): the total is checked before any is read,
    and every cached copy is removed, whether they are read or refused."""
    try:
        total = sum(Path(p).stat().st_size for p in paths)
        if total > max_bytes:
            raise TooLargeError(
                f"These {len(paths)} files are {size_text(total)} in all, above the limit of {size_text(max_bytes)}: "
                "upload one series at a time, or ask the administrator to raise --max-upload-mb"
            )
        return [read_upload(p, delete=False) for p in paths]
    finally:
        for path, ours in zip(paths, delete, strict=True):
            if ours:
                remove_upload(Path(path))


def remove_upload(path: Path) -> None:
    """Remove one upload and its folder (Gradio puts each upload in its own) from the cache."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


class UserSession:
    """Image, conversation and log rows of one page; every method is called from Gradio workers."""

    def __init__(self, services: Services, key: str, user: str | None):
        self.services = services
        self.key = key  # Gradio's session hash, for clean-up when the page goes away
        self.user = user
        self.source: bytes | None = None
        self.upload: SeriesSet | None = None  # several files, a .zip or a folder: its series
        self.series_index = 0  # the series on screen, in self.upload.series
        self.slice_index = 0  # the slice on screen, in that series
        self.view: ImageView | None = None
        self.window: str | tuple[float, float] | None = None
        self.frame: int | None = None
        self.conversation = None
        self.stop_event = threading.Event()  # the latest turn's (kept for callers that poll it)
        self.image_lock = threading.Lock()
        # Stop and Clear reach turns the page asked for but whose event has not started yet
        # (queued behind other users): each UI turn gets a ticket when its button is pressed.
        self._tickets = threading.Lock()
        self._requested = 0  # the last ticket handed out
        self._stopped_upto = 0  # turns with tickets up to this one are stopped (pressed Stop)
        self._cleared_upto = 0  # ... and their conversation is gone (Clear, new image)
        self._running: set[threading.Event] = set()  # stop events of the turns now generating
        self.turn_ids: list[int] = []  # log id of each answer shown, in chat order
        self.log_id: str | None = None
        self.image_id: int | None = None
        self.last_question: str | None = None
        self.explainers: dict[int, Explainer] = {}  # logged turn id -> its relevance computation

    # ------------------------------------------------------------------ image

    def load(self, source: bytes, window: str | tuple[float, float] | None = None, frame: int | None = None) -> ImageView:
        """Decode a new file (raises IngestError) and start a new conversation about it."""
        loaded = load_image(source, frame=frame, window=window, limits=self.services.limits)
        self.source, self.upload, self.window, self.frame = source, None, window, loaded.facts.frame_index
        return self._show(loaded)

    def load_files(self, sources: list[bytes], one_series: bool = False) -> ImageView:
        """One file, several DICOM files, a .zip or a CD folder; a series shows its middle slice.

        Everything is checked before anything changes (raises IngestError): a refused upload
        leaves the image on screen and its conversation as they were. one_series: an API call,
        which has no series picker, refuses an upload of several series.
        """
        upload = open_upload(sources, self.services.limits)
        if not isinstance(upload, SeriesSet):
            return self.load(upload)
        index = upload.series.index(upload.require_one()) if one_series else upload.default_index()
        loaded = load_slice(upload.series[index], limits=self.services.limits)
        self.source, self.upload, self.window = None, upload, None
        return self._show_slice(index, loaded)

    def select_slice(self, index: int | None, series_index: int | None = None) -> bool:
        """Another slice of the series (or another series, at its middle slice): new pixels,
        so a new conversation; the window stays. False, changing nothing, for a repeat."""
        if self.upload is None:
            raise LookupError("no series loaded")
        with self.image_lock:
            series_index = self.series_index if series_index is None else series_index
            if not 0 <= series_index < len(self.upload.series):
                raise InvalidRequestError(f"Series {series_index} does not exist: this upload has {len(self.upload.series)}")
            if series_index == self.series_index and index in (None, self.slice_index):
                return False
            series = self.upload.series[series_index]
            loaded = load_slice(series, index, window=self.window, limits=self.services.limits)
            self._show_slice(series_index, loaded)
            return True

    def _show_slice(self, series_index: int, loaded: LoadedImage) -> ImageView:
        self.series_index, self.slice_index = series_index, loaded.facts.series.slice
        self.frame = loaded.facts.frame_index
        return self._show(loaded)

    def redisplay(self, window: str | tuple[float, float] | None, frame: int | None) -> bool:
        """Same file, other window or frame: new pixels, so a new conversation too.

        Returns False, changing nothing, for a repeat of the current choice: widgets report one
        choice more than once, in concurrent events; the lock makes the later see the earlier.
        """
        if self.source is None and self.upload is None:
            raise LookupError("no image loaded")
        with self.image_lock:
            if (window, frame) == (self.window, self.frame):
                return False
            if self.upload is None:
                self.load(self.source, window, frame)
                return True
            series = self.upload.series[self.series_index]
            loaded = load_slice(series, self.slice_index, window=window, frame=frame, limits=self.services.limits)
            self.window = window
            self._show_slice(self.series_index, loaded)
            return True

    def _show(self, loaded: LoadedImage) -> ImageView:
        plan, crops = self.services.engine.preview(loaded.image)
        warning = pixel_identifier_warning(self._shown_bytes())
        self.view = ImageView(loaded, plan, list(crops), draw_grids(loaded.image, plan), warning)
        self.image_id = self.services.log.add_image(self._log_session(), ImageRecord(
            fingerprint=fingerprint(loaded.image), facts=loaded.facts.to_dict(), plan=plan.to_dict(),
            window=loaded.facts.window, frame=loaded.facts.frame_index,
        ))
        self.clear()
        return self.view

    def _shown_bytes(self) -> bytes | None:
        """The file of the image on screen: the single upload, or the series' current slice."""
        if self.upload is not None:
            return self.upload.series[self.series_index].slices[self.slice_index]
        return self.source

    # ------------------------------------------------------------------ chat

    def clear(self) -> None:
        """Forget the conversation (the image stays); the next question starts a new one.

        Turns asked for before are stopped, running or still queued, and marked cleared: the
        page must not show their answers in the new conversation."""
        with self._tickets:
            self._cleared_upto = self._requested
        self.stop()
        self.conversation = None
        self.turn_ids = []
        self.last_question = None

    def request_turn(self) -> int:
        """A ticket for a turn the page asks for now (Send, Regenerate); pass it to ask/regenerate."""
        with self._tickets:
            self._requested += 1
            return self._requested

    def stop(self) -> None:
        """End every generation of this session: the running ones (the engine's thread checks
        their events between tokens, so the answer so far stays and the turn is logged as
        stopped) and those asked for but not started yet (they end at once when they start)."""
        with self._tickets:
            self._stopped_upto = self._requested
            for event in self._running:
                event.set()
            self.stop_event.set()

    def stopped(self, ticket: int | None) -> bool:
        """Whether Stop (or Clear) was pressed after the turn with this ticket was asked for."""
        return ticket is not None and ticket <= self._stopped_upto

    def cleared(self, ticket: int | None) -> bool:
        """Whether the conversation of the turn with this ticket was cleared (Clear, new image)."""
        return ticket is not None and ticket <= self._cleared_upto

    def ask(self, question: str, params: SamplingParams, ticket: int | None = None) -> Iterator[str]:
        """Stream the answer to a new question; the turn is logged when it ends.

        A UI turn whose conversation was cleared while it waited in the queue never starts: it
        must not reopen a conversation, become the question to regenerate or take an answer slot."""
        if self.cleared(ticket):
            return nothing()
        if self.conversation is None:
            image = self.view.loaded.image if self.view else None
            self.conversation = self.services.engine.new_conversation(image)
        conversation, self.last_question = self.conversation, question
        return self._turn(question, params, conversation, lambda stop: conversation.stream(question, params, stop), ticket)

    def regenerate(self, params: SamplingParams, ticket: int | None = None) -> Iterator[str]:
        """Stream a new answer to the last question (the engine drops the old one first)."""
        if self.cleared(ticket):
            return nothing()
        if self.conversation is None or self.last_question is None:
            raise LookupError("nothing to regenerate yet")
        if self.turn_ids:
            self.turn_ids.pop()
        question, conversation = self.last_question, self.conversation
        if conversation.history and conversation.history[-1][0] == question:
            return self._turn(question, params, conversation, lambda stop: conversation.regenerate(params, stop), ticket)
        # the last answer was stopped before the engine recorded it: ask the question again
        return self._turn(question, params, conversation, lambda stop: conversation.stream(question, params, stop), ticket)

    def _turn(self, question: str, params: SamplingParams, conversation, start, ticket: int | None) -> Iterator[str]:
        """Run one generation; log it however it ends (done, stopped, failed or cancelled).

        The image and the list of answers are captured first: loading a new image mid-answer
        stops this turn, which is still logged against the image it was about and never lands
        among the new conversation's answers (whose thumbs must map to their own turns). A turn
        stopped before it started (queued when Stop was pressed) is logged as stopped, empty,
        without running the model.
        """
        with self._tickets:
            self.stop_event = stop = threading.Event()
            if self.stopped(ticket):
                stop.set()
            self._running.add(stop)
        image_id, turn_ids = self.image_id, self.turn_ids
        started, answer, stats, error, stream, explained = utcnow(), "", None, None, None, None
        try:
            if not stop.is_set():
                stream = start(stop)
                for answer in stream:
                    yield answer
                stats = conversation.last_stats
                if stats.status == "error":
                    yield error_message(stats.error)
                else:  # the stream ran to its end: the conversation's last turn is this one
                    explained = snapshot(conversation)
        except Exception as exc:  # a generation error is shown in the chat; the session goes on
            error = f"{type(exc).__name__}: {exc}"
            yield error_message(error)
        finally:
            stop.set()  # a closed (cancelled) generator must not leave the model thread running
            if stream is not None:
                stream.close()
            with self._tickets:
                self._running.discard(stop)
            record = turn_record(question, answer, params, started, stats, error)
            turn_id = self.services.log.add_turn(self._log_session(), image_id, record)
            turn_ids.append(turn_id)
            if explained is not None:
                self._explain(turn_id, explained)

    def _explain(self, turn_id: int, turn: TurnSnapshot) -> None:
        """Start the answer's relevance pass; its shares join the logged turn when computed."""
        log = self.services.log
        self.explainers[turn_id] = Explainer(
            self.services.engine, turn, on_done=lambda r: log.set_crop_shares(turn_id, r.method, r.to_dict()["crops"]))

    def last_relevance(self, timeout: float = EXPLAIN_TIMEOUT_S) -> Relevance | None:
        """Where the model looked for the conversation's last answer, once computed (raises
        LookupError when there is no answer yet; None for a text-only or failed answer)."""
        if not self.turn_ids:
            raise LookupError("no answer yet")
        explainer = self.explainers.get(self.turn_ids[-1])
        return explainer.result(timeout) if explainer is not None else None

    def explain(self) -> dict:
        """`/explain`: the method and the crop shares of the last answer (no crops: text-only)."""
        relevance = self.last_relevance()
        return relevance.to_dict() if relevance is not None else {"method": METHOD, "crops": []}

    def feedback(self, answer_index: int, liked: bool) -> bool:
        """Thumbs up/down on the answer_index-th answer of the conversation; False if unknown."""
        if not 0 <= answer_index < len(self.turn_ids):
            return False
        self.services.log.add_feedback(self.turn_ids[answer_index], liked)
        return True

    # ------------------------------------------------------------------ teaching file

    def teaching_file(self, include_image: bool, identify: bool = False) -> str:
        """The session's teaching file (app/teaching.py): the log's record of it, with the pixels
        of the image on screen unless they may show identifiers and the user did not confirm."""
        if self.log_id is None:
            raise LookupError("nothing to export yet: load an image or ask a question first")
        for explainer in list(self.explainers.values()):  # answers just given: their shares too
            explainer.result(EXPLAIN_TIMEOUT_S)
        session = self.services.log.export(self.log_id)["sessions"][0]
        view, pictures, left_out = self.view, {}, None
        if view is not None and self.image_id is not None:
            if view.pixel_warning and not include_image:
                left_out = view.pixel_warning
            else:
                pictures[self.image_id] = view.loaded.image
        return teaching_html(session, pictures, identify=identify, left_out=left_out)

    # ------------------------------------------------------------------ log

    def _log_session(self) -> str:
        """The log row of this session, created on its first image or turn (not on page views)."""
        if self.log_id is None:
            self.log_id = self.services.log.start_session(self.services.engine.model_id, self.services.settings, self.user)
        return self.log_id

    def close(self) -> None:
        """Page closed: stop any generation, end the log session and drop the pixels and bytes."""
        self.stop()
        if self.log_id is not None:
            self.services.log.end_session(self.log_id)
        self.source = self.upload = self.view = self.conversation = None


def nothing() -> Iterator[str]:
    """A stream with no answer (closable like every other stream)."""
    yield from ()


def turn_record(question: str, answer: str, params: SamplingParams, started, stats, error: str | None) -> TurnRecord:
    """The log row of a turn; no stats means the stream was closed before it ended (stopped)."""
    return TurnRecord(
        question=question, answer=answer, sampling=sampling_dict(params), started_at=started,
        status="error" if error else (stats.status if stats else "stopped"), error=error or getattr(stats, "error", None),
        ttft_s=getattr(stats, "ttft_s", None), tokens_per_s=getattr(stats, "tokens_per_s", None),
        new_tokens=getattr(stats, "new_tokens", 0) or 0,
    )


def sampling_dict(params: SamplingParams) -> dict:
    return {"temperature": params.temperature, "top_p": params.top_p, "max_new_tokens": params.max_new_tokens}


def error_message(error: str) -> str:
    """What the clinician reads when generation fails: what happened and what to do."""
    return (f"⚠️ The model could not answer ({error}). The conversation is kept: try again, "
            "shorten the question or lower 'max new tokens'.")
