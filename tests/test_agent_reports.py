"""Store-and-forward of reports, and the local HTTP API under bad input."""

from __future__ import annotations

import http.client
import io
import json
import time

import numpy as np
import pytest

from agent.runtime import Agent
from tests._mosquitto import running_broker
from tests.agent_harness import FakeServer, agent_config
from tests.server_helpers import wait_for
from toolchain.data import load_digits

pytestmark = pytest.mark.integration

FP32 = "digits-onnx-fp32"


def test_windows_made_offline_survive_a_restart_and_arrive_exactly_once(digits_bundle, tmp_path):
    with running_broker(persistence=True) as broker:
        password = broker.add_device("pi-1")
        server = FakeServer(broker, digits_bundle.artifacts, persistent=True)
        cfg = agent_config(broker, tmp_path / "data", "pi-1", password, digits_bundle.key.public_key(),
                           window_seconds=3600)
        agent = Agent(cfg, min_backoff=0.2, max_backoff=1.0).start()
        try:
            server.desire("pi-1", 1, digits_bundle.signed, FP32)
            server.wait_running(FP32)
            broker.stop()
            x = load_digits().x[:10]
            for _ in range(100):
                agent.predictor().predict(x)
                agent.close_window_now(wait=10)
            _wait_outbox(agent, 200)
        finally:
            agent.stop()
        # restarted while the broker is still down
        agent = Agent(cfg, min_backoff=0.2, max_backoff=1.0).start()
        try:
            assert len(agent.outbox) == 200
            broker.start()
            server.wait(lambda s: len(s.telemetry) >= 100 and len(s.stats) >= 100, timeout=90,
                        what="100 windows")
            _wait_outbox(agent, 0)
        finally:
            agent.stop()
            server.close()
    # every window arrived, each sent once by the agent (requests == 1); a QoS 1 message may reach a subscriber
    # twice when a PUBACK is lost with a connection (the server stores it once: ingest is idempotent)
    keys = {(t.session, t.window_seq) for t in server.seen.telemetry}
    assert len(keys) == 100 and len({k[0] for k in keys}) == 1
    assert sorted(k[1] for k in keys) == list(range(100))
    assert all(t.requests == 1 for t in server.seen.telemetry)
    assert len({(s.session, s.window_seq) for s in server.seen.stats}) == 100
    assert all(s.n == 10 for s in server.seen.stats)


def _wait_outbox(agent, n, timeout=30.0):
    wait_for(lambda: len(agent.outbox) == n, timeout, f"the outbox to hold {n}", poll=0.05)


def test_outbox_is_bounded_and_counts_what_it_drops(tmp_path):
    from agent.outbox import Outbox

    box = Outbox(tmp_path / "o.sqlite", max_rows=10)
    for i in range(25):
        box.put("t", str(i).encode())
    assert len(box) == 10
    assert [m.payload for m in box.peek(limit=3)] == [b"15", b"16", b"17"]
    assert box.take_dropped() == 15 and box.take_dropped() == 0
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite", max_rows=10)
    assert len(reopened) == 10
    reopened.close()


def test_a_keyed_report_waits_for_its_receipt_and_is_offered_again_until_then(tmp_path):
    from agent.outbox import Outbox, window_key

    box = Outbox(tmp_path / "o.sqlite")
    keys = [window_key("telemetry", 7, i) for i in range(3)]
    for i, key in enumerate(keys):
        box.put("t", str(i).encode(), key)
    box.put("s", b"unkeyed")
    first = box.pending(10)
    assert [m.payload for m in first] == [b"0", b"1", b"2", b"unkeyed"]
    assert [m.id for m in box.pending(10, exclude={first[0].id})] == [m.id for m in first[1:]]
    for m in first:
        box.sent(m.id)  # PUBACKed: the unkeyed row goes, the keyed ones wait for a receipt
    assert len(box) == 3 and box.awaiting_receipt() == 3
    assert box.pending(10) == []  # not offered again before the receipt timeout
    assert [m.payload for m in box.pending(10, resend_before=time.time() + 1)] == [b"0", b"1", b"2"]
    assert box.confirm([keys[1], window_key("telemetry", 7, 99)]) == 1
    box.resend_all()  # a reconnection: everything unconfirmed is offered again
    assert [m.key for m in box.pending(10)] == [keys[0], keys[2]]
    box.close()


