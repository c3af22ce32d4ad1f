"""The page (Gradio 6 Blocks): image or series, what the model sees, chat, history; plus API endpoints.

Handlers are thin: they find the page's `UserSession` (kept in a `gr.State`), call it and turn
the result into component updates. Every event that runs the model shares one concurrency
group ("model") so the single shared engine serves a bounded number of generations at once.
The API endpoints `/load_image`, `/select_slice`, `/send`, `/explain` and
`/export_teaching_file` use the same state as the page's own events, so an API client gets a
session exactly like a browser tab.

Where the model looked is drawn after each answer, in an event of its own chained to the answer
(it waits for the background relevance pass; the answer never does).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from app.examples import Example, find_examples, thumbnail
from app.overlay import HEAT_LEGEND, LEGEND, display_copy, draw_heat, framed, top_crops
from app.session import NO_IMAGE_HINT, ImageView, Services, UserSession, read_upload, read_uploads
from app.teaching import DISCLAIMER_TEXT, DISCLAIMER_TITLE
from app.uploads import without_stray_temp_files
from dragonfly_med.chat import SamplingParams
from dragonfly_med.imaging.errors import IngestError
from dragonfly_med.imaging.ingest import load_image
from dragonfly_med.imaging.windowing import WINDOW_PRESETS

NOTICE = f"⚠️ **{DISCLAIMER_TITLE}** {DISCLAIMER_TEXT}"
MODEL_GROUP = "model"
FILE_DEFAULT, MINMAX, CUSTOM = "file", "minmax", "custom"
FACT_LABELS = {
    "modality": "Modality", "body_part": "Body part", "study_description": "Study", "series_description": "Series",
    "format": "Format", "photometric": "Photometric", "bits_stored": "Bits stored", "transfer_syntax": "Transfer syntax",
}


# ---------------------------------------------------------------------- text for the page


def sees_markdown(view: ImageView, heat: bool = False) -> str:
    """Grids, zoom ratio and token budget: how the model will cut and count this image; with heat,
    how to read the relevance overlay too."""
    plan, b = view.plan, view.plan.budget
    (mc, mr), (hc, hr) = plan.medium_grid, plan.high_grid
    return "\n\n".join([
        f"**Grids:** medium {mc}×{mr} ({mc * mr} crops), high {hc}×{hr} ({hc * hr} crops), {plan.num_crops} crops in all",
        f"**Zoom:** high-resolution view: {plan.zoom:.1f}x native",
        f"**Tokens:** low {b.low} · medium {b.medium} · high {b.high} · separators {b.separators} · "
        f"total {b.image_positions}",
        f"<small>{LEGEND}</small>" + (f"<br><small>{HEAT_LEGEND}; top crops framed red in the gallery</small>" if heat else ""),
    ])


def crop_gallery(view: ImageView, crops: list[dict] | None = None) -> list[tuple]:
    """The crops in model order, captioned; with shares, each share shown and the top crops framed."""
    top = set(top_crops(crops)) if crops else set()
    items = []
    for i, (image, crop) in enumerate(zip(view.crops, view.plan.crops, strict=True)):
        caption = f"{i} {crop.level}" + (f" · {crops[i]['share']:.0%}" if crops else "")
        items.append((framed(image) if i in top else image, ("★ " if i in top else "") + caption))
    return items


def facts_markdown(view: ImageView) -> str:
    """The facts panel: de-identified facts only (ingestion never returns identifiers)."""
    f = view.loaded.facts.to_dict()
    rows = [("Size", f"{f['columns']} × {f['rows']} px")]
    if f["frames"] > 1:
        rows.append(("Frame", f"{f['frame_index'] + 1} / {f['frames']}"))
    rows += series_rows(f.get("series"))
    if f.get("pixel_spacing"):
        rows.append(("Pixel spacing", " × ".join(f"{v:g}" for v in f["pixel_spacing"]) + " mm"))
    if f.get("window"):
        w = f["window"]
        rows.append(("Window", f"centre {w['center']:g}, width {w['width']:g} ({w['source']})"))
    rows += [(label, str(f[key])) for key, label in FACT_LABELS.items() if f.get(key) not in (None, "")]
    return "| Fact | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def series_rows(series: dict | None) -> list[tuple[str, str]]:
    """Series-level facts for the panel: slice n / N, spacing, thickness, plane (no identifiers)."""
    if not series:
        return []
    rows = [("Slice", f"{series['slice'] + 1} / {series['slices']}")]
    if series.get("spacing_mm") is not None:
        rows.append(("Slice spacing", f"{series['spacing_mm']:g} mm"))
    if series.get("thickness_mm") is not None:
        rows.append(("Slice thickness", f"{series['thickness_mm']:g} mm"))
    if series.get("orientation"):
        rows.append(("Orientation", series["orientation"]))
    return rows


def loaded_message(session: UserSession) -> str:
    """What the upload became: an image, or a series (and what of it was left out, and why)."""
    if session.upload is None:
        return "Image loaded: new conversation."
    series = session.upload.series[session.series_index]
    text = (f"Series loaded: {len(series.slices)} slice(s), slice {session.slice_index + 1} shown"
            f"{f' ({len(session.upload.series)} series: pick one above the image)' if len(session.upload.series) > 1 else ''}"
            ": new conversation.")
    if session.upload.left_out:
        text += "\n\nLeft out:\n" + "\n".join(f"- {reason}" for reason in session.upload.left_out)
    return text


def window_choices(view: ImageView) -> list[tuple[str, str]]:
    """Dropdown entries: the file's own windows, the PACS presets, min..max and custom."""
    facts = view.loaded.facts
    choices = [("File default", FILE_DEFAULT)]
    choices += [(f"File window {i + 1} ({w['center']:g}/{w['width']:g})", f"file:{i}") for i, w in enumerate(facts.file_windows) if i]
    choices += [(f"{name.replace('_', ' ').capitalize()} ({c:g}/{w:g})", name) for name, (c, w) in WINDOW_PRESETS.items()]
    return choices + [("Min–max", MINMAX), ("Custom centre/width", CUSTOM)]


