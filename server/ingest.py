"""Ingesting what devices publish: idempotent, order-tolerant, and never trusting the payload.

``Ingestor.handle(topic, payload)`` is the whole boundary. A message is
dropped, counted and logged with the device id when its topic is not a
device→server topic, the device is unknown or revoked, the payload is
malformed or oversize, or it claims to come from another device than its
topic's. Otherwise:

- ``state``: applied only if its ``(session, seq)`` is newer than the stored one;
- ``hello``: fingerprint and agent version;
- ``telemetry`` / ``stats``: inserted once per ``(device_id, session, window_seq)``;
  a duplicate changes nothing. Either way the window is named in the
  device's :class:`~protocol.Receipt` (``Ingestor.ingest``), which the server
  publishes once the transaction has committed, so the device can forget it.

Every time a device sends (a window's ``start`` and ``end``, a state's ``ts``)
must lie within :class:`TimeBounds` of the server's clock: at most
``EDGEHERD_CLOCK_SKEW_S`` ahead, at most ``EDGEHERD_REPORT_HORIZON_S`` behind
(:func:`check_times`). A message with a time outside is dropped as
``bad_time`` and answered with a ``bad_time`` :class:`~protocol.ErrorReply`
(``Batch.refused``); a refused window is never named in a receipt, and the
reply names it, so the device gives it up (docs/protocol.md §7).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from protocol import (
    MAX_RECEIPT_WINDOWS,
    ErrorCode,
    ErrorReply,
    InvalidMessage,
    Receipt,
    TopicError,
    TopicKind,
    decode_for_topic,
    parse_device_topic,
)
from protocol.windows import window_request_id
from server.db.models import Device, StatsWindow, TelemetryRow
from server.settings import CLOCK_SKEW, REPORT_HORIZON

__all__ = ["Batch", "Ingestor", "TimeBounds", "check_times", "receipts_for"]

log = logging.getLogger(__name__)
_INGESTED = {TopicKind.STATE, TopicKind.HELLO, TopicKind.TELEMETRY, TopicKind.STATS}
_WINDOWS = {TopicKind.TELEMETRY, TopicKind.STATS}


@dataclass
class Batch:
    """What :meth:`Ingestor.ingest` did with a batch: a result per message, in order, and the receipts to
    send (one or more per device with stored windows)."""

    results: list[str]
    receipts: list[Receipt] = field(default_factory=list)
    #: Devices whose hello this batch stored: their runtimes are known now (see Registry.assign_waiting).
    hellos: list[str] = field(default_factory=list)
    #: (device id, reply) for each message refused for its times, to send on the device's error topic.
    refused: list[tuple[str, ErrorReply]] = field(default_factory=list)


@dataclass(frozen=True)
class TimeBounds:
    """How far the times a device sends may stray from the server's clock: ``ahead`` of it (a clock running
    fast), ``behind`` it (a window the device kept while offline, or a clock that never got set)."""

    ahead: timedelta = timedelta(minutes=5)
    behind: timedelta = timedelta(days=7)

    @classmethod
    def from_settings(cls) -> TimeBounds:
        """``EDGEHERD_CLOCK_SKEW_S`` and ``EDGEHERD_REPORT_HORIZON_S`` (server/settings.py)."""
        return cls(CLOCK_SKEW.read(), REPORT_HORIZON.read())


def _span(d: timedelta) -> str:
    s = abs(d.total_seconds())
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:,.0f} days"


def check_times(msg: Any, now: datetime, bounds: TimeBounds) -> str | None:
    """Why the times in ``msg`` (a decoded device message; every top-level time field) cannot be right by the
    server's clock ``now``, or None when each lies within ``bounds``."""
    for name, value in msg:
        if not isinstance(value, datetime):
            continue
        if value > now + bounds.ahead:
            return (f"{name} {value.isoformat()} is {_span(value - now)} ahead of the server's clock "
                    f"({now.isoformat(timespec='seconds')}), more than the {_span(bounds.ahead)} accepted: "
                    "set the device's clock (NTP)")
        if value < now - bounds.behind:
            return (f"{name} {value.isoformat()} is {_span(now - value)} behind the server's clock "
                    f"({now.isoformat(timespec='seconds')}), more than the {_span(bounds.behind)} accepted: "
                    "set the device's clock (NTP); reports older than that are not stored")
    return None


