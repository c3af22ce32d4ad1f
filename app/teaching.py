"""The teaching file: one self-contained HTML page of a session, to keep or to teach from.

Built from the session's log export (`SessionLog.export`), so the page's button and
`python -m app.log export --session ID --html OUT` write the same file; the page adds the
pixels of the image on screen, the log has none and draws a diagram in their place (the crop
grid of the stored plan, each crop shaded by its share). Everything is inline (CSS, PNG data
URIs): it opens offline, from a USB stick or an e-mail.

What it holds: per answer, the picture with its grid and relevance overlay; the de-identified
facts; every question and answer with its time, status and sampling settings; the model id and
how it was loaded; the disclaimer. What it leaves out unless asked (`identify=True`): the user
name and the session id. File names are never logged, so never written.

Pixels can carry identifiers burned in (ultrasound, screen captures): `pixel_identifier_warning`
reads a DICOM's header for BurnedInAnnotation YES or a secondary-capture SOP class; the page then
warns and leaves the image out unless the user confirms.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from datetime import UTC, datetime

import pydicom
from PIL import Image

from app.overlay import HEAT_LEGEND, LEGEND, diagram, draw_heat, plan_crops_of

DISCLAIMER_TITLE = "Research demo, not for diagnostic use."  # the page's notice and the file's, one text
DISCLAIMER_TEXT = "Answers may be wrong; do not use them for patient care."
DISCLAIMER = f"{DISCLAIMER_TITLE} {DISCLAIMER_TEXT}"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage (and its multi-frame kin)
FACT_LABELS = {
    "modality": "Modality", "body_part": "Body part", "study_description": "Study", "series_description": "Series",
    "format": "Format", "photometric": "Photometric", "bits_stored": "Bits stored", "transfer_syntax": "Transfer syntax",
}
STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
.disclaimer{background:#fff3cd;border:1px solid #e0c060;padding:.6rem 1rem;font-weight:600}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .6rem;text-align:left}
.turn{border-top:1px solid #ddd;margin-top:1.5rem;padding-top:1rem}.q{font-weight:600}
.a{white-space:pre-wrap;background:#f4f6f8;padding:.6rem;border-radius:4px}
figure{margin:.8rem 0}figure img{max-width:100%;height:auto;border:1px solid #999}
figcaption,.meta{color:#555;font-size:.9rem}
"""


def pixel_identifier_warning(data: bytes | None) -> str | None:
    """Why this file's pixels may show identifiers (a DICOM header says so), or None.

    BurnedInAnnotation YES is the modality's own statement; a secondary capture is a picture of a
    screen or a scanned sheet, where names and dates are commonly part of the pixels."""
    if not data:
        return None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # not a DICOM: a photo carries no such statement
        return None
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "the DICOM header says the pixels carry burned-in annotation (BurnedInAnnotation YES)"
    sop = str(ds.get("SOPClassUID", "") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):
        return "the image is a secondary capture (a screen grab or scan), whose pixels often show names and dates"
    return None


