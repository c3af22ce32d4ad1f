"""`python -m dragonfly_med inspect FILE [--frame N] [--window PRESET|C,W] [--out PNG] [--json]`.

Prints the facts about a DICOM or photo (never patient identity) and optionally writes the
8-bit image the model and viewer see. Refused input gives one `error: ...` line on stderr and
exit status 2, never a traceback. Messages do not repeat the file name: names of files from
hospital systems often contain the patient's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dragonfly_med.imaging.errors import IngestError, InvalidRequestError
from dragonfly_med.imaging.ingest import load_image
from dragonfly_med.imaging.windowing import WINDOW_PRESETS, parse_window

EXIT_REFUSED = 2
EXIT_INTERNAL = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Read a DICOM or photo: print its facts and write the 8-bit RGB image."
    parser.add_argument("file", help="DICOM (any extension or none) or PNG/JPEG/TIFF/BMP/WebP")
    parser.add_argument(
        "--frame", default=None, help="0-based frame index (default: the middle frame)"
    )
    parser.add_argument(
        "--window",
        default=None,
        help=f"preset ({', '.join(WINDOW_PRESETS)}), 'minmax', 'file[:N]' or centre,width "
        "such as -600,1500 (default: the file's own window, else min..max)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the 8-bit image as PNG")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.add_argument(
        "--header",
        action="store_true",
        help="also print the de-identified DICOM header (PS3.15 Annex E basic profile)",
    )


def run(args: argparse.Namespace) -> int:
    """Load, print facts, write the image; map every failure to one stderr line."""
    try:
        window = parse_window(args.window) if args.window is not None else None
        loaded = load_image(args.file, frame=_parse_frame(args.frame), window=window)
        header = _header(args.file) if args.header and loaded.facts.kind == "dicom" else None
        if args.out is not None:
            _write_png(loaded.image, args.out)
    except IngestError as exc:
        return _fail(str(exc), EXIT_REFUSED)
    except OutputError as exc:
        return _fail(str(exc), EXIT_REFUSED)
    except Exception as exc:  # a bug, not the user's input: still no traceback, no PHI
        return _fail(f"unexpected failure ({type(exc).__name__}); please report it", EXIT_INTERNAL)
    facts = loaded.facts.to_dict()
    if header is not None:
        facts["header"] = header
    print(json.dumps(facts, indent=2) if args.json else _as_text(facts))
    return 0


def _parse_frame(text: str | int | None) -> int | None:
    """Parsed here, not by argparse, so a bad value still gives one `error:` line."""
    if text is None or isinstance(text, int):
        return text
    try:
        return int(text)
    except ValueError:
        raise InvalidRequestError(
            f"--frame must be a whole number such as 0 or 12, not '{str(text)[:20]}'"
        ) from None


class OutputError(Exception):
    """The output image could not be written."""


def _write_png(image, out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, format="PNG")
    except OSError as exc:
        raise OutputError(
            f"could not write the PNG ({exc.strerror or type(exc).__name__}): choose a "
            "writable --out path"
        ) from exc


def _header(path: str) -> dict[str, str]:
    """The de-identified header, read without pixel data."""
    import warnings

    import pydicom

    from dragonfly_med.imaging.deid import safe_header_summary

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return safe_header_summary(ds)


def _as_text(facts: dict) -> str:
    lines = []
    for key, value in facts.items():
        if isinstance(value, dict) and key == "header":
            lines.append("header:")
            lines.extend(f"  {k}: {v}" for k, v in value.items())
        elif value not in (None, [], {}):
            lines.append(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    return "\n".join(lines)


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragonfly_med inspect")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
