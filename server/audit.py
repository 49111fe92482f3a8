"""The audit log: append-only, hash-chained, verifiable.

Every entry carries the SHA-256 of its own contents and of the entry before it,
so editing, deleting, swapping or renumbering a row breaks the chain where it
happened::

    hash(n) = sha256(canonical({seq, at, actor, action, subject, detail, prev_hash = hash(n-1)}))

``canonical`` is JSON with sorted keys, no whitespace and ASCII escapes;
``at`` is ISO-8601 in UTC with microseconds (``2026-11-28T09:00:00.000000+00:00``).
The first entry's ``prev_hash`` is 64 zeros.

:func:`append` adds an entry inside the caller's transaction (it flushes, never
commits), so an action and its audit entry commit together or not at all.
Concurrent writers are serialised before the head is read: PostgreSQL through
a transaction-scoped advisory lock, SQLite by taking the database's write lock
first. The ``seq`` primary key is the backstop: a writer that still races (a
connection in driver-level autocommit, or a PostgreSQL transaction at
REPEATABLE READ whose snapshot predates the lock) fails with an
``IntegrityError`` instead of forking the chain; :func:`append_with_retry` runs
a unit of work and its entry in a transaction of its own and retries it when
that happens.

What :func:`verify` can and cannot see: it recomputes every hash and checks
that ``seq`` runs 1, 2, 3, … and that each ``prev_hash`` is the hash before it.
That detects an edited field, a deleted row, a row slipped in between two
others, swapped rows and renumbered rows. It cannot detect the *last* entries
being deleted (what is left is still a valid chain), an entry forged onto the
end by someone with write access to the database (it is indistinguishable from
a real append), nor a writer who rewrites an entry and recomputes every hash
after it (the chain is not keyed). An anchor closes part of that
gap: :func:`write_anchor` records the head's ``(seq, hash)`` in
``<data_dir>/audit-anchor.json`` after a commit, and ``verify(db, anchor=...)``
reports the anchored entry missing or changed. Entries appended after the last
anchor written can still be truncated undetected, and an anchor kept on the
same host as the database can be rewritten together with it: a copy kept
elsewhere is what makes truncation and rewriting visible.

Most actions are one unit of work (:func:`unit_of_work`): change rows, append
the entry, commit, then write the anchor; an exception rolls all of it back.

Errors::

    ServerError (server/errors.py)
    └── AuditError: a detail that is not JSON, a field too long, an anchor file
        that cannot be read
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, col, select

from hardware.files import atomic_write
from server.db.models import AuditEntry
from server.errors import ServerError

__all__ = ["ANCHOR_FILE", "GENESIS", "Anchor", "AuditError", "AuditReport", "append", "append_with_retry",
           "canonical", "entries", "entry_hash", "head", "lock", "read_anchor", "unit_of_work", "verify",
           "write_anchor"]

log = logging.getLogger(__name__)

#: ``prev_hash`` of the first entry.
GENESIS = "0" * 64
#: The anchor's file name inside the data directory.
ANCHOR_FILE = "audit-anchor.json"
#: Key of the PostgreSQL advisory lock that serialises appends ("edgeherd" in ASCII).
LOCK_KEY = int.from_bytes(b"edgeherd", "big")
#: Column limits of ``audit_log`` (PostgreSQL enforces them, SQLite does not: checked here for both).
_LIMITS = {"actor": 64, "action": 64, "subject": 256}
#: Key in ``Session.info`` of the entry appended last in the session's transaction (what the anchor records).
_APPENDED = "edgeherd.audit.appended"


class AuditError(ServerError):
    """An entry cannot be written or an anchor cannot be read; the message says why."""


@dataclass(frozen=True)
class Anchor:
    """The ``(seq, hash)`` of an entry known to have been committed."""

    seq: int
    hash: str


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    entries: int
    #: One line per problem, each naming the seq and what is wrong.
    problems: list[str] = field(default_factory=list)
    #: The anchor checked, if any.
    anchor: Anchor | None = None


# -- the chain format (pure) -----------------------------------------------------------------


def _utc(at: datetime) -> datetime:
    """SQLite gives naive datetimes back (stored as UTC); PostgreSQL gives them in the session's zone."""
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical(seq: int, at: datetime, actor: str, action: str, subject: str, detail: dict[str, Any],
              prev_hash: str) -> bytes:
    """The bytes an entry's hash is taken over."""
    doc = {"seq": seq, "at": _utc(at).isoformat(timespec="microseconds"), "actor": actor, "action": action,
           "subject": subject, "detail": detail, "prev_hash": prev_hash}
    return _json(doc).encode("ascii")


