"""Store-and-forward queue for telemetry and statistics, in SQLite.

Every report is appended here first, under a key naming its window
(``telemetry:{session}:{window_seq}``), and deleted only when the server's
receipt names that key (:meth:`Outbox.confirm`). The broker's PUBACK only
marks the row sent (:meth:`Outbox.sent`): a broker that dies before
delivering it loses it, so a row sent but not confirmed is offered again
after a while (:meth:`Outbox.pending`'s ``resend_before``) and after every
reconnection (:meth:`Outbox.resend_all`). Windows produced while offline, or
before a restart, are sent in order once the device is back. The queue is
bounded: when full, the oldest rows are dropped and the drop is counted, and
the count is reported in the next telemetry window. A window the server
refuses outright (its times are off the server's clock) is given up at once
(:meth:`Outbox.give_up`) and counted the same way.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_ATTEMPTS", "Outbox", "Queued", "window_key"]

log = logging.getLogger(__name__)

#: Times a report is sent without the server confirming it before it is given up (dropped and counted): with
#: the default receipt timeout, about 10 minutes of a server that keeps rejecting it.
MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class Queued:
    id: int
    topic: str
    payload: bytes
    key: str | None = None


def window_key(kind: str, session: int, window_seq: int) -> str:
    """The outbox key of one window, as a receipt names it."""
    return f"{kind}:{session}:{window_seq}"


class Outbox:
    def __init__(self, path: Path, max_rows: int = 10_000) -> None:
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, created REAL NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        # an outbox written before receipts gains their columns (its rows, keyless, go on PUBACK as they did);
        # each column is checked on its own, in one transaction, so an interrupted upgrade finishes next time
        with self._transaction():
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
            for name, decl in (("key", "TEXT"), ("sent", "REAL"), ("attempts", "INTEGER NOT NULL DEFAULT 0")):
                if name not in columns:
                    self._db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {decl}")
            self._db.execute("CREATE INDEX IF NOT EXISTS outbox_key ON outbox (key)")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (one fsync) around several statements; rolled back if one fails."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite has rolled back already on some errors (a full disk)
                self._db.execute("ROLLBACK")
            raise

    def _count_dropped(self, n: int) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) ON CONFLICT(key) DO "
                         "UPDATE SET value = value + excluded.value", (n,))

    def put(self, topic: str, payload: bytes, key: str | None = None) -> None:
        """Queue a report; one with a ``key`` stays until :meth:`confirm` names it, one without until its
        PUBACK (:meth:`sent`)."""
        with self._lock, self._transaction():
            self._db.execute("INSERT INTO outbox (topic, payload, created, key) VALUES (?, ?, ?, ?)",
                             (topic, payload, time.time(), key))
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            excess = count - self.max_rows
            if excess > 0:
                self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                                 (excess,))
                self._count_dropped(excess)

    def peek(self, limit: int = 100) -> list[Queued]:
        """The oldest queued messages, in order, whatever their state."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, key FROM outbox ORDER BY id LIMIT ?",
                                    (limit,)).fetchall()
        return [Queued(int(i), str(t), bytes(p), k) for i, t, p, k in rows]

    def pending(self, limit: int, exclude: set[int] | frozenset[int] = frozenset(),
                resend_before: float | None = None) -> list[Queued]:
        """The oldest messages to send now, in order: never sent, or (with ``resend_before``, a
        :func:`time.time`) sent before it and still not confirmed; ids in ``exclude`` (in flight) left out."""
        cutoff = -1.0 if resend_before is None else resend_before
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, key FROM outbox WHERE (sent IS NULL OR sent < ?) ORDER BY id LIMIT ?",
                (cutoff, limit + len(exclude))).fetchall()
        return [Queued(int(i), str(t), bytes(p), k) for i, t, p, k in rows if int(i) not in exclude][:limit]

    def sent(self, msg_id: int, accepted: bool = True) -> None:
        """The broker answered ``msg_id``. Accepted: a keyed row now waits for its receipt, any other goes.
        Refused (a negative PUBACK): offered again after the receipt timeout, not at once. A row sent
        :data:`MAX_ATTEMPTS` times without a receipt (the server keeps rejecting it) is dropped and counted."""
        with self._lock, self._transaction():
            if accepted:
                self._db.execute("DELETE FROM outbox WHERE id = ? AND key IS NULL", (msg_id,))
            self._db.execute("UPDATE outbox SET sent = ?, attempts = attempts + 1 WHERE id = ?", (time.time(), msg_id))
            gone = self._db.execute("SELECT key FROM outbox WHERE id = ? AND attempts >= ?",
                                    (msg_id, MAX_ATTEMPTS)).fetchall()
            if gone:
                self._db.execute("DELETE FROM outbox WHERE id = ?", (msg_id,))
                self._count_dropped(len(gone))
        for (key,) in gone:
            log.warning("gave up %s: sent %d times without the server confirming it", key or "a report",
                        MAX_ATTEMPTS)

    def give_up(self, key: str) -> int:
        """Forget the window ``key`` without a receipt (the server refused it) and count it as dropped; returns
        how many rows went (0: not queued, e.g. given up already)."""
        with self._lock, self._transaction():
            gone = self._db.execute("DELETE FROM outbox WHERE key = ?", (key,)).rowcount
            if gone:
                self._count_dropped(gone)
        return int(gone)

    def confirm(self, keys: list[str]) -> int:
        """The server stored these windows: forget them. Returns how many rows went."""
        if not keys:
            return 0
        with self._lock, self._transaction():
            before = self._db.total_changes
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                self._db.execute(f"DELETE FROM outbox WHERE key IN ({','.join('?' * len(part))})",  # noqa: S608
                                 part)
            return self._db.total_changes - before

    def resend_all(self) -> None:
        """Offer every sent but unconfirmed row again (after a reconnection: the broker may have lost them)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET sent = NULL WHERE sent IS NOT NULL")

    def awaiting_receipt(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE sent IS NOT NULL").fetchone()[0])

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def take_dropped(self) -> int:
        """Windows dropped since the last call (to report them once)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
            if row and row[0]:
                self._db.execute("UPDATE meta SET value = 0 WHERE key = 'dropped'")
                return int(row[0])
            return 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
