"""Drop duplicate samples: same image content and same instruction text (paper appendix A).

Two records are duplicates when their images have the same bytes (SHA-256 of the file, so a
copy under another name is caught) and their user turns read the same after lower-casing and
collapsing whitespace; text-only records compare on the instruction alone. The first occurrence
is kept, in file order, so the result is deterministic. Answers are not compared: two answers to
one instruction about one image are exactly the bias appendix A warns about.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from training.engine.records import Record, read_records, record_to_llava, write_jsonl


def file_digest(path: Path, cache: dict[Path, str]) -> str:
    if path not in cache:
        cache[path] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else f"missing:{path}"
    return cache[path]


def dedup(records: list[Record]) -> tuple[list[Record], int]:
    """(kept records, number dropped)."""
    seen: set[tuple[str, str]] = set()
    digests: dict[Path, str] = {}
    kept = []
    for record in records:
        image = file_digest(record.image, digests) if record.image is not None else ""
        key = (image, record.instruction_text)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="record files, deduplicated together")
    parser.add_argument("--image-root", type=Path, default=None)
    parser.add_argument("--output", type=Path, required=True, help="JSONL of the kept records")


def run(args: argparse.Namespace) -> int:
    records = [r for path in args.data for r in read_records(path, args.image_root)]
    kept, dropped = dedup(records)
    write_jsonl(args.output, [record_to_llava(r, args.image_root) for r in kept])
    print(json.dumps({"input": len(records), "kept": len(kept), "dropped": dropped, "output": str(args.output)}))
    return 0