def test_an_outbox_from_before_receipts_is_upgraded_and_its_rows_go_on_puback(tmp_path):
    import sqlite3

    from agent.outbox import Outbox

    db = sqlite3.connect(tmp_path / "o.sqlite")
    db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
               "payload BLOB NOT NULL, created REAL NOT NULL)")
    db.execute("INSERT INTO outbox (topic, payload, created) VALUES ('t', x'01', 0)")
    db.commit()
    db.close()
    box = Outbox(tmp_path / "o.sqlite")
    (old,) = box.pending(10)
    assert old.key is None
    box.sent(old.id)
    assert len(box) == 0
    box.close()


def test_windows_the_broker_took_but_never_delivered_are_sent_again(digits_bundle, tmp_path):
    """A PUBACK says the broker has a window, not that the server does: windows published while no server
    was subscribed (the broker acknowledges and drops them, as a broker killed before delivering does) reach
    the server once it is back, because the agent keeps each window until a receipt names it."""
    with running_broker() as broker:
        password = broker.add_device("pi-1")
        server = FakeServer(broker, digits_bundle.artifacts)
        cfg = agent_config(broker, tmp_path / "data", "pi-1", password, digits_bundle.key.public_key(),
                           window_seconds=3600, receipt_timeout_s=2)
        agent = Agent(cfg, min_backoff=0.2, max_backoff=1.0).start()
        try:
            server.desire("pi-1", 1, digits_bundle.signed, FP32)
            server.wait_running(FP32)
            server.close()  # no server subscribed now: the broker acknowledges reports and drops them
            x = load_digits().x[:4]
            for _ in range(5):
                agent.predictor().predict(x)
                agent.close_window_now(wait=10)
            wait_for(lambda: agent.outbox.awaiting_receipt() == 10, 30, "10 reports PUBACKed and unconfirmed",
                     poll=0.05)
            confirmed = agent.reports_confirmed
            back = FakeServer(broker, digits_bundle.artifacts)
            try:
                back.wait(lambda s: len({t.window_seq for t in s.telemetry}) >= 5
                          and len({t.window_seq for t in s.stats}) >= 5, timeout=30, what="the 5 windows again")
                _wait_outbox(agent, 0)
            finally:
                back.close()
        finally:
            agent.stop()
    assert sorted({t.window_seq for t in back.seen.telemetry}) == [0, 1, 2, 3, 4]
    assert all(t.requests == 1 for t in back.seen.telemetry)
    assert agent.reports_confirmed - confirmed == 10


def test_reports_wait_in_memory_while_the_outbox_cannot_be_written(fleet, serving):
    import sqlite3

    server, _ = fleet
    agent = serving
    real_put = agent.outbox.put

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    x = load_digits().x[:4]
    agent.outbox.put = full
    for _ in range(3):
        agent.predictor().predict(x)
        agent.close_window_now(wait=10)
    assert len(agent.reporter.unstored) == 6  # 3 windows of telemetry and statistics, none lost
    agent.outbox.put = real_put  # the disk has room again: the next turn stores and sends them, in order
    server.wait(lambda s: len(s.telemetry) >= 3 and len(s.stats) >= 3, timeout=30, what="the 3 windows")
    wait_for(lambda: not agent.reporter.unstored and len(agent.outbox) == 0, 30, "the outbox to drain", poll=0.05)
    last = server.seen.telemetry[-3:]
    assert [t.window_seq for t in last] == sorted(t.window_seq for t in last)
    assert all(t.requests == 1 for t in last)


