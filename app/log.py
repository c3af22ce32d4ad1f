"""The session log: what was asked about which image, and how the model answered.

SQLAlchemy 2 ORM over one SQLite file in WAL mode. Each turn is its own transaction, committed
when the turn ends, so a crash loses at most the turn in progress. Nothing here may hold patient
identifiers: images are stored as a pixel fingerprint plus the de-identified facts, never as
pixels or file names.

Command line:
    python -m app.log export --db PATH [--session ID] --json
    python -m app.log export --db PATH --session ID --html OUT   (the teaching file, app/teaching.py)
    python -m app.log prune --db PATH --older-than-days N
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

SCHEMA_VERSION = 2


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every stored time is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    user: Mapped[str | None] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(String(512))
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    images: Mapped[list[ImageRow]] = relationship(cascade="all, delete-orphan", order_by="ImageRow.id")
    turns: Mapped[list[TurnRow]] = relationship(cascade="all, delete-orphan", order_by="TurnRow.id")


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    fingerprint: Mapped[str] = mapped_column(String(64))
    facts: Mapped[dict] = mapped_column(JSON, default=dict)
    window: Mapped[Any] = mapped_column(JSON)
    frame: Mapped[int | None]
    medium_grid: Mapped[list] = mapped_column(JSON)
    high_grid: Mapped[list] = mapped_column(JSON)
    zoom: Mapped[float]
    budget: Mapped[dict] = mapped_column(JSON)


class TurnRow(Base):
    __tablename__ = "turns"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    ended_at: Mapped[datetime] = mapped_column(DateTime)
    question: Mapped[str]
    answer: Mapped[str]
    sampling: Mapped[dict] = mapped_column(JSON)
    ttft_s: Mapped[float | None]
    tokens_per_s: Mapped[float | None]
    new_tokens: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None]
    # where the model looked (dragonfly_med/relevance.py): crop objects with shares, written
    # after the answer (None until then, and for text-only or failed turns)
    crop_shares: Mapped[list | None] = mapped_column(JSON)
    relevance_method: Mapped[str | None] = mapped_column(String(64))
    feedback: Mapped[list[FeedbackRow]] = relationship(cascade="all, delete-orphan", order_by="FeedbackRow.id")


class FeedbackRow(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(primary_key=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    liked: Mapped[bool]


def _add_crop_shares(db: Session) -> None:
    """1 -> 2: turns gain where the model looked; older turns keep none."""
    db.execute(text("ALTER TABLE turns ADD COLUMN crop_shares JSON"))
    db.execute(text("ALTER TABLE turns ADD COLUMN relevance_method VARCHAR(64)"))


# from_version -> function that upgrades an open connection to from_version + 1
MIGRATIONS: dict[int, Callable[[Session], None]] = {1: _add_crop_shares}


@dataclass
class ImageRecord:
    """One image as the model saw it: fingerprint, de-identified facts and the crop plan summary."""

    fingerprint: str
    facts: dict
    plan: dict
    window: Any = None
    frame: int | None = None


@dataclass
class TurnRecord:
    """One finished (or stopped, or failed) question/answer exchange."""

    question: str
    answer: str
    sampling: dict
    status: str
    started_at: datetime
    ended_at: datetime = field(default_factory=utcnow)
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    new_tokens: int = 0
    error: str | None = None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """WAL lets readers (the History tab, exports) run beside writers; FK enforce cascades."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_engine(path: str | Path) -> Engine:
    """An engine on the SQLite file at path, usable from Gradio's worker threads."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class SessionLog:
    """All reads and writes of the log; one instance per process, shared by every user."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.engine = open_engine(self.path)
        self._write_lock = threading.Lock()
        Base.metadata.create_all(self.engine)
        self._migrate()

    def _migrate(self) -> None:
        """Record the schema version on first start; upgrade older files step by step."""
        with Session(self.engine) as db, db.begin():
            current = db.scalar(select(SchemaVersion.version).order_by(SchemaVersion.version.desc()))
            if current is None:
                db.add(SchemaVersion(version=SCHEMA_VERSION))
                return
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {current}; this app knows up to {SCHEMA_VERSION}")
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](db)
                db.add(SchemaVersion(version=version + 1))

    def _write(self, fn: Callable[[Session], Any]) -> Any:
        """Run fn in its own committed transaction; one writer at a time within this process."""
        with self._write_lock, Session(self.engine, expire_on_commit=False) as db, db.begin():
            return fn(db)

    def start_session(self, model_id: str, settings: dict, user: str | None = None) -> str:
        session_id = uuid.uuid4().hex
        self._write(lambda db: db.add(SessionRow(id=session_id, model_id=model_id, settings=settings, user=user)))
        return session_id

    def end_session(self, session_id: str) -> None:
        def _end(db: Session) -> None:
            row = db.get(SessionRow, session_id)
            if row is not None and row.ended_at is None:
                row.ended_at = utcnow()

        self._write(_end)

    def add_image(self, session_id: str, image: ImageRecord) -> int:
        plan = image.plan

        def _add(db: Session) -> int:
            row = ImageRow(
                session_id=session_id, fingerprint=image.fingerprint, facts=image.facts, window=image.window,
                frame=image.frame, medium_grid=plan["medium_grid"], high_grid=plan["high_grid"], zoom=plan["zoom"],
                budget={**plan["tokens"], "separators": plan["separators"], "total": plan["image_positions"]},
            )
            db.add(row)
            db.flush()
            return row.id

        return self._write(_add)

    def add_turn(self, session_id: str, image_id: int | None, turn: TurnRecord) -> int:
        def _add(db: Session) -> int:
            row = TurnRow(session_id=session_id, image_id=image_id, **turn.__dict__)
            db.add(row)
            db.flush()
            return row.id

        return self._write(_add)

    def set_crop_shares(self, turn_id: int, method: str, crops: list[dict]) -> None:
        """Store where the model looked for a logged turn (computed after it was logged)."""

        def _set(db: Session) -> None:
            row = db.get(TurnRow, turn_id)
            if row is not None:
                row.crop_shares, row.relevance_method = crops, method

        self._write(_set)

    def add_feedback(self, turn_id: int, liked: bool) -> None:
        self._write(lambda db: db.add(FeedbackRow(turn_id=turn_id, liked=liked)))

    def list_sessions(self, user: str | None = None, limit: int = 200) -> list[dict]:
        """Newest first, with the first image's facts and the number of turns, for the History tab.

        With user, only that user's sessions: signed-in clinicians see their own history only.
        """
        query = select(SessionRow).options(selectinload(SessionRow.images), selectinload(SessionRow.turns))
        if user is not None:
            query = query.where(SessionRow.user == user)
        with Session(self.engine) as db:
            rows = db.scalars(query.order_by(SessionRow.started_at.desc()).limit(limit))
            return [_session_summary(row) for row in rows]

    def export(self, session_id: str | None = None) -> dict:
        """Sessions with their images, turns and feedback, JSON-ready; one session or all."""
        with Session(self.engine) as db:
            query = select(SessionRow).options(
                selectinload(SessionRow.images), selectinload(SessionRow.turns).selectinload(TurnRow.feedback)
            ).order_by(SessionRow.started_at)
            if session_id is not None:
                query = query.where(SessionRow.id == session_id)
            return {"schema_version": SCHEMA_VERSION, "sessions": [_session_dict(row) for row in db.scalars(query)]}

    def prune(self, older_than_days: float) -> int:
        """Delete sessions started more than older_than_days ago (with their images, turns, feedback)."""
        cutoff = utcnow() - timedelta(days=older_than_days)

        def _prune(db: Session) -> int:
            rows = list(db.scalars(select(SessionRow).where(SessionRow.started_at < cutoff)))
            for row in rows:
                db.delete(row)
            return len(rows)

        return self._write(_prune)

    def close(self) -> None:
        self.engine.dispose()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def _columns(row: Base, skip: tuple[str, ...] = ()) -> dict:
    data = {c.key: getattr(row, c.key) for c in row.__table__.columns if c.key not in skip}
    return {k: _iso(v) if isinstance(v, datetime) else v for k, v in data.items()}