def export_warning(view: ImageView) -> str:
    """Said before a teaching-file export when the pixels may show identifiers."""
    if not view.pixel_warning:
        return ""
    return (f"⚠️ **The image may show identifiers:** {view.pixel_warning}. The teaching file leaves the image out "
            "(a diagram stands in) unless you tick the box below after checking it.")


def is_greyscale_dicom(view: ImageView) -> bool:
    facts = view.loaded.facts
    return facts.kind == "dicom" and str(facts.photometric or "").upper().startswith("MONOCHROME")


# ---------------------------------------------------------------------- the page


class Page:
    """Builds the Blocks and holds the handlers that need the shared services."""

    def __init__(self, services: Services, max_upload_mb: int, concurrency: int):
        self.services = services
        self.max_upload_mb = max_upload_mb
        self.concurrency = concurrency  # events of the model group running at once (the engine then serialises)
        self.examples: list[Example] = find_examples()
        # JSON exports for download; Gradio copies them into its (cleaned) cache, this folder
        # itself goes when the process ends
        self.exports = tempfile.TemporaryDirectory(prefix="dragonfly-exports-")
        self.thumbnails = tempfile.TemporaryDirectory(prefix="dragonfly-examples-")

    # ------------------------------------------------------------------ helpers

    def example_thumbnails(self) -> list[tuple[str, str]]:
        """The gallery's (thumbnail PNG, title) pairs, in a folder of their own that Gradio serves in
        place (`gr.set_static_paths`): given as images, they would be written into Gradio's upload
        cache, which is to hold nothing but uploads being consumed. Public sample images only."""
        folder = Path(self.thumbnails.name)
        gr.set_static_paths([folder])
        pairs = []
        for number, example in enumerate(self.examples):
            path = folder / f"example-{number}.png"
            thumbnail(load_image(example.path).image).save(path)
            pairs.append((str(path), example.title))
        return pairs

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
        """Show another slice or series of the upload; only the state comes back when nothing changed."""
        if session.upload is None:
            return {self.state: session}
        try:
            if not session.select_slice(index, series_index):
                return {self.state: session}
        except IngestError as exc:
            return {self.upload_msg: f"⚠️ {exc}", self.state: session}
        return self.view_updates(session, f"{what} changed: new conversation about the new pixels.")

    def _redisplay(self, session: UserSession, window, frame: int | None, what: str) -> dict:
        """Re-decode the session's file; only the state comes back when nothing changed."""
        if session.view is None:
            return {self.state: session}
        try:
            if not session.redisplay(window, frame):
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

    # ------------------------------------------------------------------ API endpoints

    def api_load_image(self, path: str, state: UserSession | None, request: gr.Request) -> tuple[dict, UserSession]:
        """`/load_image`: a file -> its de-identified facts and crop plan (refusals raise gr.Error)."""
        session = self.session(state, request)
        if not path:
            raise gr.Error("Send a file: a DICOM (any or no extension), a photo or a .zip of one series.", print_exception=False)
        try:
            view = session.load_files([read_upload(path, delete=is_upload(path))], one_series=True)
        except IngestError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return view.to_dict(), session

    def api_select_slice(self, index: float | None, state: UserSession | None, request: gr.Request) -> tuple[dict, UserSession]:
        """`/select_slice`: slice `index` (0-based, in position order) of the series loaded last, as
        `/load_image` answers; a new conversation about it (the same slice again changes nothing)."""
        session = self.session(state, request)
        if session.upload is None:
            raise gr.Error("No series is loaded in this session: send a .zip of one series to /load_image first.",
                           print_exception=False)
        if index is None or float(index) != int(index):
            raise gr.Error(f"The slice index must be a whole number, not {index}.", print_exception=False)
        try:
            session.select_slice(int(index))
        except IngestError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return session.view.to_dict(), session

    def api_explain(self, state: UserSession | None, request: gr.Request) -> tuple[dict, UserSession]:
        """`/explain`: `{"method", "crops": [{"level", "col", "row", "box", "share"}]}` for the
        session's last answer (no crops for a text-only answer); waits for it to be computed."""
        session = self.session(state, request)
        try:
            return session.explain(), session
        except LookupError:
            raise gr.Error("No answer to explain yet: ask a question with /send first.", print_exception=False) from None

    def api_send(self, message: str, temperature: float, top_p: float, max_new_tokens: int,
                 state: UserSession | None, request: gr.Request):
        """`/send`: a message -> the answer so far, streamed; about the image loaded last, if any."""
        session = self.session(state, request)
        if not message or not message.strip():
            raise gr.Error("Send a non-empty message.", print_exception=False)
        answer = ""
        with contextlib.closing(session.ask(message, params(temperature, top_p, max_new_tokens))) as stream:
            for answer in stream:
                yield answer, session
        if not answer:  # the model ended at once: clients still get one (empty) answer
            yield answer, session

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

    # ------------------------------------------------------------------ layout

    def build(self) -> gr.Blocks:
        model_id = self.services.engine.model_id
        # files older than 15 min are removed from Gradio's cache every 5 min
        with gr.Blocks(title="Dragonfly-Med Studio", delete_cache=(300, 900)) as demo:
            self.state = gr.State(None, delete_callback=close_state)
            self.ticket = gr.State(None)  # (ticket, question) of the turn the page asked for last
            gr.Markdown(f"# Dragonfly-Med Studio\n**Model:** `{model_id}`\n\n{NOTICE}", elem_id="header")
            with gr.Tab("Studio"):
                with gr.Row(equal_height=False):
                    self._image_column()
                    self._model_sees_column()
                    self._chat_column()
            with gr.Tab("History") as history_tab:
                self._history_tab(history_tab)
            self._api_endpoints()
            self._wire()
            demo.unload(self.on_unload)
        return demo

    def _image_column(self) -> None:
        with gr.Column(scale=1):
            self.upload = without_stray_temp_files(gr.File(
                label="Image: click or drop a DICOM (any or no extension) or photo; or a series: several "
                f"DICOM files or a .zip; ≤ {self.max_upload_mb} MB in all",
                file_count="multiple", type="filepath", elem_id="upload"))
            self.folder = without_stray_temp_files(gr.UploadButton(
                "Open a folder (a CD's DICOM folder, with or without DICOMDIR)",
                file_count="directory", type="filepath", size="sm", elem_id="upload-folder"))
            self.upload_msg = gr.Markdown(NO_IMAGE_HINT, elem_id="upload-message")
            self.series_pick = gr.Dropdown(label="Series", choices=[], visible=False, elem_id="series")
            self.image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=320, elem_id="image")
            with gr.Row():
                self.window = gr.Dropdown(label="Window", choices=[("File default", FILE_DEFAULT)], value=FILE_DEFAULT,
                                          visible=False, elem_id="window")
                self.centre = gr.Number(label="Centre", visible=False, min_width=80, elem_id="centre")
                self.width = gr.Number(label="Width", visible=False, min_width=80, elem_id="width")
                self.apply = gr.Button("Apply centre/width", visible=False, size="sm", elem_id="apply")
            self.frame = gr.Slider(1, 2, step=1, value=1, label="Frame", visible=False, elem_id="frame")
            self.slice = gr.Slider(1, 2, step=1, value=1, label="Slice", visible=False, elem_id="slice")
            self.facts = gr.Markdown(elem_id="facts")
            self.gallery = gr.Gallery(value=self.example_thumbnails(),
                                      label="Examples (click to load)", columns=5, height=150, allow_preview=False,
                                      format="png", elem_id="examples")
            self.suggestions = gr.Radio(label="Suggested questions", choices=[], visible=False)

    def _model_sees_column(self) -> None:
        with gr.Column(scale=1):
            self.overlay = gr.Image(label="What the model sees", type="pil", format="png", interactive=False, elem_id="overlay")
            self.show_heat = gr.Checkbox(value=True, label="Show where the model looked (last answer)", elem_id="show-heat")
            self.sees = gr.Markdown(elem_id="model-sees")
            self.crops = gr.Gallery(label="Crops in model order", columns=6, height=260, format="png", elem_id="crops")

    def _chat_column(self) -> None:
        with gr.Column(scale=1):
            self.chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat")
            self.message = gr.Textbox(label="Question", placeholder="Ask about the image (or a text-only question)",
                                      lines=2, elem_id="question")
            with gr.Row():
                self.send = gr.Button("Send", variant="primary", elem_id="send")
                self.stop = gr.Button("Stop", variant="stop", elem_id="stop")
                self.regen = gr.Button("Regenerate", elem_id="regenerate")
                self.clear = gr.Button("Clear", elem_id="clear")
            with gr.Group():
                self.export_warning = gr.Markdown(visible=False, elem_id="export-warning")
                self.export_confirm = gr.Checkbox(value=False, visible=False, elem_id="export-confirm",
                                                  label="Include the image anyway: I checked it shows no identifiers")
                self.export_identify = gr.Checkbox(value=False, label="Name me and the session in the file",
                                                   elem_id="export-identify")
                self.export_teaching = gr.Button("Export teaching file", size="sm", elem_id="export-teaching")
                self.teaching_file = gr.File(label="Teaching file (HTML)", interactive=False, elem_id="teaching-file")
            with gr.Accordion("Sampling settings", open=False):
                self.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                self.top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                self.max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens", elem_id="max-new-tokens")

    def _history_tab(self, tab: gr.Tab) -> None:
        self.refresh = gr.Button("Refresh", size="sm")
        self.table = gr.Dataframe(headers=["started (UTC)", "user", "model", "image", "images", "turns", "id"],
                                  interactive=False, elem_id="history-table")
        self.pick = gr.Dropdown(label="Session", choices=[])
        self.past_chat = gr.Chatbot(label="Conversation", height=360)
        self.export_file = gr.File(label="Export (JSON)", interactive=False)
        self.export_json = gr.Code(language="json", label="JSON")
        self.history_tab = tab

    def _api_endpoints(self) -> None:
        """Hidden components behind `/load_image`, `/select_slice`, `/send` and `/explain` (API clients only)."""
        with gr.Row(visible=False):
            self.api_file = without_stray_temp_files(gr.File(type="filepath"))
            self.api_info = gr.JSON()
            self.api_message = gr.Textbox()
            self.api_answer = gr.Textbox()
            self.api_load = gr.Button()
            self.api_ask = gr.Button()
            self.api_index = gr.Number(precision=0)
            self.api_select = gr.Button()
            self.api_relevance = gr.JSON()
            self.api_explain_button = gr.Button()

    def _wire(self) -> None:
        hidden = {"api_visibility": "undocumented"}
        view_outputs = [self.upload_msg, self.upload, self.image, self.facts, self.window, self.centre, self.width,
                        self.apply, self.frame, self.overlay, self.sees, self.crops, self.chatbot, self.suggestions, self.state,
                        self.series_pick, self.slice, self.export_warning, self.export_confirm]
        self.upload.upload(self.on_upload, [self.upload, self.state], view_outputs, **hidden)
        self.folder.upload(self.on_upload, [self.folder, self.state], view_outputs, **hidden)
        self.series_pick.input(self.on_series, [self.series_pick, self.state], view_outputs, **hidden)
        self.slice.input(self.on_slice, [self.slice, self.state], view_outputs, trigger_mode="always_last", **hidden)
        self.window.input(self.on_window, [self.window, self.state], view_outputs, **hidden)
        self.apply.click(self.on_custom_window, [self.centre, self.width, self.state], view_outputs, **hidden)
        # dragging reports every step: only the latest pending frame is decoded
        self.frame.input(self.on_frame, [self.frame, self.state], view_outputs, trigger_mode="always_last", **hidden)
        self.gallery.select(self.on_example, [self.state], view_outputs, **hidden)
        self.suggestions.input(lambda q: q, [self.suggestions], [self.message], **hidden)

        sampling = [self.temperature, self.top_p, self.max_new_tokens]
        model = {"concurrency_id": MODEL_GROUP, "concurrency_limit": self.concurrency, **hidden}
        # Each turn is two events: a quick one at once (ticket), then the generation in the model
        # group. Stop only sets the session's stop flags: the generator then ends by itself.
        quick = {"queue": False, "show_progress": "hidden", **hidden}
        chat_in, chat_out = [self.ticket, self.chatbot, *sampling, self.state], [self.chatbot, self.state]
        # where the model looked: drawn once the answer is in, never before it. These events only
        # wait for the background pass (which queues for the engine itself): no limit of their own
        explained = (self.on_explained, [self.show_heat, self.state], [self.overlay, self.crops, self.sees, self.state])
        waiting = {"concurrency_limit": None, **hidden}
        for trigger in (self.send.click, self.message.submit):
            trigger(self.on_send, [self.message, self.state], [self.ticket, self.message, self.state], **quick
                    ).then(self.respond, chat_in, chat_out, **model).then(*explained, **waiting)
        self.regen.click(self.on_regenerate, [self.state], [self.ticket, self.state], **quick
                         ).then(self.regenerate, chat_in, chat_out, **model).then(*explained, **waiting)
        self.show_heat.input(*explained, **waiting)
        self.export_teaching.click(self.on_export, [self.export_confirm, self.export_identify, self.state],
                                   [self.teaching_file, self.state], api_name="export_teaching_file", concurrency_limit=None)
        self.stop.click(self.on_stop, [self.state], None, **quick)
        self.clear.click(self.on_clear, [self.state], [self.chatbot, self.state], **hidden)
        self.chatbot.like(self.on_like, [self.chatbot, self.state], None, **hidden)

        for trigger in (self.refresh.click, self.history_tab.select):
            trigger(self.history_rows, None, [self.table, self.pick], **hidden)
        self.pick.input(self.history_session, [self.pick], [self.past_chat, self.export_file, self.export_json], **hidden)

        self.api_load.click(self.api_load_image, [self.api_file, self.state], [self.api_info, self.state], api_name="load_image")
        self.api_select.click(self.api_select_slice, [self.api_index, self.state], [self.api_info, self.state],
                              api_name="select_slice")
        self.api_explain_button.click(self.api_explain, [self.state], [self.api_relevance, self.state], api_name="explain",
                                      concurrency_limit=None)
        self.api_ask.click(self.api_send, [self.api_message, *sampling, self.state], [self.api_answer, self.state],
                           api_name="send", concurrency_id=MODEL_GROUP, concurrency_limit=self.concurrency)


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


def describe_facts(facts: dict) -> str:
    if not facts:
        return "text only"
    kind = facts.get("modality") or facts.get("format") or facts.get("kind", "")
    return f"{kind} {facts.get('columns')}×{facts.get('rows')}"


def close_state(session: UserSession | None) -> None:
    """Gradio drops a page's state some time after the page closes: end its session too."""
    if session is not None:
        session.services.close_session(session.key)


def build_page(services: Services, max_upload_mb: int, concurrency: int) -> gr.Blocks:
    return Page(services, max_upload_mb, concurrency).build()

