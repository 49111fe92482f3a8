"""Ingesting what devices publish: idempotent, order-tolerant, and never trusting the payload.

``Ingestor.handle(topic, payload)`` is the whole boundary. A message is
dropped, counted and logged with the device id when its topic is not a
device→server topic, the device is unknown or revoked, the payload is
malformed or oversize, or it claims to come from another device than its
topic's. Otherwise:

- ``state``: applied only if its ``(session, seq)`` is newer than the stored one;
- ``hello``: fingerprint and agent version;
- ``telemetry`` / ``stats``: inserted once per ``(device_id, session, window_seq)``;
  a duplicate changes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session

from protocol import InvalidMessage, TopicError, TopicKind, decode_for_topic, parse_device_topic
from server.db.models import Device, StatsWindow, TelemetryRow

__all__ = ["Ingestor"]

log = logging.getLogger(__name__)
_INGESTED = {TopicKind.STATE, TopicKind.HELLO, TopicKind.TELEMETRY, TopicKind.STATS}


class Ingestor:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.accepted: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _drop(self, reason: str, device: str | None, detail: str) -> str:
        with self._lock:
            self.dropped[reason] += 1
        log.warning("dropped a message from %s: %s: %s", device or "?", reason, detail[:300])
        return reason

    def handle(self, topic: str, payload: bytes) -> str:
        """Ingest one message; returns "ok", "duplicate", "stale" or the reason it was dropped."""
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
        with Session(self.engine) as db:
            device = db.get(Device, device_id)
            if device is None or device.revoked:
                return self._drop("unknown_device", device_id, "not enrolled or revoked")
            result = self._apply(db, device, kind, msg, payload)
            db.commit()
        with self._lock:
            self.accepted[result] += 1
        return result

    def _apply(self, db: Session, device: Device, kind: TopicKind, msg: Any, payload: bytes) -> str:
        now = datetime.now(timezone.utc)
        if kind is TopicKind.STATE:
            if (msg.session, msg.seq) <= (device.state_session, device.state_seq):
                return "stale"
            device.state_session, device.state_seq = msg.session, msg.seq
            device.status = msg.status
            device.last_seen = now
            if msg.agent_version:
                device.agent_version = msg.agent_version
            if msg.running is not None:
                device.running_manifest, device.running_artifact = msg.running.manifest_sha256, msg.running.artifact
            elif msg.status == "online":
                device.running_manifest = device.running_artifact = None
            if msg.install is not None:
                device.install_step, device.install_error = msg.install.step.value, msg.install.error
            db.add(device)
            return "ok"
        if kind is TopicKind.HELLO:
            device.fingerprint = msg.fingerprint.model_dump(mode="json", exclude_none=True)
            device.agent_version = msg.agent_version
            device.last_seen = now
            db.add(device)
            return "ok"
        device.last_seen = now
        db.add(device)
        if kind is TopicKind.TELEMETRY:
            lat = msg.latency_ms
            row = {"device_id": msg.device_id, "session": msg.session, "window_seq": msg.window_seq,
                   "start": msg.start, "end": msg.end, "manifest_sha256": msg.manifest_sha256,
                   "requests": msg.requests, "errors": msg.errors, "p50_ms": lat.p50 if lat else None,
                   "p95_ms": lat.p95 if lat else None, "p99_ms": lat.p99 if lat else None,
                   "dropped_windows": msg.dropped_windows, "received_at": now}
            return self._insert_once(db, TelemetryRow, row)
        row = {"device_id": msg.device_id, "session": msg.session, "window_seq": msg.window_seq,
               "manifest_sha256": msg.manifest_sha256, "end": msg.end, "n": msg.n, "payload": bytes(payload),
               "received_at": now}
        return self._insert_once(db, StatsWindow, row)

    def _insert_once(self, db: Session, table: Any, row: dict[str, Any]) -> str:
        dialect = self.engine.dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        stmt = insert(table).values(**row).on_conflict_do_nothing(
            index_elements=["device_id", "session", "window_seq"]).returning(table.window_seq)
        inserted = db.execute(stmt).first()
        return "ok" if inserted is not None else "duplicate"
