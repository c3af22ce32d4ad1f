"""Training records: LLaVA-style JSON / JSONL and the release's parquet layout, read into one form.

One in-memory form, `Record`: an optional image path and a list of (user, assistant) turns.
Readers accept
- LLaVA-style JSON (a list) or JSONL: `{"id", "image", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...], "source"}`; `image` is
  relative to an image root; records without `image` are text-only;
- the release's parquet layout: columns `image_url` (relative to the image root; empty for
  text-only), `source`, and either `conversations` (a Llama-3 formatted string) or `text`
  (a caption, turned into an instruction + answer).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Instructions for caption-only records (the release drew one at random per use; we draw by
# the record's id so that a record always reads the same).
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What does this image show?",
    "Summarise the content of the image in one sentence.",
    "Write a concise description of the picture.",
)
LLAMA3_TURN = re.compile(
    r"<\|start_header_id\|>(user|assistant)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S
)


@dataclass
class Record:
    """One training or evaluation sample: an optional image and alternating turns."""

    id: str
    image: Path | None
    turns: list[tuple[str, str]]
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def instruction_text(self) -> str:
        """The user side of the conversation, normalised: what dedup compares."""
        return " ".join(" ".join(q.lower().split()) for q, _ in self.turns)


def strip_image_marker(text: str) -> str:
    """Remove LLaVA's `<image>` marker: the processor places the image block itself."""
    return text.replace("<image>", "").strip()


def turns_from_conversations(conversations: list[dict]) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> (user, assistant) pairs; system turns are not supported."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns, pending = [], None
    for message in conversations:
        role = roles.get(message.get("from") or message.get("role"))
        text = strip_image_marker(str(message.get("value", message.get("content", ""))))
        if role == "user" and pending is None:
            pending = text
        elif role == "assistant" and pending is not None:
            turns.append((pending, text))
            pending = None
        else:
            raise ValueError(f"conversation does not alternate human/gpt: {message}")
    if pending is not None:
        raise ValueError("conversation ends with a human turn")
    return turns


def caption_turn(record_id: str, caption: str) -> tuple[str, str]:
    digest = int(hashlib.sha1(record_id.encode()).hexdigest(), 16)
    return CAPTION_INSTRUCTIONS[digest % len(CAPTION_INSTRUCTIONS)], caption.strip()


def record_from_llava(raw: dict, image_root: Path | None, default_id: str, source: str) -> Record:
    image = raw.get("image")
    if isinstance(image, list):  # LLaVA allows a list; Dragonfly takes one image per sample
        if len(image) != 1:
            raise ValueError(f"record {raw.get('id', default_id)}: one image per sample")
        image = image[0]
    record_id = str(raw.get("id", default_id))
    path = None
    if image:
        path = Path(image) if image_root is None else image_root / image
    meta = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations", "source")}
    return Record(record_id, path, turns_from_conversations(raw["conversations"]), raw.get("source", source), meta)


def record_from_release_row(row: dict, image_root: Path | None, default_id: str, source: str) -> Record:
    record_id = str(row.get("id") or default_id)
    url = (row.get("image_url") or "").strip()
    path = None
    if url:
        path = Path(url) if Path(url).is_absolute() or image_root is None else image_root / url
    if row.get("conversations"):
        turns = [(q.strip(), a.strip()) for q, a in pairwise_turns(row["conversations"])]
    else:
        turns = [caption_turn(record_id, row["text"])]
    return Record(record_id, path, turns, row.get("source") or source)


def pairwise_turns(formatted: str) -> Iterator[tuple[str, str]]:
    """Split a Llama-3 formatted conversation string into (user, assistant) pairs."""
    messages = LLAMA3_TURN.findall(formatted)
    if not messages or len(messages) % 2:
        raise ValueError("release conversation string does not hold user/assistant pairs")
    for (r1, q), (r2, a) in zip(messages[::2], messages[1::2], strict=True):
        if (r1, r2) != ("user", "assistant"):
            raise ValueError("release conversation string does not alternate user/assistant")
        yield strip_image_marker(q), a


def read_records(path: Path, image_root: Path | None = None, source: str = "") -> list[Record]:
    """Read JSON, JSONL, a parquet file or a folder of parquet files into records."""
    path = Path(path)
    source = source or path.stem
    if path.is_dir() or path.suffix == ".parquet":
        import pyarrow.parquet as pq

        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no parquet files in {path}")
        rows = [row for f in files for row in pq.read_table(f).to_pylist()]
        return [record_from_release_row(r, image_root, f"{source}-{i}", source) for i, r in enumerate(rows)]
    text = path.read_text()
    if path.suffix == ".jsonl":
        raws = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        raws = json.loads(text)
    return [record_from_llava(r, image_root, f"{source}-{i}", source) for i, r in enumerate(raws)]


def record_to_llava(record: Record, image_root: Path | None = None) -> dict:
    """The inverse of `record_from_llava`: what converters and dedup write."""
    out: dict = {"id": record.id}
    if record.image is not None:
        image = record.image
        if image_root is not None and image.is_relative_to(image_root):
            image = image.relative_to(image_root)
        out["image"] = str(image)
    conversations = []
    for index, (question, answer) in enumerate(record.turns):
        if index == 0 and record.image is not None:
            question = f"<image>\n{question}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    out["conversations"] = conversations
    if record.source:
        out["source"] = record.source
    out.update(record.meta)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