def entry_hash(seq: int, at: datetime, actor: str, action: str, subject: str, detail: dict[str, Any],
               prev_hash: str) -> str:
    return hashlib.sha256(canonical(seq, at, actor, action, subject, detail, prev_hash)).hexdigest()


def _hash_of(entry: AuditEntry) -> str:
    return entry_hash(entry.seq, entry.at, entry.actor, entry.action, entry.subject, entry.detail, entry.prev_hash)


# -- writing ------------------------------------------------------------------------------


def lock(db: Session) -> None:
    """Serialise audited writers from here until ``db``'s transaction ends (commit or rollback).

    :func:`append` takes it itself; take it earlier to read state that the
    entry will describe (a version's stage) without another writer changing it
    in between. Taking it twice in one transaction is harmless.
    """
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    elif dialect == "sqlite":
        # A write that changes nothing takes SQLite's write lock (waiting out the busy timeout) and,
        # as the driver opens the transaction before it, keeps it until commit or rollback.
        db.execute(text("UPDATE audit_log SET seq = seq WHERE 0 = 1"))


def head(db: Session) -> AuditEntry | None:
    """The newest entry, or None for an empty log."""
    return db.exec(select(AuditEntry).order_by(col(AuditEntry.seq).desc()).limit(1)).first()


def append(db: Session, actor: str, action: str, subject: str, detail: dict[str, Any] | None = None) -> AuditEntry:
    """Add the next entry inside the caller's transaction: flushed, not committed.

    The caller commits (the action and its entry together) or rolls back (neither).
    On SQLite a racing writer that got past the write lock fails on the ``seq``
    primary key with ``IntegrityError``: the caller rolls back and retries, or
    uses :func:`append_with_retry`.
    """
    for name, value in (("actor", actor), ("action", action), ("subject", subject)):
        if not value or len(value) > _LIMITS[name]:
            raise AuditError(f"audit {name} must be 1 to {_LIMITS[name]} characters, got {len(value)}: {value[:80]!r}")
    try:
        # what is stored is exactly what was hashed: tuples become lists, keys become strings
        clean: dict[str, Any] = json.loads(_json(detail or {}))
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit detail for {action} {subject} is not plain JSON: {exc}") from None
    lock(db)
    last = head(db)
    seq, prev = (last.seq + 1, last.hash) if last is not None else (1, GENESIS)
    at = datetime.now(timezone.utc)
    entry = AuditEntry(seq=seq, at=at, actor=actor, action=action, subject=subject, detail=clean, prev_hash=prev,
                       hash=entry_hash(seq, at, actor, action, subject, clean, prev))
    db.add(entry)
    db.flush()
    db.info[_APPENDED] = entry
    log.info("audit #%d %s %s by %s", seq, action, subject, actor)
    return entry


@contextmanager
def unit_of_work(db: Session, anchor_dir: Path | None) -> Iterator[Session]:
    """An audited action as one transaction: what the block changes in ``db`` and the entries it appends
    (:func:`append`, here or in what it calls) commit together on leaving it; then the anchor in
    ``anchor_dir`` (the data directory; None: none kept here) records the last of those entries. An exception
    rolls the transaction back and is raised again: nothing is written. An anchor that cannot be written is
    logged: the entry is committed, and the next anchor written covers it."""
    db.info.pop(_APPENDED, None)
    try:
        yield db
        db.commit()
    except BaseException:
        db.info.pop(_APPENDED, None)
        db.rollback()
        raise
    entry: AuditEntry | None = db.info.pop(_APPENDED, None)
    if entry is not None and anchor_dir is not None:
        try:
            write_anchor(anchor_dir, entry)
        except OSError as exc:
            log.warning("could not write the audit anchor: %s", exc)


def _is_race(exc: IntegrityError | OperationalError) -> bool:
    if isinstance(exc, OperationalError):
        return "database is locked" in str(exc.orig)
    return "audit_log" in str(exc.statement or "") or "audit_log" in str(exc.orig)


