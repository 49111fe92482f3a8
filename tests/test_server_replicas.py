"""Two server replicas on one PostgreSQL and one broker split the device traffic (MQTT 5 shared
subscriptions), and every window is stored exactly once."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlmodel import Session, select

from server.app import ServerApp
from server.db.models import TelemetryRow
from server.simulate import SimConfig, simulate
from tests.tls_device_helpers import reachable

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_database(monkeypatch):
    psycopg = pytest.importorskip("psycopg")
    from tests.conftest import PG_ADMIN_DSN

    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server answers: {exc}")
    name = f"edgeherd_rep_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    monkeypatch.setenv("EDGEHERD_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    yield
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def test_two_replicas_split_the_load_and_store_each_window_once(pg_database, tmp_path):
    data = reachable(tmp_path) / "data"
    first = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    second = ServerApp(data, broker_url=first.registry.broker_url, metrics_port=0, drift_interval=3600).start()
    try:
        creds = first.registry.add_devices_bulk([f"sim-{i:02d}" for i in range(20)], "simulated",
                                                custom_profile=True)
        result = simulate(SimConfig(first.registry.broker_url, creds, seconds=4, interval=0.25, processes=2))
        assert result.failed_connects == 0
        expected = result.acked - 2 * 20  # telemetry only: minus one state and one hello per device
        deadline = time.monotonic() + 30
        while True:
            with Session(first.registry.engine) as db:
                stored = db.exec(select(TelemetryRow.device_id, TelemetryRow.session, TelemetryRow.window_seq)).all()
            if len(stored) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert len(stored) == expected == len(set(stored))
        a, b = first.ingestor.accepted["ok"], second.ingestor.accepted["ok"]
        assert a > 0 and b > 0, f"one replica did all the work: {a} / {b}"
        assert first.ingestor.accepted["duplicate"] + second.ingestor.accepted["duplicate"] == 0
    finally:
        second.stop()
        first.stop()


def test_only_the_replica_holding_the_drift_lease_evaluates_drift(tmp_path):
    from server import leases

    app = ServerApp(reachable(tmp_path) / "data", metrics_port=0, drift_interval=0.1, rollout_interval=0)
    calls = []
    app.evaluate_drift = lambda: calls.append(1) or 0  # type: ignore[method-assign]
    assert leases.acquire(app.registry.engine, "drift", "another-replica", ttl=60)
    app.start()
    try:
        time.sleep(1.0)
        assert calls == []  # another replica holds it
        leases.release(app.registry.engine, "drift", "another-replica")
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.1)
        assert calls and leases.holder_of(app.registry.engine, "drift") == app.holder
    finally:
        app.stop()
    assert leases.holder_of(app.registry.engine, "drift") is None  # handed back on a graceful stop
