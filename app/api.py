"""The named API endpoints `/load_image`, `/select_slice`, `/explain` and `/send`, for API clients.

They live in a hidden row of the page and use the page's own `gr.State`, so an API client
(gradio_client) gets a session exactly like a browser tab: the same `UserSession`, the same
limits and log. Where the page's image handlers show a refusal as a message, these raise
`gr.Error` (its text reaches the client). `/send` runs in the model's concurrency group, like
the page's answers. `/export_teaching_file` is the page's own export button (app/ui.py).

`ApiEndpoints` is mixed into `Page` (app/ui.py) next to `Handlers`, whose `session` it uses.
"""

from __future__ import annotations

import contextlib

import gradio as gr

from app.handlers import MODEL_GROUP, is_upload, params
from app.session import UserSession, read_upload
from app.uploads import without_stray_temp_files
from dragonfly_med.imaging.errors import IngestError


class ApiEndpoints:
    """The endpoints' hidden components and handlers; `Page` gives them its state, sampling
    sliders and concurrency."""

    def _api_endpoints(self) -> None:
        """The hidden components behind the endpoints (API clients only), and their events."""
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
        sampling = [self.temperature, self.top_p, self.max_new_tokens]
        self.api_load.click(self.api_load_image, [self.api_file, self.state], [self.api_info, self.state], api_name="load_image")
        self.api_select.click(self.api_select_slice, [self.api_index, self.state], [self.api_info, self.state],
                              api_name="select_slice")
        self.api_explain_button.click(self.api_explain, [self.state], [self.api_relevance, self.state], api_name="explain",
                                      concurrency_limit=None)
        self.api_ask.click(self.api_send, [self.api_message, *sampling, self.state], [self.api_answer, self.state],
                           api_name="send", concurrency_id=MODEL_GROUP, concurrency_limit=self.concurrency)

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
