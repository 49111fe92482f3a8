"""The whole path on a real Mosquitto: enrol, push, deploy, the real agent installs and serves,
reports land in the database, drift is scored; then revoke, and the device is cut off."""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.request

import pytest
from sqlmodel import Session, select

from protocol import artifact_topic, decode_chunk
from server.app import ServerApp
from server.broker import SERVER_USER, DeviceCredentials
from server.db.models import Device, DriftReportRow, StatsWindow, TelemetryRow
from tests._mosquitto import free_port
from tests.agent_harness import AgentProcess
from tests.server_helpers import server_dir, wait_for
from tests.tls_device_helpers import device_tls, listeners, reachable
from toolchain.data import load_digits

pytestmark = pytest.mark.integration



def test_enrol_push_deploy_serve_report_revoke(digits_bundle, tmp_path):
    data, _ = server_dir(reachable(tmp_path) / "server", digits_bundle.key)
    app = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    agent = None
    try:
        reg = app.registry
        enrolled = reg.add_device("pi-1", "x86-64", ["lab"], custom_profile=True)
        assert 'broker_url = "mqtts://127.0.0.1:' in enrolled.agent_config.read_text()  # the agent uses TLS
        version = reg.push_model(digits_bundle.dir)
        assert reg.push_model(digits_bundle.dir).id == version.id  # pushing the same bundle again is a no-op
        # not heard from yet: recorded, and sent with the artifact chosen when its hello arrives
        assert reg.deploy("digits", "1.0.0", "pi-1") is None

        from tests.mqtt_helpers import TestClient

        broker = listeners(reg.broker)  # the devices' listener (TLS) and the server's own
        watcher = TestClient(broker, SERVER_USER, reg.broker.server_password())  # type: ignore[arg-type]
        watcher.subscribe("edgeherd/v1/artifacts/+/chunk")
        api_port = free_port()
        # the device holds its own copy of what enrolment wrote (revoking the device deletes the server's)
        device_dir = shutil.copytree(enrolled.agent_config.parent, tmp_path / "device")
        agent = AgentProcess(device_dir / "agent.toml", tmp_path / "agent.log", env={
            "EDGEHERD_AGENT_DATA_DIR": str(tmp_path / "agent"), "EDGEHERD_AGENT_API_PORT": str(api_port),
            "EDGEHERD_AGENT_WINDOW_SECONDS": "1"})

        def running():
            with Session(app.registry.engine) as db:
                d = db.get(Device, "pi-1")
                return d if d and d.running_artifact == "digits-onnx-int8" and d.install_step == "done" else None

        device = wait_for(running, 90, "the agent to install the bundle")
        # the agent listened on the artifact's broadcast topic and asked for a shared answer
        int8 = next(a for a in digits_bundle.signed.manifest.artifacts if a.name == "digits-onnx-int8")
        shared = watcher.drain(0.5)
        watcher.close()
        assert shared and {m.topic for m in shared} == {artifact_topic(int8.sha256)}
        assert sum(len(decode_chunk(m.payload).data) for m in shared) >= int8.size
        assert device.status == "online" and device.fingerprint["cpu_count"] >= 1

        x = load_digits().x[:40]
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/predict",
                                     data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert len(json.loads(resp.read())["classes"]) == 40

        def reported():
            with Session(app.registry.engine) as db:
                stats = db.exec(select(StatsWindow).where(StatsWindow.device_id == "pi-1")).all()
                telemetry = db.exec(select(TelemetryRow).where(TelemetryRow.device_id == "pi-1",
                                                               TelemetryRow.requests > 0)).all()
                return (stats, telemetry) if stats and telemetry else None

        stats, telemetry = wait_for(reported, 60, "telemetry and statistics in the database")
        assert sum(s.n for s in stats) == 40 and sum(t.requests for t in telemetry) == 1
        assert app.evaluate_drift() >= 1
        with Session(app.registry.engine) as db:
            reports = db.exec(select(DriftReportRow).where(DriftReportRow.device_id == "pi-1")).all()
        assert reports and reports[0].report["features"] and reports[0].manifest_sha256 == version.manifest_sha256

        # revoke: the broker refuses the device's certificate from now on
        files = device_dir
        creds = device_tls("pi-1", DeviceCredentials(certificate=(files / "device.pem").read_bytes(),
                                                     key=(files / "device.key").read_bytes(),
                                                     ca_bundle=(files / "ca.pem").read_bytes()), tmp_path / "copy")
        reg.revoke_device("pi-1")
        from tests.mqtt_helpers import HandshakeRefused

        with pytest.raises((HandshakeRefused, ssl.SSLError)):  # the handshake fails: TLS 1.3 says so after it
            TestClient(broker, "pi-1", creds, timeout=5)  # type: ignore[arg-type]
        wait_for(lambda: "refused" in (tmp_path / "agent.log").read_text() or "Not authorized" in (
            tmp_path / "agent.log").read_text(), 30, "the agent to be refused")
        with Session(app.registry.engine) as db:
            assert db.get(Device, "pi-1").revoked
    finally:
        if agent is not None:
            agent.stop()
        app.stop()
