"""A batch of windows is inserted with one statement per table (server/ingest.py, ``Ingestor._insert_once``) and
its devices' ``last_seen`` set with one more; on SQLite and PostgreSQL alike, every window is stored exactly once
(a duplicate in the same batch, or of a window stored by an earlier batch, changes nothing and is confirmed again),
every stored column is what the device sent, and windows from unknown or revoked devices are dropped."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import Session, select

from protocol import (
    DeviceState,
    FeatureStats,
    FeatureWindow,
    LatencySummary,
    TelemetryWindow,
    TopicKind,
    device_topic,
    encode,
)
from server.db.models import Device, StatsWindow, TelemetryRow
from server.ingest import Ingestor

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
SHA = "ab" * 32


@pytest.fixture
def engine(engine):
    with Session(engine) as db:
        for name in ("pi-1", "pi-2", "pi-3"):
            db.add(Device(id=name, profile="x86-64-cpu"))
        db.add(Device(id="pi-revoked", profile="x86-64-cpu", revoked=True))
        db.commit()
    return engine


def _tele(device: str, seq: int, *, latency: bool = True, session: int = 7) -> tuple[str, bytes]:
    end = NOW - timedelta(seconds=60 - seq)
    msg = TelemetryWindow(device_id=device, session=session, window_seq=seq, start=end - timedelta(seconds=1),
                          end=end, requests=10 + seq, errors=seq % 3, manifest_sha256=SHA if latency else None,
                          latency_ms=LatencySummary(p50=1.5, p95=2.5, p99=3.5, max=4.0, mean=2.0) if latency
                          else None, dropped_windows=seq)
    return device_topic(device, TopicKind.TELEMETRY), encode(msg)


def _stats(device: str, seq: int, session: int = 7) -> tuple[str, bytes]:
    end = NOW - timedelta(seconds=60 - seq)
    msg = FeatureStats(device_id=device, session=session, window_seq=seq, start=end - timedelta(seconds=1), end=end,
                       manifest_sha256=SHA, n=4, features=[FeatureWindow(name="x", counts=[1, 2, 1])])
    return device_topic(device, TopicKind.STATS), encode(msg)


def _keys(engine, table):
    with Session(engine) as db:
        return sorted((r.device_id, r.session, r.window_seq) for r in db.exec(select(table)).all())


def test_duplicates_in_a_batch_and_across_batches_are_stored_once_and_confirmed_again(engine):
    ing = Ingestor(engine, clock=lambda: NOW)
    first = ing.ingest([_tele("pi-1", 1), _stats("pi-1", 1), _tele("pi-2", 1)])
    assert first.results == ["ok", "ok", "ok"]
    batch = [_tele("pi-1", 1), _tele("pi-1", 2), _tele("pi-1", 2), _stats("pi-1", 1), _stats("pi-1", 2),
             _tele("pi-2", 2), _tele("pi-2", 1)]
    second = ing.ingest(batch)
    # the second copy of (pi-1, 7, 2) in the batch counts as a duplicate of the first, which this batch stored
    assert second.results == ["duplicate", "ok", "ok", "duplicate", "ok", "ok", "duplicate"]
    assert _keys(engine, TelemetryRow) == [("pi-1", 7, 1), ("pi-1", 7, 2), ("pi-2", 7, 1), ("pi-2", 7, 2)]
    assert _keys(engine, StatsWindow) == [("pi-1", 7, 1), ("pi-1", 7, 2)]
    receipts = {r.device_id: r for r in second.receipts}
    assert receipts["pi-1"].telemetry == [(7, 1), (7, 2)] and receipts["pi-1"].stats == [(7, 1), (7, 2)]
    assert receipts["pi-2"].telemetry == [(7, 1), (7, 2)] and receipts["pi-2"].stats == []
    assert ing.accepted == {"ok": 7, "duplicate": 3}


def test_every_column_is_stored_as_sent_nulls_included(engine):
    ing = Ingestor(engine, clock=lambda: NOW)
    # a batch whose windows all lack a latency summary: every p50/p95/p99 and manifest value is NULL
    assert ing.ingest([_tele("pi-3", 1, latency=False), _tele("pi-3", 2, latency=False)]).results == ["ok", "ok"]
    batch = [_tele("pi-1", 3), _tele("pi-1", 4, latency=False), _stats("pi-1", 3)]
    assert ing.ingest(batch).results == ["ok", "ok", "ok"]
    with Session(engine) as db:
        rows = {(r.device_id, r.window_seq): r for r in db.exec(select(TelemetryRow)).all()}
        stats = db.exec(select(StatsWindow)).one()
    full, bare = rows[("pi-1", 3)], rows[("pi-1", 4)]
    assert (full.requests, full.errors, full.dropped_windows, full.manifest_sha256) == (13, 0, 3, SHA)
    assert (full.p50_ms, full.p95_ms, full.p99_ms) == (1.5, 2.5, 3.5)
    assert full.end.replace(tzinfo=timezone.utc) == NOW - timedelta(seconds=57)
    assert full.received_at.replace(tzinfo=timezone.utc) == NOW
    assert (bare.p50_ms, bare.p95_ms, bare.p99_ms, bare.manifest_sha256) == (None, None, None, None)
    assert rows[("pi-3", 2)].p95_ms is None and rows[("pi-3", 2)].requests == 12
    assert stats.payload == _stats("pi-1", 3)[1] and (stats.n, stats.scored) == (4, False)


def test_windows_of_unknown_or_revoked_devices_are_dropped_and_last_seen_set_for_the_rest(engine):
    ing = Ingestor(engine, clock=lambda: NOW)
    state = DeviceState(device_id="pi-2", status="online", session=7, seq=1, ts=NOW)
    batch = [_tele("pi-1", 1), (device_topic("pi-2", TopicKind.STATE), encode(state)), _tele("pi-2", 1),
             _tele("pi-revoked", 1), _stats("pi-nobody", 1)]
    assert ing.ingest(batch).results == ["ok", "ok", "ok", "unknown_device", "unknown_device"]
    assert _keys(engine, TelemetryRow) == [("pi-1", 7, 1), ("pi-2", 7, 1)]
    assert _keys(engine, StatsWindow) == []
    with Session(engine) as db:
        seen = {d.id: d.last_seen for d in db.exec(select(Device)).all()}
        status = db.get(Device, "pi-2").status
    assert {k: v and v.replace(tzinfo=timezone.utc) for k, v in seen.items()} == {
        "pi-1": NOW, "pi-2": NOW, "pi-3": None, "pi-revoked": None}
    assert status == "online"
    assert ing.dropped["unknown_device"] == 2


def test_receipts_of_a_draining_backlog_go_out_one_per_device():
    """While a backlog drains, the windows of a device stored over several batches are named in one receipt
    (split at the protocol's limit per kind), each window once."""
    from protocol import MAX_RECEIPT_WINDOWS, Receipt
    from server.app import _ReceiptBuffer

    buffer = _ReceiptBuffer()
    assert not buffer
    for seq in range(MAX_RECEIPT_WINDOWS + 10):  # one window per batch, as an interleaved backlog gives them
        buffer.add([Receipt(device_id="dev-a", telemetry=[(1, seq)], stats=[(1, seq)] if seq < 3 else []),
                    Receipt(device_id="dev-b", telemetry=[(2, seq % 4)])])  # dev-b's windows repeat: duplicates
    assert buffer and buffer.age() >= 0
    sent = buffer.take()
    assert not buffer
    by_device: dict[str, list[Receipt]] = {}
    for r in sent:
        by_device.setdefault(r.device_id, []).append(r)
    assert [len(r.telemetry) for r in by_device["dev-a"]] == [MAX_RECEIPT_WINDOWS, 10]
    assert [w for r in by_device["dev-a"] for w in r.telemetry] == [(1, s) for s in range(MAX_RECEIPT_WINDOWS + 10)]
    assert [w for r in by_device["dev-a"] for w in r.stats] == [(1, 0), (1, 1), (1, 2)]
    assert len(by_device["dev-b"]) == 1 and by_device["dev-b"][0].telemetry == [(2, 0), (2, 1), (2, 2), (2, 3)]
