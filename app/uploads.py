"""Gradio's upload components, made to leave no empty temp file for every uploaded file.

Gradio 6 (`gradio/components/file.py` and `upload_button.py`, `_process_single_file`) runs, for
`type="filepath"`, `tempfile.NamedTemporaryFile(delete=False, dir=GRADIO_CACHE)`, renames the
wrapper to the upload's path and drops it: every file an event receives leaves an empty
`tmpXXXXXXXX` at the root of the upload cache that nothing ever deletes (one per API call, one
per file of a folder). Uploads must not linger on disk, and the app cannot remove those files
afterwards: their random names look exactly like the multipart parser's files of an upload still
being received. So the path is passed on as Gradio does, without making that file.

The components stay plain `gr.File`/`gr.UploadButton` instances (the page and the API see no
difference): a subclass would not do, as Gradio writes a `.pyi` stub next to the source of every
Component subclass when it is defined.
"""

from __future__ import annotations

from typing import TypeVar

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import NamedString
from gradio_client.utils import is_valid_file

Upload = TypeVar("Upload", gr.File, gr.UploadButton)


def without_stray_temp_files(component: Upload) -> Upload:
    """`component`, whose files reach the event as Gradio passes them (same type check, same
    `NamedString` path for `type="filepath"`), without the empty temp file per file."""
    gradio_process = component._process_single_file

    def process(f: FileData) -> NamedString | bytes:
        if component.type != "filepath":
            return gradio_process(f)
        if component.file_types and not is_valid_file(f.path, component.file_types):
            raise gr.Error(f"Invalid file type. Please upload a file that is one of these formats: {component.file_types}")
        return NamedString(f.path)

    component._process_single_file = process  # type: ignore[method-assign]
    return component