def append_with_retry(engine: Engine, actor: str, action: str, subject: str, detail: dict[str, Any] | None = None,
                      *, work: Callable[[Session], None] | None = None, attempts: int = 10) -> AuditEntry:
    """Run ``work(db)`` (the action being recorded, if any) and append its entry in one transaction, and commit.

    When a concurrent writer took the same ``seq`` (or SQLite reports the
    database locked), the whole transaction is rolled back and run again,
    ``work`` included, up to ``attempts`` times. Returns the committed entry
    (detached from any session).
    """
    for attempt in range(1, attempts + 1):
        with Session(engine, expire_on_commit=False) as db:
            try:
                with unit_of_work(db, None):  # the caller anchors the entry returned
                    if work is not None:
                        work(db)
                    entry = append(db, actor, action, subject, detail)
                return entry
            except (IntegrityError, OperationalError) as exc:
                if attempt == attempts or not _is_race(exc):
                    raise
                log.debug("audit append raced another writer (attempt %d): retrying", attempt)
        time.sleep(random.uniform(0.001, 0.005 * attempt))  # noqa: S311 - jitter, not a secret
    raise AssertionError("unreachable")  # pragma: no cover


# -- reading and checking --------------------------------------------------------------------


def entries(db: Session, *, action: str | None = None, actor: str | None = None, subject_contains: str | None = None,
            subject: str | None = None, limit: int = 100) -> list[AuditEntry]:
    """Entries matching every given filter (``subject``: exactly), newest first."""
    query = select(AuditEntry)
    if subject is not None:
        query = query.where(AuditEntry.subject == subject)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if subject_contains:
        query = query.where(col(AuditEntry.subject).contains(subject_contains, autoescape=True))
    return list(db.exec(query.order_by(col(AuditEntry.seq).desc()).limit(limit)).all())


def verify(db: Session, anchor: Anchor | None = None) -> AuditReport:
    """Recompute the chain from seq 1 and check it against ``anchor`` (see the module docstring for the limits)."""
    problems: list[str] = []
    expected, prev_hash, prev_seq, count = 1, GENESIS, 0, 0
    anchored: AuditEntry | None = None
    rows = db.exec(select(AuditEntry).order_by(col(AuditEntry.seq)).execution_options(yield_per=1000))
    for row in rows:
        count += 1
        if row.seq != expected:
            if row.seq > expected:
                missing = f"seq {expected}" if row.seq == expected + 1 else f"seqs {expected}–{row.seq - 1}"
                problems.append(f"{missing} missing: the log jumps to seq {row.seq} (rows deleted or renumbered)")
            else:  # cannot happen with a primary key, but a restored copy may lack it
                problems.append(f"seq {row.seq}: out of order after seq {expected - 1}")
        if row.prev_hash != prev_hash:
            before = "the genesis value (64 zeros)" if prev_seq == 0 else f"the hash of seq {prev_seq}"
            problems.append(f"seq {row.seq}: prev_hash does not match {before} (an entry before it was changed, "
                            f"removed or moved)")
        if _hash_of(row) != row.hash:
            problems.append(f"seq {row.seq}: hash does not match the entry's contents (a field was edited)")
        if anchor is not None and row.seq == anchor.seq:
            anchored = row
        expected, prev_hash, prev_seq = row.seq + 1, row.hash, row.seq
    if anchor is not None:
        if anchored is None:
            problems.append(f"seq {anchor.seq}: the anchored entry is missing (the log was truncated or the entry "
                            f"deleted; {count} entries remain)")
        elif anchored.hash != anchor.hash:
            problems.append(f"seq {anchor.seq}: hash differs from the anchor (the entry or one before it was "
                            f"rewritten)")
    return AuditReport(ok=not problems, entries=count, problems=problems, anchor=anchor)


# -- the anchor ------------------------------------------------------------------------------


def write_anchor(data_dir: Path, entry: AuditEntry) -> Path:
    """Record ``entry`` (committed) as ``<data_dir>/audit-anchor.json``; never moves the anchor backwards.

    Call it after a commit. An anchor already at or beyond ``entry.seq`` is kept,
    so a slower process cannot wind it back.
    """
    path = data_dir / ANCHOR_FILE
    current = read_anchor(path) if path.exists() else None
    if current is not None and current.seq >= entry.seq:
        return path
    atomic_write(path, _json({"seq": entry.seq, "hash": entry.hash}) + "\n", 0o644)
    return path


def read_anchor(path: Path) -> Anchor | None:
    """The anchor in ``path`` (a file, or a data directory holding ``audit-anchor.json``); None if there is none."""
    if path.is_dir():
        path = path / ANCHOR_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AuditError(f"audit anchor {path} cannot be read: {exc}") from None
    seq, digest = (doc.get("seq"), doc.get("hash")) if isinstance(doc, dict) else (None, None)
    if (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or not isinstance(digest, str)
            or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        raise AuditError(f"audit anchor {path} must be {{\"seq\": <int ≥ 1>, \"hash\": <64 hex digits>}}")
    return Anchor(seq, digest)
