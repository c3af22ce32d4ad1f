"""The teaching file: from the log (`python -m app.log export --html`) and from the page's
endpoint `/export_teaching_file` on a real server; the pixel-identifier warning; `/explain`; and the
page's relevance overlay (in-process, the real tiny model)."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pydicom
import pytest
from app_server import ROOT, Server, start_server
from gradio_client import Client, handle_file
from PIL import Image
from pydicom.data import get_testdata_files

from app.log import ImageRecord, SessionLog, TurnRecord, utcnow
from app.overlay import display_size
from app.session import Services
from app.teaching import DISCLAIMER, pixel_identifier_warning
from app.ui import Page
from dragonfly_med.chat import ChatEngine
from dragonfly_med.imaging.ingest import IngestLimits
from dragonfly_med.model.configuration_dragonfly import named_geometry
from dragonfly_med.model.geometry import plan_crops

FACTS = {"kind": "dicom", "format": "DICOM", "rows": 128, "columns": 256, "modality": "CT", "body_part": "CHEST"}
PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def pictures(page: str) -> list[Image.Image]:
    """Every image embedded in the page, decoded (they must be real PNGs)."""
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in PNG.findall(page)]


def logged_session(db: Path) -> str:
    """A session with an explained answer, an answer without shares and a text-only one."""
    log = SessionLog(db)
    plan = plan_crops(256, 128, named_geometry("tiny"))
    sid = log.start_session("tiny", {"load_in_4bit": False}, user="drzyx")
    image_id = log.add_image(sid, ImageRecord("ab" * 32, FACTS, plan.to_dict()))
    record = TurnRecord(question="Which organ is shown?", answer="The lungs.", sampling={"temperature": 0.0, "top_p": 1.0,
                        "max_new_tokens": 16}, status="ok", started_at=utcnow())
    explained = log.add_turn(sid, image_id, record)
    crops = plan.to_dict()["crops"]
    log.set_crop_shares(explained, "gradient x input",
                        [{**c, "share": 0.6 if i == 0 else 0.4 / (len(crops) - 1)} for i, c in enumerate(crops)])
    log.add_turn(sid, image_id, TurnRecord(question="And the side?", answer="Left.", sampling={}, status="stopped",
                                           started_at=utcnow()))
    log.add_turn(sid, None, TurnRecord(question="What is a CT scan?", answer="A cross-sectional X-ray image.",
                                       sampling={}, status="ok", started_at=utcnow()))
    log.close()
    return sid


def export_html(db: Path, sid: str, out: Path, *extra: str) -> str:
    subprocess.run([sys.executable, "-m", "app.log", "export", "--db", str(db), "--session", sid, "--html", str(out), *extra],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    return out.read_text(encoding="utf-8")


def test_log_export_writes_one_self_contained_file(tmp_path: Path) -> None:
    db = tmp_path / "log.sqlite"
    sid = logged_session(db)
    page = export_html(db, sid, tmp_path / "teaching.html")
    for text in ("Which organ is shown?", "The lungs.", "What is a CT scan?", "tiny", "load_in_4bit: False",
                 "temperature 0.0", "CHEST", "gradient x input", "diagram of the image", "stopped", DISCLAIMER):
        assert text in page, text
    # two answers about the image, two diagrams of its shape; the text-only answer has none
    drawn = pictures(page)
    assert [p.size for p in drawn] == [display_size(256, 128)] * 2
    assert "drzyx" not in page and sid not in page  # no user name or session id unless asked for
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing to fetch: it opens offline
    identified = export_html(db, sid, tmp_path / "named.html", "--identify")
    assert "drzyx" in identified and sid in identified


def test_pixel_identifier_warning_reads_the_header(tmp_path: Path) -> None:
    ct = Path(get_testdata_files("CT_small.dcm")[0])
    assert pixel_identifier_warning(ct.read_bytes()) is None
    ds = pydicom.dcmread(ct)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    assert "BurnedInAnnotation YES" in pixel_identifier_warning((tmp_path / "burned.dcm").read_bytes())
    assert "secondary capture" in pixel_identifier_warning(Path(get_testdata_files("SC_rgb.dcm")[0]).read_bytes())
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert pixel_identifier_warning(png.getvalue()) is None


# ---------------------------------------------------------------------- a real server

SHORT = (0.0, 1.0, 12)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teaching")
    server = start_server(workdir, workdir / "log.sqlite")  # the shipped tiny model
    yield server
    server.stop()


def ask(c: Client, question: str) -> str:
    return c.predict(question, *SHORT, api_name="/send")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_explain_and_export_through_the_api(server: Server, tmp_path: Path) -> None:
    c = Client(server.url, verbose=False)
    with pytest.raises(Exception, match="No answer to explain yet"):
        c.predict(api_name="/explain")
    info = c.predict(handle_file(get_testdata_files("CT_small.dcm")[0]), api_name="/load_image")
    ask(c, "Which organ is shown?")
    explained = c.predict(api_name="/explain")
    assert explained["method"] == "gradient x input"
    crops = explained["crops"]
    assert [{k: v for k, v in crop.items() if k != "share"} for crop in crops] == info["plan"]["crops"]
    assert sum(crop["share"] for crop in crops) == pytest.approx(1.0, abs=1e-4)
    ask(c, "Thank you. What is a CT scan?")  # same conversation, still about the image
    page = Path(c.predict(False, False, api_name="/export_teaching_file")).read_text(encoding="utf-8")
    assert page.count("Which organ is shown?") == 1 and "What is a CT scan?" in page
    assert len(pictures(page)) == 2 and "diagram" not in page  # the pixels on screen, one overlay per answer
    assert DISCLAIMER in page and "CT_small" not in page


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_burned_in_image_is_left_out_unless_confirmed(server: Server, tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_files("CT_small.dcm")[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned")
    c = Client(server.url, verbose=False)
    c.predict(handle_file(tmp_path / "burned"), api_name="/load_image")
    ask(c, "Which organ is shown?")
    left_out = Path(c.predict(False, False, api_name="/export_teaching_file")).read_text(encoding="utf-8")
    assert "The image was left out" in left_out and "BurnedInAnnotation YES" in left_out
    assert "diagram of the image" in left_out
    confirmed = Path(c.predict(True, False, api_name="/export_teaching_file")).read_text(encoding="utf-8")
    assert "left out" not in confirmed and "diagram" not in confirmed and len(pictures(confirmed)) == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_text_only_answer_has_no_crops(server: Server) -> None:
    c = Client(server.url, verbose=False)
    ask(c, "What is a CT scan?")
    assert c.predict(api_name="/explain") == {"method": "gradient x input", "crops": []}


# ---------------------------------------------------------------------- the page, in-process

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_page_draws_where_the_model_looked_after_the_answer(tmp_path: Path) -> None:
    log = SessionLog(tmp_path / "log.sqlite")
    services = Services(ChatEngine.load("tiny"), log, IngestLimits(), {"model": "tiny"})
    page, request = Page(services, max_upload_mb=10, concurrency=1), gr.Request(session_hash="page-heat")
    page.build()
    session = services.session_for("page-heat", None)
    session.load(Path(get_testdata_files("CT_small.dcm")[0]).read_bytes())
    plain = page.on_explained(True, session, request)  # no answer yet: the plain grid picture
    assert plain[page.overlay] is session.view.overlay
    ticket = page.on_send("Which organ is shown?", session, request)[0]
    list(page.respond(ticket, [], 0.0, 1.0, 8, session, request))
    shown = page.on_explained(True, session, request)
    assert shown[page.overlay].size == session.view.overlay.size and shown[page.overlay] is not session.view.overlay
    captions = [caption for _, caption in shown[page.crops]]
    assert sum(c.startswith("★ ") for c in captions) == 3 and all("%" in c for c in captions)
    assert "where the model looked" in shown[page.sees]
    hidden = page.on_explained(False, session, request)  # the toggle
    assert hidden[page.overlay] is session.view.overlay and not any("%" in c for _, c in hidden[page.crops])
    (shares,) = [t["crop_shares"] for t in log.export(session.log_id)["sessions"][0]["turns"]]
    assert len(shares) == session.view.plan.num_crops  # stored with the turn
    log.close()
