"""The page (Gradio 6 Blocks): image or series, what the model sees, chat, history.

`Page` lays the page out and wires its events; the handlers are app/handlers.py (thin: they
find the page's `UserSession` and call it), the named API endpoints app/api.py, the panels' words
and pictures app/panels.py. Every event that runs the model shares one concurrency group
("model") so the single shared engine serves a bounded number of generations at once.

Where the model looked is drawn after each answer, in an event of its own chained to the answer
(it waits for the background relevance pass; the answer never does).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from app.api import ApiEndpoints
from app.examples import Example, find_examples, thumbnail
from app.handlers import MODEL_GROUP, Handlers, close_state
from app.panels import FILE_DEFAULT
from app.session import NO_IMAGE_HINT, Services
from app.teaching import DISCLAIMER_TEXT, DISCLAIMER_TITLE
from app.uploads import without_stray_temp_files
from dragonfly_med.imaging.ingest import load_image

NOTICE = f"⚠️ **{DISCLAIMER_TITLE}** {DISCLAIMER_TEXT}"


class Page(Handlers, ApiEndpoints):
    """Builds the Blocks; its handlers (app/handlers.py, app/api.py) use the shared services."""

    def __init__(self, services: Services, max_upload_mb: int, concurrency: int):
        self.services = services
        self.max_upload_mb = max_upload_mb
        self.concurrency = concurrency  # events of the model group running at once (the engine then serialises)
        self.examples: list[Example] = find_examples()
        # JSON exports for download; Gradio copies them into its (cleaned) cache, this folder
        # itself goes when the process ends
        self.exports = tempfile.TemporaryDirectory(prefix="dragonfly-exports-")
        self.thumbnails = tempfile.TemporaryDirectory(prefix="dragonfly-examples-")

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
            self._wire()
            self._api_endpoints()
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


def build_page(services: Services, max_upload_mb: int, concurrency: int) -> gr.Blocks:
    return Page(services, max_upload_mb, concurrency).build()

