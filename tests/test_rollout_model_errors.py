"""A version whose model fails at run time on some inputs, rolled out to real agents by a real server on a real
Mosquitto: the canary answers those requests with a 500, counts them, its error rate fails the wave's gate, and
the rollout puts the canary back on the previous version by itself."""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from agent.config import load_config
from agent.runtime import Agent
from server import audit
from server.app import ServerApp
from server.db.models import AuditEntry, Device, GateEvaluation, Rollout, RolloutDevice
from server.orchestrator import create_rollout
from server.rollouts import Gates, RolloutSpec
from tests._mosquitto import free_port
from tests.model_helpers import ROWS, lookup_onnx, onnx_bundle
from tests.server_helpers import server_dir, wait_for

pytestmark = pytest.mark.integration

DEVICES = ["edge-1", "edge-2"]
#: Every third request carries a first value past the table of the 1.1.0 model (1.0.0 clips it into the table).
TRAFFIC = [[1.0, 0.5], [2.0, -1.0], [float(ROWS + 2), 0.0]]
SPEC = RolloutSpec(waves=("1", "100%"), soak_s=1.5, install_timeout_s=60,
                   gates=Gates(min_requests=20, error_margin=0.05, latency_margin=100, min_drift_windows=0))


class Traffic:
    """Sends TRAFFIC round and round to one agent's local API; counts the answers by (version, status)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: Counter[tuple[str, int]] = Counter()
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.01):
            inputs, i = TRAFFIC[i % len(TRAFFIC)], i + 1
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("POST", "/v1/predict", body=json.dumps({"inputs": [inputs]}),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = json.loads(resp.read())
            except (OSError, http.client.HTTPException):
                self.answers[("", 0)] += 1  # no answer: the connection was refused or dropped
                continue
            finally:
                conn.close()
            self.answers[(body.get("version", ""), resp.status)] += 1
            if resp.status == 500 and len(self.messages) < 5:
                self.messages.append(body["message"])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def _rows(app: ServerApp, model: type, *where: object) -> list:
    with Session(app.registry.engine) as db:
        return list(db.exec(select(model).where(*where)).all())


def test_a_model_failing_at_run_time_fails_the_canary_error_gate_and_is_rolled_back(tmp_path: Path) -> None:
    data, key = server_dir(tmp_path / "server")
    b1, _, v1 = onnx_bundle(tmp_path / "b1", key, lookup_onnx(tmp_path / "m1.onnx", clip=True), version="1.0.0")
    b2, _, _ = onnx_bundle(tmp_path / "b2", key, lookup_onnx(tmp_path / "m2.onnx"), version="1.1.0")
    app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0.3).start()
    agents: list[Agent] = []
    traffic: dict[str, Traffic] = {}
    try:
        reg = app.registry
        reg.push_model(b1)
        reg.push_model(b2)
        for device in DEVICES:
            enrolled = reg.add_device(device, "x86-64-cpu", ["lab"])
            cfg = load_config(enrolled.agent_config, data_dir=tmp_path / device, api_port=free_port(),
                              window_seconds=0.5)
            agents.append(Agent(cfg, download_timeout=2.0, min_backoff=0.2, max_backoff=1.0).start())
        wait_for(lambda: sum(bool(d.fingerprint) for d in _rows(app, Device)) == len(DEVICES), 60,
                 "both agents' hellos")
        for device in DEVICES:
            reg.deploy("lookup", "1.0.0", device)
        wait_for(lambda: len(_rows(app, Device, Device.running_manifest == v1)) == len(DEVICES), 60,
                 "both agents to run 1.0.0")
        for agent in agents:
            assert agent.api is not None
            traffic[agent.cfg.device_id] = Traffic(agent.api.port)

        create_rollout(reg, name="lookup-1-1", model="lookup", version="1.1.0", target={"groups": ["lab"]},
                       spec=SPEC, actor="alice")
        rollout = wait_for(lambda: next((r for r in _rows(app, Rollout) if r.state == "rolled_back"), None), 120,
                           "the rollout to roll back")
        wait_for(lambda: len(_rows(app, Device, Device.running_manifest == v1)) == len(DEVICES), 60,
                 "both agents to run 1.0.0 again")
        # what the fleet reported, and what the gate made of it
        (canary,) = _rows(app, RolloutDevice)  # only the canary was ever moved
        failed = _rows(app, GateEvaluation, GateEvaluation.verdict == "fail")
        gate = next(g for g in failed if g.gate == "error_rate")
        assert gate.wave == 0 and gate.numbers["new_errors"] > 0
        assert gate.numbers["new_error_rate"] > gate.numbers["limit"]
        assert gate.numbers["baseline_error_rate"] == 0.0  # 1.0.0 answers the same inputs
        actions = [e.action for e in _rows(app, AuditEntry, col(AuditEntry.action).startswith("rollout."))]
        assert actions[-2:] == ["rollout.rollback_started", "rollout.rolled_back"], actions
        assert rollout.name == "lookup-1-1"
        with Session(reg.engine) as db:
            assert audit.verify(db).ok
    finally:
        for t in traffic.values():
            t.stop()
        for agent in agents:
            agent.stop()
        app.stop()
    # the canary answered the inputs its model fails on with a 500 and a message, kept serving, and is back
    on_canary = traffic[canary.device_id].answers
    assert on_canary[("1.1.0", 200)] > 0 and on_canary[("", 500)] > 0 and on_canary[("1.0.0", 200)] > 0, on_canary
    assert "out of data bounds" in traffic[canary.device_id].messages[0]
    other = next(d for d in DEVICES if d != canary.device_id)
    assert traffic[other].answers[("", 500)] == 0
    assert on_canary[("", 0)] == 0 and traffic[other].answers[("", 0)] == 0  # no connection was dropped
