"""Simulated devices with and without drift: only the drifting ones raise alerts; the fleet is scored too."""

from __future__ import annotations

import time

import pytest
from sqlmodel import Session, select

from protocol import manifest_digest
from server.app import ServerApp
from server.db.models import Alert, DriftReportRow, StatsWindow
from server.simulate import SimConfig, simulate
from tests.server_helpers import server_dir
from tests.tls_device_helpers import reachable

pytestmark = pytest.mark.integration


def test_drifting_devices_raise_alerts_and_the_others_do_not(digits_bundle, tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEHERD_DATABASE_URL", raising=False)
    data, _ = server_dir(reachable(tmp_path) / "data", digits_bundle.key)
    app = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    try:
        reg = app.registry
        reg.push_model(digits_bundle.dir)
        manifest = digits_bundle.signed.manifest
        ids = [f"sim-{i}" for i in range(6)]
        creds = reg.add_devices_bulk([*ids, "sim-revoked"], "simulated", custom_profile=True)
        assert reg.broker_url.startswith("mqtts://") and all(c.certificate for c in creds.values())
        reg.revoke_device("sim-revoked")  # its certificate is on the CRL: refused at the handshake
        result = simulate(SimConfig(reg.broker_url, creds, seconds=3, interval=0.3, processes=2,
                                    reference=manifest.reference, manifest_sha256=manifest_digest(manifest),
                                    samples=200, drifting=frozenset(ids[:2])))
        assert result.failed_connects == 1 and set(result.per_device) == set(ids)
        deadline = time.monotonic() + 30
        while True:
            with Session(reg.engine) as db:
                have = len(db.exec(select(StatsWindow)).all())
            if have >= 6 * 5:
                break
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert app.evaluate_drift() == have
        with Session(reg.engine) as db:
            alerted = {a.device_id for a in db.exec(select(Alert).where(Alert.active)).all()}
            fleet = db.exec(select(DriftReportRow).where(DriftReportRow.scope == "fleet")).all()
        assert alerted == set(ids[:2])
        assert fleet and fleet[0].n == have * 200 and fleet[0].drifted
    finally:
        app.stop()