def _refusal(kind: TopicKind, msg: Any, problem: str) -> ErrorReply:
    """The ``bad_time`` reply to a message refused for its times; a window's names it (protocol.windows)."""
    if kind in (TopicKind.TELEMETRY, TopicKind.STATS):
        name = "telemetry" if kind is TopicKind.TELEMETRY else "stats"
        return ErrorReply(request_id=window_request_id(name, msg.session, msg.window_seq), code=ErrorCode.BAD_TIME,
                          message=f"{name} window [{msg.session}, {msg.window_seq}] refused: {problem}"[:1000])
    return ErrorReply(code=ErrorCode.BAD_TIME, message=f"{kind.value} refused: {problem}"[:1000])


def receipts_for(stored: dict[str, dict[str, list[tuple[int, int]]]]) -> list[Receipt]:
    """Receipts naming each device's stored telemetry and statistics windows (each once, in order), at most
    MAX_RECEIPT_WINDOWS of each kind per receipt."""
    out = []
    for device_id, kinds in stored.items():
        tele, stats = sorted(set(kinds["telemetry"])), sorted(set(kinds["stats"]))
        step = MAX_RECEIPT_WINDOWS
        for i in range(0, max(len(tele), len(stats)), step):
            out.append(Receipt(device_id=device_id, telemetry=tele[i:i + step], stats=stats[i:i + step]))
    return out


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Ingestor:
    def __init__(self, engine: Engine, *, bounds: TimeBounds | None = None,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.engine = engine
        #: The times a device sends must lie within these of ``clock()`` (default: the server settings).
        self.bounds = TimeBounds.from_settings() if bounds is None else bounds
        #: The server's clock: what times are checked against, and when a message counts as received.
        self.clock = clock
        self.accepted: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._lock = threading.Lock()
        #: The insert statement of each window table, built once (see :meth:`_insert_once`).
        self._inserts: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _drop(self, reason: str, device: str | None, detail: str) -> str:
        with self._lock:
            self.dropped[reason] += 1
        log.warning("dropped a message from %s: %s: %s", device or "?", reason, detail[:300])
        return reason

    def _check(self, topic: str, payload: bytes) -> tuple[str, TopicKind, Any] | str:
        """The pure part: (device_id, kind, message), or the reason to drop it."""
        try:
            device_id, kind = parse_device_topic(topic)
        except TopicError as exc:
            return self._drop("bad_topic", None, str(exc))
        if kind not in _INGESTED:
            return self._drop("not_ingested", device_id, kind.value)
        try:
            msg: Any = decode_for_topic(kind, payload)
        except InvalidMessage as exc:
            return self._drop("invalid", device_id, str(exc))
        if msg.device_id != device_id:
            return self._drop("impersonation", device_id, f"payload claims device {msg.device_id!r}")
        return device_id, kind, msg

    def _lock_devices(self, db: Session, ids: set[str], states: set[str]) -> dict[str, Device]:
        """The rows of the batch's devices with a state or hello message in it (``ids``; a window needs no more
        than :meth:`_enrolled`).

        Those with a state message (``states``) are read for update: another worker or replica holding one of
        them waits, and reads what this batch committed, so two batches can never both apply a device's state from
        the same old row (the later-committing one would write back an older ``seq``). PostgreSQL: row locks on the
        devices whose state changes, taken in id order (no deadlocks); SQLite: its write lock, taken before
        reading."""
        if self.engine.dialect.name == "sqlite":
            db.connection().exec_driver_sql("UPDATE devices SET id = id WHERE 1 = 0")
        out: dict[str, Device] = {}
        if states and self.engine.dialect.name != "sqlite":
            q = select(Device).where(col(Device.id).in_(states)).order_by(col(Device.id)).with_for_update()
            out.update({d.id: d for d in db.exec(q).all()})
        rest = ids - set(out)
        if rest:
            out.update({d.id: d for d in db.exec(select(Device).where(col(Device.id).in_(rest))).all()})
        return out

    @staticmethod
    def _enrolled(db: Session, ids: set[str]) -> set[str]:
        """Which of these devices are enrolled and not revoked: all a window's device needs to be."""
        if not ids:
            return set()
        return set(db.exec(select(Device.id).where(col(Device.id).in_(ids), col(Device.revoked).is_(False))).all())

    def _seen(self, db: Session, ids: set[str], now: datetime) -> None:
        """``last_seen = now`` for these devices, in one statement; on PostgreSQL their rows are locked in id
        order first, as a flush of the rows one by one would (no deadlock with another replica's batch)."""
        table = Device.__table__  # type: ignore[attr-defined]
        locked = select(table.c.id).where(table.c.id.in_(sorted(ids))).order_by(table.c.id).with_for_update()
        db.connection().execute(update(table).where(table.c.id.in_(locked.scalar_subquery())).values(last_seen=now))

    def handle(self, topic: str, payload: bytes) -> str:
        """Ingest one message; returns "ok", "duplicate", "stale" or the reason it was dropped."""
        return self.handle_batch([(topic, payload)])[0]

    def handle_batch(self, messages: list[tuple[str, bytes]]) -> list[str]:
        """Ingest several messages in one transaction (results in order)."""
        return self.ingest(messages).results

    def ingest(self, messages: list[tuple[str, bytes]]) -> Batch:
        """Ingest several messages in one transaction; the results in order, and the receipts and the
        ``bad_time`` replies to send once it has committed."""
        results: list[str] = []
        stored: dict[str, dict[str, list[tuple[int, int]]]] = {}
        checked = [self._check(t, p) for t, p in messages]
        refused: list[tuple[str, ErrorReply]] = []
        now = self.clock()
        with Session(self.engine) as db:
            wanted = {item[0] for item in checked if not isinstance(item, str)}
            states = {item[0] for item in checked if not isinstance(item, str) and item[1] is TopicKind.STATE}
            full = {item[0] for item in checked if not isinstance(item, str) and item[1] not in _WINDOWS}
            devices = self._lock_devices(db, full, states) if wanted else {}
            enrolled = self._enrolled(db, wanted - full)
            heard: set[str] = set()  # enrolled devices without a row read: last_seen set in one statement
            windows: dict[Any, list[tuple[int, dict[str, Any]]]] = {TelemetryRow: [], StatsWindow: []}
            for item, (_, payload) in zip(checked, messages, strict=True):
                if isinstance(item, str):
                    results.append(item)
                    continue
                device_id, kind, msg = item
                device = devices.get(device_id)
                if not (device_id in enrolled if device is None else not device.revoked):
                    results.append(self._drop("unknown_device", device_id, "not enrolled or revoked"))
                    continue
                if device is None:  # a window: its device's row is not needed
                    heard.add(device_id)
                else:
                    device.last_seen = now  # heard from, even when what it said is refused below
                problem = check_times(msg, now, self.bounds)
                if problem is not None:
                    results.append(self._drop("bad_time", device_id, f"{kind.value}: {problem}"))
                    refused.append((device_id, _refusal(kind, msg, problem)))
                    continue
                if kind is TopicKind.TELEMETRY:
                    windows[TelemetryRow].append((len(results), _telemetry_row(msg, now)))
                    results.append("pending")
                elif kind is TopicKind.STATS:
                    windows[StatsWindow].append((len(results), _stats_row(msg, payload, now)))
                    results.append("pending")
                else:
                    assert device is not None  # noqa: S101 - read for every state and hello (``full``)
                    results.append(self._apply(db, device, kind, msg))
            for device in devices.values():
                db.add(device)
            if heard:
                self._seen(db, heard, now)
            for table, rows in windows.items():
                if rows:
                    inserted = self._insert_once(db, table, [r for _, r in rows])
                    name = "telemetry" if table is TelemetryRow else "stats"
                    for pos, row in rows:
                        key = (row["device_id"], row["session"], row["window_seq"])
                        results[pos] = "ok" if key in inserted else "duplicate"
                        stored.setdefault(key[0], {"telemetry": [], "stats": []})[name].append(key[1:])
            db.commit()
        with self._lock:
            for r in results:
                if r in ("ok", "duplicate", "stale"):
                    self.accepted[r] += 1
        hellos = sorted({item[0] for item, r in zip(checked, results, strict=True)
                         if not isinstance(item, str) and item[1] is TopicKind.HELLO and r == "ok"})
        return Batch(results, receipts_for(stored), hellos, refused)

    def _apply(self, db: Session, device: Device, kind: TopicKind, msg: Any) -> str:
        """State and hello: update the device row."""
        if kind is TopicKind.STATE:
            if (msg.session, msg.seq) <= (device.state_session, device.state_seq):
                return "stale"
            device.state_session, device.state_seq = msg.session, msg.seq
            device.status = msg.status
            if msg.agent_version:
                device.agent_version = msg.agent_version
            if msg.running is not None:
                device.running_manifest, device.running_artifact = msg.running.manifest_sha256, msg.running.artifact
            elif msg.status == "online":
                device.running_manifest = device.running_artifact = None
            if msg.install is not None and device.desired_manifest in (None, msg.install.manifest_sha256):
                # an install status about another bundle than the one now desired is old news: a rollout
                # must not read a failure of last week's install as a failure of this one
                device.install_step, device.install_error = msg.install.step.value, msg.install.error
            if msg.keyset_serial is not None:  # its confirmation of a key rotation (server/signing_keys.py)
                device.keyset_serial = msg.keyset_serial
            if msg.agent_update is not None:  # how its agent update went (server/agent_releases.py)
                device.agent_update = msg.agent_update.model_dump(mode="json", exclude_none=True)
            db.add(device)
            return "ok"
        device.fingerprint = msg.fingerprint.model_dump(mode="json", exclude_none=True)
        device.agent_version = msg.agent_version
        return "ok"

    def _insert_once(self, db: Session, table: Any, rows: list[dict[str, Any]]) -> set[tuple[str, int, int]]:
        """Insert the rows that are not stored yet, in one statement of a fixed shape (compiled and parsed once
        per table, not once per batch as a ``VALUES`` list as long as each batch would be); returns the keys
        inserted. ``ON CONFLICT DO NOTHING RETURNING key``: a row whose key is stored already is not returned.

        PostgreSQL: ``INSERT … SELECT FROM unnest(column arrays)``, one array parameter per column. SQLite: the
        same ``INSERT`` run over the rows (SQLAlchemy batches them into multi-row statements)."""
        unique: dict[tuple[str, int, int], dict[str, Any]] = {}
        for row in rows:
            unique.setdefault((row["device_id"], row["session"], row["window_seq"]), row)
        values = list(unique.values())
        columns = tuple(values[0])
        if self.engine.dialect.name == "postgresql":
            arrays = {c: [v[c] for v in values] for c in columns}
            result = db.connection().execute(self._insert_statement(table, columns), arrays)
        else:
            result = db.connection().execute(self._insert_statement(table, columns), values)
        return {(str(d), int(s), int(w)) for d, s, w in result.all()}

    def _insert_statement(self, table: Any, columns: tuple[str, ...]) -> Any:
        stmt = self._inserts.get((table, columns))
        if stmt is not None:
            return stmt
        t = table.__table__
        dialect = self.engine.dialect
        if dialect.name == "postgresql":
            q = dialect.identifier_preparer.quote
            arrays = ", ".join(f"CAST(:{c} AS {t.c[c].type.compile(dialect=dialect)}[])" for c in columns)
            # names and types from the table's own metadata, for the columns of our row dicts; no value in the SQL
            stmt = text(f"INSERT INTO {q(t.name)} ({', '.join(q(c) for c in columns)}) "  # noqa: S608
                        f"SELECT * FROM unnest({arrays}) ON CONFLICT (device_id, session, window_seq) DO NOTHING "
                        "RETURNING device_id, session, window_seq")
        else:
            stmt = sqlite_insert(t).on_conflict_do_nothing(index_elements=["device_id", "session", "window_seq"]
                                                           ).returning(t.c.device_id, t.c.session, t.c.window_seq)
        self._inserts[(table, columns)] = stmt
        return stmt


def _telemetry_row(msg: Any, now: datetime) -> dict[str, Any]:
    lat = msg.latency_ms
    return {"device_id": msg.device_id, "session": msg.session, "window_seq": msg.window_seq, "start": msg.start,
            "end": msg.end, "manifest_sha256": msg.manifest_sha256, "requests": msg.requests, "errors": msg.errors,
            "p50_ms": lat.p50 if lat else None, "p95_ms": lat.p95 if lat else None,
            "p99_ms": lat.p99 if lat else None, "dropped_windows": msg.dropped_windows, "received_at": now}


def _stats_row(msg: Any, payload: bytes, now: datetime) -> dict[str, Any]:
    return {"device_id": msg.device_id, "session": msg.session, "window_seq": msg.window_seq,
            "manifest_sha256": msg.manifest_sha256, "end": msg.end, "n": msg.n, "payload": bytes(payload),
            "received_at": now}
