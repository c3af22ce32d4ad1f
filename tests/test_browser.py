"""The page in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

Upload a refused file (its message shows in place), then an extensionless DICOM carrying patient
identifiers; see the grid overlay and the zoom ratio (and no identifier anywhere on the page);
ask, watch the answer stream, press Stop; thumbs up; a window preset; the History tab; closing
the page ends the session. Screenshots go to test-artifacts/ for a human to look at.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from app_server import ROOT, phi_dicom, phi_leaks, start_server
from pydicom.data import get_testdata_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"

if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("browser")
    server = start_server(workdir, workdir / "log.sqlite", "--concurrency", "1", name="browser")
    yield server, workdir
    server.stop()


@pytest.fixture()
def page(served):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.set_default_timeout(60_000)
        page.goto(served[0].url)
        yield page
        browser.close()


def answer_text(page) -> str:
    bot = page.locator("#chat .bot")
    return bot.last.inner_text() if bot.count() else ""


def test_upload_overlay_ask_stream_stop(page, served) -> None:
    server, workdir = served
    assert "not for diagnostic use" in page.locator("#header").inner_text().lower()
    junk = workdir / "notes.txt"
    junk.write_text("clinic notes, not an image\n" * 20)
    page.locator("#upload input[type=file]").set_input_files(str(junk))
    page.locator("#upload-message").get_by_text("neither a DICOM nor a supported photo").wait_for()
    assert "Traceback" not in page.content()
    page.locator("#upload input[type=file]").set_input_files(str(phi_dicom(workdir)))
    page.get_by_text("high-resolution view:").wait_for()
    page.locator("#overlay img").wait_for()
    assert "x native" in page.locator("#model-sees").inner_text()
    assert "CT" in page.locator("#facts").inner_text()
    page.locator("#crops img").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "browser-1-loaded.png"), full_page=True)
    assert phi_leaks(page.content()) == []

    page.get_by_text("Sampling settings").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill("1024")
    tokens.press("Enter")
    page.locator("#question textarea").fill("Count from 1 to 1000, separated by commas.")
    page.locator("#send").click()
    page.wait_for_function("() => (document.querySelector('#chat .bot:last-of-type')?.innerText || '').length > 0")
    first = answer_text(page)
    page.wait_for_function(f"() => (document.querySelector('#chat .bot:last-of-type')?.innerText || '').length > {len(first)}")
    page.screenshot(path=str(ARTIFACTS / "browser-2-streaming.png"), full_page=True)
    page.locator("#stop").click()
    time.sleep(3)
    stopped = answer_text(page)
    time.sleep(3)
    assert answer_text(page) == stopped, "the answer kept growing after Stop"
    page.screenshot(path=str(ARTIFACTS / "browser-3-stopped.png"), full_page=True)
    rows = db(workdir, "SELECT status, new_tokens FROM turns")
    assert rows and rows[-1][0] == "stopped" and rows[-1][1] < 1024, rows
    assert phi_leaks(page.content()) == []

    page.locator("#chat button[aria-label='Like']").last.click()
    wait_for(lambda: db(workdir, "SELECT liked FROM feedback") == [(1,)])
    page.locator("#window input").click()
    page.get_by_role("option", name="Lung").click()
    page.get_by_text("Window changed").wait_for()
    assert "preset:lung" in page.locator("#facts").inner_text()
    assert page.locator("#chat .bot").count() == 0  # new pixels, new conversation
    page.locator("#centre input").fill("40")
    page.locator("#width input").fill("400")
    page.locator("#apply").click()
    sync_api.expect(page.locator("#facts")).to_contain_text("centre 40, width 400 (custom)")
    sources = db(workdir, "SELECT json_extract(window, '$.source') FROM images")
    assert sources == [("minmax",), ("preset:lung",), ("custom",)]
    page.get_by_role("tab", name="History").click()
    page.locator("#history-table").get_by_text("CT 128×128").last.wait_for()
    page.screenshot(path=str(ARTIFACTS / "browser-4-history.png"), full_page=True)
    page.close()
    wait_for(lambda: db(workdir, "SELECT count(*) FROM sessions WHERE ended_at IS NULL") == [(0,)])


def db(workdir: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(workdir / "log.sqlite")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.25)


def test_examples_suggestions_and_frame_slider(page, served) -> None:
    page.locator("#examples img").nth(1).click()  # MR_small
    page.get_by_text("Example loaded").wait_for()
    page.get_by_text("Which plane is this slice in?").click()
    sync_api.expect(page.locator("#question textarea")).to_have_value("Which plane is this slice in?")
    page.locator("#upload input[type=file]").set_input_files(get_testdata_files("rtdose.dcm")[0])
    page.locator("#frame").get_by_text("Frame 8 / 15").wait_for()
    frame = page.locator("#frame input[type=number]")
    frame.fill("3")
    frame.press("Enter")
    page.get_by_text("Frame changed").wait_for()
    page.locator("#frame").get_by_text("Frame 3 / 15").wait_for()
    sync_api.expect(page.locator("#facts")).to_contain_text("3 / 15")
    page.screenshot(path=str(ARTIFACTS / "browser-5-frames.png"), full_page=True)
