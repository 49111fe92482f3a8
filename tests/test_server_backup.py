"""Back up a running server under ingest load, delete its data, restore, and carry on."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid

import pytest
from sqlmodel import Session, select

from server.app import ServerApp
from server.backup import BackupError, backup, restore
from server.db.models import Device, ModelVersion, TelemetryRow
from server.registry import Registry
from server.simulate import SimConfig, simulate
from tests.server_helpers import server_dir
from tests.tls_device_helpers import reachable

pytestmark = pytest.mark.integration


def _keys(engine):
    with Session(engine) as db:
        devices = set(db.exec(select(Device.id)).all())
        versions = set(db.exec(select(ModelVersion.manifest_sha256)).all())
        windows = set(db.exec(select(TelemetryRow.device_id, TelemetryRow.session, TelemetryRow.window_seq)).all())
    return devices, versions, windows


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, monkeypatch):
    if request.param == "sqlite":
        monkeypatch.delenv("EDGEHERD_DATABASE_URL", raising=False)
        yield None
        return
    psycopg = pytest.importorskip("psycopg")
    from tests.conftest import PG_ADMIN_DSN

    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server answers: {exc}")
    names = [f"edgeherd_bk_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for n in names:
        admin.execute(f'CREATE DATABASE "{n}"')
    urls = [f"postgresql+psycopg://postgres@127.0.0.1:5432/{n}" for n in names]
    monkeypatch.setenv("EDGEHERD_DATABASE_URL", urls[0])
    yield urls
    for n in names:
        admin.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')
    admin.close()


def test_backup_under_load_then_restore(database, digits_bundle, tmp_path, monkeypatch):
    data, _ = server_dir(reachable(tmp_path) / "data", digits_bundle.key)
    app = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    reg = app.registry
    reg.push_model(digits_bundle.dir)
    creds = reg.add_devices_bulk([f"sim-{i:03d}" for i in range(30)], "simulated", custom_profile=True)
    load = threading.Thread(target=simulate, args=(SimConfig(reg.broker_url, creds, seconds=8, interval=0.5,
                                                             processes=2),))
    load.start()
    try:
        time.sleep(4)
        before = _keys(reg.engine)
        assert len(before[2]) > 0  # ingest is running
        info = backup(data, tmp_path / "backup")
        load.join(60)
        after_load = _keys(reg.engine)
    finally:
        app.stop()
    assert info["counts"]["devices"] == 30 and len(after_load[2]) > len(before[2])
    with pytest.raises(BackupError, match="not empty"):
        backup(data, tmp_path / "backup")

    shutil.rmtree(data)
    if database is not None:
        monkeypatch.setenv("EDGEHERD_DATABASE_URL", database[1])  # a fresh, empty database
    restore(tmp_path / "backup", data)
    with pytest.raises(BackupError, match="already holds a server"):
        restore(tmp_path / "backup", data)
    reg2 = Registry(data)
    try:
        devices, versions, windows = _keys(reg2.engine)
    finally:
        reg2.engine.dispose()
    assert before[0] <= devices and before[1] <= versions and before[2] <= windows
    assert len(windows) == info["counts"]["telemetry"]

    # the restored server carries on with the same fleet: the same CA trusts the devices' certificates, more
    # windows are ingested
    app2 = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    try:
        assert app2.registry.broker_url.startswith("mqtts://")
        result = simulate(SimConfig(app2.registry.broker_url, dict(list(creds.items())[:5]), seconds=3, interval=0.5,
                                    processes=1))
        assert result.failed_connects == 0
        deadline = time.monotonic() + 20
        while len(_keys(app2.registry.engine)[2]) <= len(windows):
            assert time.monotonic() < deadline, "the restored server ingests nothing"
            time.sleep(0.3)
    finally:
        app2.stop()
    assert os.stat(data / "keys" / "signing.key").st_mode & 0o077 == 0
