"""The registry schema and ingestion, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, SQLModel, select

from protocol import MAX_RECEIPT_WINDOWS, DeviceState, FeatureStats, TelemetryWindow, TopicKind, device_topic, encode
from server.db.models import Device, StatsWindow, TelemetryRow
from server.ingest import Ingestor
from tests.samples import T0, all_messages

pytestmark = pytest.mark.integration

SAMPLES = all_messages()
STATE = next(m for m in SAMPLES if isinstance(m, DeviceState))
TELEMETRY = next(m for m in SAMPLES if isinstance(m, TelemetryWindow))
STATS = next(m for m in SAMPLES if isinstance(m, FeatureStats))


@pytest.fixture
def engine(engine):
    """The migrated database (tests/conftest.py) with two devices in it."""
    with Session(engine) as db:
        db.add(Device(id="pi5-kitchen", profile="raspberry-pi-5"))
        db.add(Device(id="pi5-garage", profile="raspberry-pi-5"))
        db.commit()
    return engine


def test_migrations_match_the_models(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def _ingestor(engine):
    """An ingestor whose clock reads half an hour after the sample messages' times (tests.samples.T0), so
    they are within the times it accepts whatever day the tests run (tests/test_ingest_time.py)."""
    return Ingestor(engine, clock=lambda: T0 + timedelta(minutes=30))


def _topic(kind, device="pi5-kitchen"):
    return device_topic(device, kind)


def _device(engine, device_id="pi5-kitchen"):
    with Session(engine) as db:
        return db.get(Device, device_id)


def test_state_is_order_tolerant(engine):
    ing = _ingestor(engine)
    newer = STATE.model_copy(update={"seq": 7, "status": "online"})
    older = STATE.model_copy(update={"seq": 5, "status": "offline"})
    assert ing.handle(_topic(TopicKind.STATE), encode(newer)) == "ok"
    assert ing.handle(_topic(TopicKind.STATE), encode(older)) == "stale"
    assert ing.handle(_topic(TopicKind.STATE), encode(newer)) == "stale"
    d = _device(engine)
    assert (d.status, d.state_seq) == ("online", 7)
    assert d.running_artifact == STATE.running.artifact and d.install_step == "download"
    # the will of the previous session never overrides a newer session
    will = DeviceState(device_id="pi5-kitchen", status="offline", session=STATE.session - 1, seq=2**31 - 1)
    assert ing.handle(_topic(TopicKind.STATE), encode(will)) == "stale"
    assert _device(engine).status == "online"


def test_an_install_status_about_another_bundle_than_the_desired_one_is_ignored(engine):
    with Session(engine) as db:
        d = db.get(Device, "pi5-kitchen")
        d.desired_manifest = "f" * 64  # what the server wants now; STATE reports an install of another one
        db.add(d)
        db.commit()
    ing = _ingestor(engine)
    assert ing.handle(_topic(TopicKind.STATE), encode(STATE)) == "ok"
    d = _device(engine)
    assert d.running_artifact == STATE.running.artifact and d.install_step is None
    mine = STATE.model_copy(update={"seq": STATE.seq + 1, "install": STATE.install.model_copy(
        update={"manifest_sha256": "f" * 64})})
    assert ing.handle(_topic(TopicKind.STATE), encode(mine)) == "ok"
    assert _device(engine).install_step == "download"


def test_windows_are_stored_once_whatever_the_order(engine):
    ing = _ingestor(engine)
    windows = [TELEMETRY.model_copy(update={"window_seq": i, "start": T0 + timedelta(minutes=i),
                                            "end": T0 + timedelta(minutes=i + 1)}) for i in range(5)]
    for w in [*reversed(windows), *windows]:
        ing.handle(_topic(TopicKind.TELEMETRY), encode(w))
    for _ in range(2):
        ing.handle(_topic(TopicKind.STATS), encode(STATS))
    with Session(engine) as db:
        rows = db.exec(select(TelemetryRow).order_by(TelemetryRow.window_seq)).all()
        stats = db.exec(select(StatsWindow)).all()
    assert [r.window_seq for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].p95_ms == TELEMETRY.latency_ms.p95 and rows[0].requests == 600
    assert len(stats) == 1 and FeatureStats.model_validate_json(stats[0].payload) == STATS
    assert ing.accepted["ok"] == 6 and ing.accepted["duplicate"] == 6


def test_stored_and_duplicate_windows_are_confirmed_and_dropped_ones_are_not(engine):
    ing = _ingestor(engine)
    first = ing.ingest([(_topic(TopicKind.TELEMETRY), encode(TELEMETRY)), (_topic(TopicKind.STATS), encode(STATS))])
    assert first.results == ["ok", "ok"]
    key = (TELEMETRY.session, TELEMETRY.window_seq)
    assert [(r.device_id, r.telemetry, r.stats) for r in first.receipts] == [("pi5-kitchen", [key], [key])]
    # sent again (the agent had no receipt): stored once, confirmed again
    again = ing.ingest([(_topic(TopicKind.TELEMETRY), encode(TELEMETRY)),
                        ("edgeherd/v1/devices/pi5-garage/telemetry", encode(TELEMETRY)),  # impersonation
                        (_topic(TopicKind.STATE), encode(STATE))])
    assert again.results == ["duplicate", "impersonation", "ok"]
    assert [(r.device_id, r.telemetry, r.stats) for r in again.receipts] == [("pi5-kitchen", [key], [])]
    # a receipt names at most MAX_RECEIPT_WINDOWS of each kind; more windows make more receipts
    many = [TELEMETRY.model_copy(update={"window_seq": i}) for i in range(MAX_RECEIPT_WINDOWS + 3)]
    batch = ing.ingest([(_topic(TopicKind.TELEMETRY), encode(w)) for w in many])
    assert [len(r.telemetry) for r in batch.receipts] == [MAX_RECEIPT_WINDOWS, 3]
    assert sorted(k for r in batch.receipts for k in r.telemetry) == [(TELEMETRY.session, i) for i in range(len(many))]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("edgeherd/v1/devices/pi5-kitchen/telemetry", b"\x00\xff garbage", "invalid"),
        ("edgeherd/v1/devices/pi5-kitchen/telemetry", encode(TELEMETRY)[:-7], "invalid"),
        ("edgeherd/v1/devices/pi5-kitchen/telemetry", json.dumps({**json.loads(encode(TELEMETRY)), "x": 1}).encode(),
         "invalid"),
        ("edgeherd/v1/devices/pi5-kitchen/stats", b"[" * 600_000, "invalid"),
        ("edgeherd/v1/devices/pi5-garage/telemetry", encode(TELEMETRY), "impersonation"),
        ("edgeherd/v1/devices/stranger/telemetry", encode(TELEMETRY.model_copy(update={"device_id": "stranger"})),
         "unknown_device"),
        ("edgeherd/v1/devices/pi5-kitchen/desired", b"{}", "not_ingested"),
        ("edgeherd/v2/devices/pi5-kitchen/state", b"{}", "bad_topic"),
    ],
)
def test_bad_messages_are_dropped_and_counted(engine, topic, payload, reason):
    ing = _ingestor(engine)
    assert ing.handle(topic, payload) == reason
    assert ing.dropped[reason] == 1
    with Session(engine) as db:
        assert db.exec(select(TelemetryRow)).all() == []
        assert db.get(Device, "pi5-garage").last_seen is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([TopicKind.STATE, TopicKind.HELLO, TopicKind.TELEMETRY, TopicKind.STATS]),
       payload=st.binary(max_size=300))
def test_random_bytes_never_crash_ingestion(engine, kind, payload):
    assert _ingestor(engine).handle(_topic(kind), payload) == "invalid"


def test_two_batches_with_states_of_one_device_never_write_back_an_older_state(engine):
    """Worker 1 reads the device, then is slow; worker 2 applies newer states meanwhile. Worker 1 must not
    commit its older state over them (before: the final row said seq 7 while the device had reported 9)."""
    import threading
    import time as _time

    ing = _ingestor(engine)
    read = ing._lock_devices
    slow = threading.local()

    def lock_then_dawdle(db, ids, states):
        rows = read(db, ids, states)
        if getattr(slow, "on", False):
            _time.sleep(0.5)
        return rows

    ing._lock_devices = lock_then_dawdle

    def first():
        slow.on = True
        ing.handle(_topic(TopicKind.STATE), encode(STATE.model_copy(update={"seq": 7})))

    t = threading.Thread(target=first)
    t.start()
    _time.sleep(0.1)  # worker 1 has read the row and dawdles
    assert ing.handle(_topic(TopicKind.STATE), encode(STATE.model_copy(update={"seq": 9}))) in ("ok", "stale")
    t.join(10)
    assert _device(engine).state_seq == 9