def _session_summary(row: SessionRow) -> dict:
    facts = row.images[0].facts if row.images else {}
    return {
        "id": row.id, "started_at": _iso(row.started_at), "ended_at": _iso(row.ended_at), "user": row.user,
        "model_id": row.model_id, "images": len(row.images), "turns": len(row.turns), "facts": facts,
    }


def _session_dict(row: SessionRow) -> dict:
    data = _columns(row)
    data["images"] = [_columns(image) for image in row.images]
    data["turns"] = [
        {**_columns(turn), "crop_shares": turn.crop_shares or [],
         "feedback": [_columns(fb, skip=("turn_id",)) for fb in turn.feedback]}
        for turn in row.turns
    ]
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.log", description="Read or prune the session log.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="print sessions with their turns")
    export.add_argument("--db", required=True)
    export.add_argument("--session", help="one session id (default: all)")
    export.add_argument("--json", action="store_true", help="print JSON (default: one line per session)")
    export.add_argument("--html", metavar="OUT", help="write the session's teaching file (needs --session)")
    export.add_argument("--identify", action="store_true", help="with --html: name the user and the session id")
    prune = sub.add_parser("prune", help="delete sessions older than N days")
    prune.add_argument("--db", required=True)
    prune.add_argument("--older-than-days", type=float, required=True)
    args = parser.parse_args(argv)
    if not Path(args.db).exists():
        print(f"error: no log at {args.db}", file=sys.stderr)
        return 2
    log = SessionLog(args.db)
    try:
        if args.command == "prune":
            print(f"pruned {log.prune(args.older_than_days)} session(s)")
            return 0
        data = log.export(args.session)
        if args.session and not data["sessions"]:
            print(f"error: no session {args.session}", file=sys.stderr)
            return 1
        if args.html:
            return write_teaching_file(data, args)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for s in data["sessions"]:
                print(f"{s['id']}  {s['started_at']}  {s['user'] or '-'}  {s['model_id']}  {len(s['turns'])} turn(s)")
        return 0
    finally:
        log.close()


def write_teaching_file(data: dict, args: argparse.Namespace) -> int:
    """`--html OUT`: the session's teaching file, a diagram in place of the (never stored) image."""
    from app.teaching import teaching_html  # Pillow and the page's drawing: only for this command

    if not args.session:
        print("error: --html needs --session ID (one teaching file per session)", file=sys.stderr)
        return 2
    Path(args.html).write_text(teaching_html(data["sessions"][0], identify=args.identify), encoding="utf-8")
    print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