@pytest.fixture
def serving(fleet, digits_bundle):
    server, make = fleet
    agent = make()
    server.desire("pi-1", 1, digits_bundle.signed, FP32)
    server.wait_running(FP32)
    return agent


def _request(port, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


BAD = [
    ("wrong shape", "POST", "/v1/predict", json.dumps({"inputs": [[1.0, 2.0, 3.0]]}).encode(),
     {"Content-Type": "application/json"}, 400, "does not match"),
    ("wrong dtype", "POST", "/v1/predict", json.dumps({"inputs": [["a"] * 8] * 8}).encode(),
     {"Content-Type": "application/json"}, 400, "rectangular array of numbers"),
    ("ragged", "POST", "/v1/predict", json.dumps({"inputs": [[1.0], [1.0, 2.0]]}).encode(),
     {"Content-Type": "application/json"}, 400, "rectangular"),
    ("malformed json", "POST", "/v1/predict", b'{"inputs": [1, 2', {"Content-Type": "application/json"}, 400,
     "not valid JSON"),
    ("no inputs key", "POST", "/v1/predict", b'{"x": 1}', {"Content-Type": "application/json"}, 400, '"inputs"'),
    ("string npy", "POST", "/v1/predict", _npy(np.array(["a", "b"])), {"Content-Type": "application/x-npy"}, 400,
     "not numeric"),
    ("garbage npy", "POST", "/v1/predict", b"\x93NUMPY garbage", {"Content-Type": "application/x-npy"}, 400,
     "not a .npy array"),
    ("pickled npy", "POST", "/v1/predict", _npy(np.array([object()], dtype=object)),
     {"Content-Type": "application/x-npy"}, 400, "not a .npy array"),
    # refused on the declared length, before the body is read
    ("oversize", "POST", "/v1/predict", b"{}", {"Content-Type": "application/json",
                                                "Content-Length": str(9 * 1024 * 1024)}, 413, "exceeds the limit"),
    ("content type", "POST", "/v1/predict", b"1,2,3", {"Content-Type": "text/csv"}, 415, "application/json"),
    ("unknown path", "GET", "/v2/whatever", b"", {}, 404, "no such endpoint"),
    ("post elsewhere", "POST", "/v1/health", b"{}", {"Content-Type": "application/json"}, 404, "/v1/predict"),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "headers", "status", "fragment"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_and_the_agent_keeps_serving(serving, name, method, path, body, headers, status,
                                                          fragment):
    port = serving.api.port
    got, text = _request(port, method, path, body, headers)
    assert got == status, text
    message = json.loads(text)["message"]
    assert fragment in message
    if status == 400 and path == "/v1/predict":
        assert "(batch, 1, 8, 8)" in message or "shaped (1, 8, 8)" in message
    ok, text = _request(port, "POST", "/v1/predict", json.dumps({"inputs": np.zeros((1, 8, 8)).tolist()}).encode(),
                        {"Content-Type": "application/json"})
    assert ok == 200, text


def test_health_model_and_metrics(serving):
    port = serving.api.port
    status, text = _request(port, "GET", "/v1/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    status, text = _request(port, "GET", "/v1/model")
    info = json.loads(text)
    assert info["artifact"] == FP32 and info["input_shape"] == [-1, 1, 8, 8] and info["slot"] in ("a", "b")
    _request(port, "POST", "/v1/predict", json.dumps({"inputs": np.zeros((2, 1, 8, 8)).tolist()}).encode(),
             {"Content-Type": "application/json"})
    _request(port, "POST", "/v1/predict", b"[", {"Content-Type": "application/json"})
    status, text = _request(port, "GET", "/metrics")
    assert status == 200
    assert "edgeherd_agent_requests_total 1" in text
    assert "edgeherd_agent_connected 1" in text
    assert 'edgeherd_agent_model_info{model="digits"' in text
    assert 'edgeherd_agent_latency_ms_bucket{le="+Inf"} 1' in text
