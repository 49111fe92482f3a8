"""Store-and-forward queue for telemetry and statistics, in SQLite.

Every report is appended here first and deleted only when the broker has
acknowledged it (PUBACK), so windows produced while offline, or before a
restart, are sent in order once the device is back. The queue is bounded:
when full, the oldest rows are dropped and the drop is counted, and the
count is reported in the next telemetry window.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Outbox", "Queued"]


@dataclass(frozen=True)
class Queued:
    id: int
    topic: str
    payload: bytes


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

    def put(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO outbox (topic, payload, created) VALUES (?, ?, ?)",
                                 (topic, payload, time.time()))
                (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                excess = count - self.max_rows
                if excess > 0:
                    self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                                     (excess,))
                    self._db.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) ON CONFLICT(key) DO "
                                     "UPDATE SET value = value + excluded.value", (excess,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def peek(self, limit: int = 100, after: int = 0) -> list[Queued]:
        """The oldest queued messages with id > ``after``, in order."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (after, limit)).fetchall()
        return [Queued(int(i), str(t), bytes(p)) for i, t, p in rows]

    def ack(self, msg_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (msg_id,))

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