def png_data_uri(image: Image.Image) -> str:
    """The image as an inline PNG (a `src` that needs no file beside the page)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def teaching_html(session: dict, pictures: Mapping[int, Image.Image] | None = None, identify: bool = False,
                  left_out: str | None = None) -> str:
    """The whole file for one exported session (`SessionLog.export(id)["sessions"][0]`).

    pictures: image id -> the pixels on screen (the page's current image); other images get the
    diagram. left_out: why an image on screen was left out (shown in the file)."""
    pictures = pictures or {}
    images = {image["id"]: image for image in session["images"]}
    parts = [_header(session, identify, left_out)]
    shown_image = None
    for number, turn in enumerate(session["turns"], 1):
        image = images.get(turn["image_id"])
        if turn["image_id"] != shown_image:
            parts.append(_image_section(image))
            shown_image = turn["image_id"]
        parts.append(_turn_section(number, turn, image, pictures.get(turn["image_id"])))
    if not session["turns"]:
        parts.append("<p>No questions were asked in this session.</p>")
    parts.append(f'<p class="disclaimer">{html.escape(DISCLAIMER)}</p>')
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Teaching file</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _header(session: dict, identify: bool, left_out: str | None) -> str:
    """Title, disclaimer, model and settings; the user and session only when asked for."""
    settings = ", ".join(f"{k}: {v}" for k, v in (session.get("settings") or {}).items()) or "defaults"
    rows = [("Model", session["model_id"]), ("Model settings", settings), ("Session started (UTC)", session["started_at"]),
            ("Exported (UTC)", datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))]
    if identify:
        rows += [("User", session.get("user") or "(not signed in)"), ("Session id", session["id"])]
    text = (f'<h1>Dragonfly-Med teaching file</h1>\n<p class="disclaimer">{html.escape(DISCLAIMER)}</p>\n'
            f"{_table(rows)}")
    if left_out:
        text += (f"<p><strong>The image was left out:</strong> {html.escape(left_out)}. A diagram of the crop grid "
                 "stands in for it.</p>")
    return text


def _image_section(image: dict | None) -> str:
    """The facts of the image the following answers are about (or a text-only heading)."""
    if image is None:
        return "<h2>Text-only questions</h2>"
    return f"<h2>Image</h2>\n{_table(fact_rows(image['facts']))}"


def fact_rows(facts: dict) -> list[tuple[str, str]]:
    """The de-identified facts worth reading (ingestion stores no identifiers to begin with)."""
    rows = [("Size", f"{facts.get('columns')} × {facts.get('rows')} px")]
    if (facts.get("frames") or 1) > 1:
        rows.append(("Frame", f"{facts['frame_index'] + 1} / {facts['frames']}"))
    series = facts.get("series")
    if series:
        rows.append(("Slice", f"{series['slice'] + 1} / {series['slices']}"))
        rows += [(label, f"{series[key]:g} mm") for key, label in (("spacing_mm", "Slice spacing"), ("thickness_mm", "Slice thickness"))
                 if series.get(key) is not None]
        if series.get("orientation"):
            rows.append(("Orientation", series["orientation"]))
    if facts.get("pixel_spacing"):
        rows.append(("Pixel spacing", " × ".join(f"{v:g}" for v in facts["pixel_spacing"]) + " mm"))
    if facts.get("window"):
        w = facts["window"]
        rows.append(("Window", f"centre {w['center']:g}, width {w['width']:g} ({w['source']})"))
    return rows + [(label, str(facts[key])) for key, label in FACT_LABELS.items() if facts.get(key) not in (None, "")]


def _turn_section(number: int, turn: dict, image: dict | None, picture: Image.Image | None) -> str:
    """One question and answer, its settings, and where the model looked."""
    sampling = turn.get("sampling") or {}
    settings = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sampling.items())
    meta = f"{turn['started_at']} · {turn['status']} · {settings}"
    text = (f'<div class="turn"><p class="meta">Answer {number} · {html.escape(meta)}</p>\n'
            f'<p class="q">Q: {html.escape(turn["question"])}</p>\n<div class="a">{html.escape(turn["answer"]) or "(no answer)"}</div>')
    if image is not None:
        text += _figure(turn, image, picture)
    return text + "</div>"


def _figure(turn: dict, image: dict, picture: Image.Image | None) -> str:
    """The picture (or the diagram) with this answer's relevance overlay, and its caption."""
    facts, crops = image["facts"], turn.get("crop_shares") or []
    size = (int(facts["columns"]), int(facts["rows"]))
    if not crops:
        crops = plan_crops_of(size, image["medium_grid"], image["high_grid"])
    drawn = draw_heat(picture, crops) if picture is not None else diagram(size, crops)
    what = "the image" if picture is not None else "a diagram of the image's crop grid (the log keeps no pixels)"
    if "share" in crops[0]:
        ranked = sorted(range(len(crops)), key=lambda i: -crops[i]["share"])[:3]
        top = ", ".join(f"crop {i} ({crops[i]['level']}) {crops[i]['share']:.0%}" for i in ranked)
        caption = (f"Where the model looked ({html.escape(turn.get('relevance_method') or 'relevance')}), on {what}. "
                   f"Largest shares: {top}. {HEAT_LEGEND}.")
    else:
        caption = f"The crop grid on {what}; no relevance was computed for this answer. {LEGEND}."
    return f'<figure><img alt="crop grid" src="{png_data_uri(drawn)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"
