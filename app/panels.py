"""The page's panels in words and pictures, from a session's `ImageView`: facts, crop plan, gallery.

Pure functions, no Gradio events: the handlers (app/handlers.py) put what these return into
the page's components (and the history table's image column), and the tests read it without
a browser. Facts come from ingestion, which never returns identifiers, so nothing here can
show one.
"""

from __future__ import annotations

from app.overlay import HEAT_LEGEND, LEGEND, framed, top_crops
from app.session import ImageView, UserSession
from dragonfly_med.imaging.windowing import WINDOW_PRESETS

FILE_DEFAULT, MINMAX, CUSTOM = "file", "minmax", "custom"
FACT_LABELS = {
    "modality": "Modality", "body_part": "Body part", "study_description": "Study", "series_description": "Series",
    "format": "Format", "photometric": "Photometric", "bits_stored": "Bits stored", "transfer_syntax": "Transfer syntax",
}


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


def describe_facts(facts: dict) -> str:
    """A logged image in the history table: modality (or format) and size; "text only" without one."""
    if not facts:
        return "text only"
    kind = facts.get("modality") or facts.get("format") or facts.get("kind", "")
    return f"{kind} {facts.get('columns')}×{facts.get('rows')}"
