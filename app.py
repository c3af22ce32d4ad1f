"""Dragonfly-Med Studio: `python app.py` serves the clinician's page on http://127.0.0.1:7860.

    python app.py [--host 127.0.0.1] [--port 7860] [--model tiny] [--load-in-4bit | --load-in-8bit]
                  [--db PATH] [--auth-file PATH] [--max-upload-mb N] [--concurrency N]

Start-up fails fast, with one line on stderr and a non-zero exit code, when the model, the users
file or the log cannot be opened: a clinician's IT person should see what to fix, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import warnings

DEFAULT_DB = "runs/app/sessions.sqlite"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default="tiny", help="'tiny' (embedded default), a directory or a hub id")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="nf4 weights for the language model (GPU)")
    quant.add_argument("--load-in-8bit", action="store_true", help="int8 weights for the language model (GPU)")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"session log, SQLite (default: {DEFAULT_DB})")
    parser.add_argument("--auth-file", help="users file from `python -m app.auth add`; login required when given")
    parser.add_argument("--max-upload-mb", type=int, default=512, help="largest accepted file (default: 512)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="generations queued into the shared model at once (the engine runs one at a time)")
    return parser.parse_args(argv)


def quiet_libraries() -> None:
    """Library chatter can quote file headers (pydicom warnings): keep the console to our lines."""
    warnings.filterwarnings("ignore")
    for name in ("pydicom", "transformers", "httpx", "PIL"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def port_error(host: str, port: int) -> str | None:
    """Why (host, port) cannot be served, checked before the slow model load; None if it can."""
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else str(exc)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from app.auth import checker
    from app.log import SessionLog
    from dragonfly_med.chat import ChatEngine
    from dragonfly_med.imaging.errors import MiB
    from dragonfly_med.imaging.ingest import IngestLimits

    if (why := port_error(args.host, args.port)) is not None:
        return fail(f"cannot serve on {args.host}:{args.port}: {why} (choose another --port)")
    try:
        auth = checker(args.auth_file) if args.auth_file else None
    except (OSError, ValueError) as exc:
        return fail(f"cannot use users file {args.auth_file}: {exc}")
    try:
        log = SessionLog(args.db)
    except Exception as exc:
        return fail(f"cannot open the session log {args.db}: {exc}")
    print(f"loading model {args.model} ...", flush=True)
    try:
        engine = ChatEngine.load(args.model, load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
    except Exception as exc:
        return fail(f"model {args.model!r} failed to load: {' '.join(str(exc).split()) or type(exc).__name__}")

    from app.session import Services
    from app.ui import build_page

    settings = {"model": args.model, "load_in_4bit": args.load_in_4bit, "load_in_8bit": args.load_in_8bit}
    services = Services(engine, log, IngestLimits(max_file_bytes=args.max_upload_mb * MiB), settings)
    demo = build_page(services, args.max_upload_mb, args.concurrency)
    demo.queue(max_size=64, default_concurrency_limit=4)
    print(f"Dragonfly-Med Studio on http://{args.host}:{args.port} (model {engine.model_id}, log {args.db})", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, max_file_size=f"{args.max_upload_mb}mb",
                show_error=True, quiet=True, footer_links=["api"], ssr_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
