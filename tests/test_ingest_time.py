"""Times a device sends are bounded by the server's clock: a window dated 9999-12-31 or 1970 is refused,
counted, answered with a ``bad_time`` error reply naming it, never stored nor confirmed; and the agent gives a
window so refused up instead of sending it again."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlmodel import Session, select

from protocol import (
    DeviceState,
    ErrorCode,
    ErrorReply,
    FeatureStats,
    Hello,
    Receipt,
    TelemetryWindow,
    TopicKind,
    decode,
    device_topic,
    encode,
)
from protocol.windows import window_from_request_id, window_request_id
from server.db.models import Device, StatsWindow, TelemetryRow
from server.ingest import Ingestor, TimeBounds, check_times
from server.settings import CLOCK_SKEW, REPORT_HORIZON, STALE_AFTER, SettingError
from tests.samples import all_messages

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
FAR_FUTURE = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SAMPLES = all_messages()
STATE = next(m for m in SAMPLES if isinstance(m, DeviceState))
HELLO = next(m for m in SAMPLES if isinstance(m, Hello))
TELEMETRY = next(m for m in SAMPLES if isinstance(m, TelemetryWindow))
STATS = next(m for m in SAMPLES if isinstance(m, FeatureStats))


def _window(msg, start, end=None, seq=42):
    return msg.model_copy(update={"start": start, "end": end or start, "window_seq": seq, "device_id": "pi-1"})


# -- the pure check --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("msg", "problem"), [
    (_window(TELEMETRY, NOW - timedelta(minutes=1), NOW), None),
    (_window(TELEMETRY, NOW, NOW + timedelta(minutes=4)), None),  # a clock a little fast: within the skew
    (_window(STATS, NOW - timedelta(days=6), NOW - timedelta(days=6) + timedelta(minutes=1)), None),  # kept offline
    (_window(TELEMETRY, NOW, NOW + timedelta(minutes=6)), "end 2026-12-05T12:06:00+00:00 is 6 min ahead"),
    (_window(TELEMETRY, NOW, FAR_FUTURE), "end 9999-12-31T23:59:59+00:00 is 2,912,104 days ahead"),
    (_window(STATS, FAR_FUTURE), "start 9999-12-31T23:59:59+00:00 is 2,912,104 days ahead"),
    (_window(TELEMETRY, EPOCH, NOW), "start 1970-01-01T00:00:00+00:00 is 20,792 days behind"),
    (_window(STATS, EPOCH), "start 1970-01-01T00:00:00+00:00 is 20,792 days behind"),
    (_window(TELEMETRY, NOW - timedelta(days=8), NOW - timedelta(days=8)), "is 8 days behind"),
    (STATE.model_copy(update={"ts": NOW}), None),
    (STATE.model_copy(update={"ts": None}), None),  # the last will carries no time
    (STATE.model_copy(update={"ts": FAR_FUTURE}), "ts 9999-12-31T23:59:59+00:00 is 2,912,104 days ahead"),
    (STATE.model_copy(update={"ts": EPOCH}), "ts 1970-01-01T00:00:00+00:00 is 20,792 days behind"),
    (HELLO, None),  # no times
])
def test_every_time_a_device_sends_is_bounded_by_the_servers_clock(msg, problem):
    got = check_times(msg, NOW, TimeBounds())
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got and "set the device's clock (NTP)" in got


@pytest.mark.parametrize(("bounds", "offset", "refused"), [
    (TimeBounds(ahead=timedelta(0)), timedelta(seconds=1), True),
    (TimeBounds(ahead=timedelta(0)), timedelta(0), False),
    (TimeBounds(ahead=timedelta(hours=2)), timedelta(hours=1), False),
    (TimeBounds(behind=timedelta(hours=1)), -timedelta(minutes=61), True),
    (TimeBounds(behind=timedelta(hours=1)), -timedelta(minutes=60), False),
])
def test_the_bounds_are_inclusive_and_configurable(bounds, offset, refused):
    assert (check_times(_window(TELEMETRY, NOW + offset), NOW, bounds) is not None) is refused


@pytest.mark.parametrize(("setting", "value", "expected"), [
    (CLOCK_SKEW, None, timedelta(minutes=5)),
    (REPORT_HORIZON, None, timedelta(days=7)),
    (STALE_AFTER, None, timedelta(minutes=3)),
    (CLOCK_SKEW, "60", timedelta(minutes=1)),
    (REPORT_HORIZON, " 86400 ", timedelta(days=1)),
    (STALE_AFTER, "2.5", timedelta(seconds=2.5)),
    (CLOCK_SKEW, "", timedelta(minutes=5)),
    (CLOCK_SKEW, "five minutes", "EDGEHERD_CLOCK_SKEW_S='five minutes': give a number of seconds"),
    (CLOCK_SKEW, "-1", "EDGEHERD_CLOCK_SKEW_S='-1': give between 0 and 86400 seconds"),
    (REPORT_HORIZON, "60", "EDGEHERD_REPORT_HORIZON_S='60': give between 3600 and"),
    (STALE_AFTER, "nan", "EDGEHERD_STALE_AFTER_S='nan': give between 1 and"),
    (STALE_AFTER, "inf", "EDGEHERD_STALE_AFTER_S='inf'"),
])
def test_settings_read_from_the_environment_refuse_what_they_do_not_take(setting, value, expected):
    env = {} if value is None else {setting.env: value}
    if isinstance(expected, timedelta):
        assert setting.read(env) == expected
    else:
        with pytest.raises(SettingError, match=expected.replace("(", r"\(")):
            setting.read(env)


@given(kind=st.sampled_from(["telemetry", "stats"]), session=st.integers(0, 2**53),
       window_seq=st.integers(0, 2**53))
def test_a_window_named_in_a_request_id_reads_back(kind, session, window_seq):
    request_id = window_request_id(kind, session, window_seq)
    ErrorReply(request_id=request_id, code=ErrorCode.BAD_TIME, message="x")  # a valid request id
    assert window_from_request_id(request_id) == (kind, session, window_seq)


@pytest.mark.parametrize("request_id", [
    "0f1e2d3c4b5a69788796a5b4c3d2e1f0",  # a chunk request's uuid4
    "0003" + "0" * 28,  # no such kind
    "0001" + "f" * 28,  # beyond 2**53
    "0001" + "0" * 27,  # too short
])
def test_other_request_ids_name_no_window(request_id):
    assert window_from_request_id(request_id) is None


# -- the ingestor, on a real database ----------------------------------------------------------------------------


@pytest.fixture
def db_url(sqlite_url):
    return sqlite_url


@pytest.fixture
def engine(engine):
    """The migrated database (tests/conftest.py, SQLite only here) with one device in it."""
    with Session(engine) as db:
        db.add(Device(id="pi-1", profile="x86-64-cpu"))
        db.commit()
    return engine


def test_badly_dated_windows_are_refused_counted_answered_and_never_confirmed(engine):
    ing = Ingestor(engine, clock=lambda: NOW)
    good = _window(TELEMETRY, NOW - timedelta(minutes=1), NOW + timedelta(minutes=2), seq=1)  # within the skew
    batch = ing.ingest([
        (device_topic("pi-1", TopicKind.TELEMETRY), encode(_window(TELEMETRY, NOW, FAR_FUTURE, seq=2))),
        (device_topic("pi-1", TopicKind.STATS), encode(_window(STATS, EPOCH, seq=3))),
        (device_topic("pi-1", TopicKind.TELEMETRY), encode(good)),
        (device_topic("pi-1", TopicKind.STATE), encode(STATE.model_copy(update={"device_id": "pi-1", "ts": EPOCH}))),
    ])
    assert batch.results == ["bad_time", "bad_time", "ok", "bad_time"]
    assert ing.dropped["bad_time"] == 3
    assert [(r.telemetry, r.stats) for r in batch.receipts] == [([(good.session, 1)], [])]
    replies = {reply.request_id: reply for device, reply in batch.refused if device == "pi-1"}
    assert len(batch.refused) == 3 and all(r.code is ErrorCode.BAD_TIME for r in replies.values())
    assert "9999-12-31" in replies[window_request_id("telemetry", TELEMETRY.session, 2)].message
    assert "1970-01-01" in replies[window_request_id("stats", STATS.session, 3)].message
    assert replies[None].message.startswith("state refused: ts 1970-01-01")  # a state has no window to name
    with Session(engine) as db:
        assert [r.window_seq for r in db.exec(select(TelemetryRow)).all()] == [1]
        assert db.exec(select(StatsWindow)).all() == []
        device = db.get(Device, "pi-1")
        assert device.status == "unknown" and device.last_seen is not None  # heard from, state not applied


# -- end to end: a real server and broker ---------------------------------------------------------------------


@pytest.mark.integration
def test_a_real_server_refuses_badly_dated_windows_with_an_error_reply_and_a_counter(tmp_path):
    from server.app import ServerApp
    from tests.mqtt_helpers import TestClient
    from tests.server_helpers import server_dir, wait_for
    from tests.tls_device_helpers import device_tls, listeners, reachable

    data, _ = server_dir(reachable(tmp_path) / "data")
    app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
    device = None
    try:
        creds = app.registry.add_devices_bulk(["pi-1"], "x86-64-cpu")["pi-1"]
        device = TestClient(listeners(app.registry.broker), "pi-1",  # type: ignore[arg-type]
                            device_tls("pi-1", creds, tmp_path / "device"))
        device.subscribe(device_topic("pi-1", TopicKind.ERROR))
        device.subscribe(device_topic("pi-1", TopicKind.RECEIPT))
        now = datetime.now(timezone.utc)
        sent = {
            ("telemetry", 1): _window(TELEMETRY, now, FAR_FUTURE, seq=1),
            ("stats", 2): _window(STATS, FAR_FUTURE, seq=2),
            ("telemetry", 3): _window(TELEMETRY, EPOCH, now, seq=3),
            ("stats", 4): _window(STATS, EPOCH, seq=4),
            ("telemetry", 5): _window(TELEMETRY, now - timedelta(minutes=1), now + timedelta(minutes=1), seq=5),
        }
        for (kind, _), msg in sent.items():
            topic = device_topic("pi-1", TopicKind.TELEMETRY if kind == "telemetry" else TopicKind.STATS)
            assert not device.publish(topic, encode(msg)).is_failure
        refused: set[tuple[str, int, int]] = set()
        receipts: list[Receipt] = []

        def answered():
            for m in device.drain(0.2):
                if m.topic.endswith("/error"):
                    reply = decode(ErrorReply, m.payload)
                    assert reply.code is ErrorCode.BAD_TIME and "set the device's clock" in reply.message
                    refused.add(window_from_request_id(reply.request_id))
                else:
                    receipts.append(decode(Receipt, m.payload))
            return len(refused) == 4 and receipts

        wait_for(answered, 30, "four bad_time replies and a receipt")
        assert refused == {(kind, TELEMETRY.session, seq) for kind, seq in list(sent)[:4]}
        assert [(r.telemetry, r.stats) for r in receipts] == [([(TELEMETRY.session, 5)], [])]
        assert 'edgeherd_server_dropped_total{reason="bad_time"} 4' in app.metrics_text()
        with Session(app.registry.engine) as db:
            assert [r.window_seq for r in db.exec(select(TelemetryRow)).all()] == [5]
            assert db.exec(select(StatsWindow)).all() == []
    finally:
        if device is not None:
            device.close()
        app.stop()


@pytest.mark.integration
def test_the_agent_gives_up_a_window_the_server_refused_and_says_so(fleet, digits_bundle, caplog):
    from tests.server_helpers import wait_for
    from toolchain.data import load_digits

    server, make = fleet
    agent = make()
    server.desire("pi-1", 1, digits_bundle.signed, "digits-onnx-fp32")
    server.wait_running("digits-onnx-fp32")
    server.confirming = False  # no receipts: only the refusal can make the agent let go
    agent.predictor().predict(load_digits().x[:4])
    with caplog.at_level(logging.WARNING, logger="agent"):
        agent.close_window_now(wait=10)
        window = server.wait(lambda s: s.telemetry and s.stats and s.telemetry[-1], 30, "the window")
        wait_for(lambda: agent.outbox.awaiting_receipt() == 2, 30, "both reports sent", poll=0.05)
        for kind in ("telemetry", "stats"):
            reply = ErrorReply(request_id=window_request_id(kind, window.session, window.window_seq),
                               code=ErrorCode.BAD_TIME, message=f"{kind} window refused: end is 9 days behind")
            server.client.publish(device_topic("pi-1", TopicKind.ERROR), encode(reply), qos=1)
        wait_for(lambda: len(agent.outbox) == 0, 30, "the refused windows to be given up", poll=0.05)
        # the outbox lets go of a window just before the agent logs it: wait for both lines, not only the outbox
        wait_for(lambda: sum(r.getMessage().startswith("gave up") for r in caplog.records) >= 2, 10,
                 "both windows' 'gave up' lines", poll=0.05)
    given_up = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gave up")]
    assert sorted(given_up) == [
        f"gave up stats:{window.session}:{window.window_seq}: the server refused it: stats window refused: end is "
        "9 days behind",
        f"gave up telemetry:{window.session}:{window.window_seq}: the server refused it: telemetry window refused: "
        "end is 9 days behind"]
    assert agent.outbox.take_dropped() == 2  # reported in the next window's dropped_windows
