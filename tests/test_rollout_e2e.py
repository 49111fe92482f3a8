"""Rollouts end to end: the server's orchestrator, a real Mosquitto, and 20 simulated devices that install
what they are told and report telemetry whose error rate depends on the version they run."""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from server import audit
from server.app import ServerApp
from server.db.models import AuditEntry, Device, GateEvaluation, Rollout, RolloutDevice
from server.orchestrator import create_rollout
from server.rollouts import Gates, RolloutSpec
from server.simulate import Behaviour, SimConfig, simulate
from tests.server_helpers import blob_bundle, server_dir, server_process, wait_for
from tests.tls_device_helpers import reachable

pytestmark = pytest.mark.integration

N = 20
SPEC = RolloutSpec(soak_s=1.5, install_timeout_s=30, gates=Gates(min_requests=20, error_margin=0.05,
                                                                  min_drift_windows=0))



class Fleet:
    """A server data dir with versions 1.0.0 and 1.1.0 of one model, N devices in group "lab" running 1.0.0."""

    def __init__(self, tmp: Path, *, bad_new: bool, rollout_interval: float = 0.3) -> None:
        self.data, key = server_dir(tmp / "server")
        b1, _, self.v1 = blob_bundle(tmp / "b1", key, model="sim", version="1.0.0")
        b2, _, self.v2 = blob_bundle(tmp / "b2", key, model="sim", version="1.1.0")
        self.app = ServerApp(self.data, metrics_port=0, drift_interval=0, rollout_interval=rollout_interval).start()
        reg = self.app.registry
        reg.push_model(b1)
        reg.push_model(b2)
        ids = [f"sim-{i:02d}" for i in range(N)]
        creds = reg.add_devices_bulk(ids, "x86-64", ["lab"], custom_profile=True)  # certificates: TLS
        behaviours = {self.v1: Behaviour(error_rate=0.01, p95_ms=3.0),
                      self.v2: Behaviour(error_rate=0.3 if bad_new else 0.01, p95_ms=3.0)}
        self.stop = mp.get_context("spawn").Event()
        cfg = SimConfig(reg.broker_url, creds, seconds=300, interval=0.2, processes=2, follow_desired=True,
                        install_s=0.3, running=(self.v1, "blob"), behaviours=behaviours, requests_per_window=20)
        self.sim = threading.Thread(target=simulate, args=(cfg, self.stop), daemon=True)
        self.sim.start()
        wait_for(lambda: self.running(self.v1) == N, 60, "the simulated fleet to report version 1.0.0")

    def running(self, manifest: str) -> int:
        with Session(self.app.registry.engine) as db:
            return len(db.exec(select(Device.id).where(Device.running_manifest == manifest)).all())

    def rollout(self) -> Rollout:
        with Session(self.app.registry.engine) as db:
            return db.exec(select(Rollout)).one()

    def audit(self, prefix: str = "rollout.") -> list[AuditEntry]:
        with Session(self.app.registry.engine) as db:
            return list(db.exec(select(AuditEntry).where(col(AuditEntry.action).startswith(prefix))
                                .order_by(col(AuditEntry.seq))))

    def close(self) -> None:
        self.stop.set()
        self.sim.join(60)
        self.app.stop()


@pytest.fixture
def fleet(tmp_path):
    made: list[Fleet] = []

    def make(**kw) -> Fleet:
        made.append(Fleet(reachable(tmp_path), **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def _start(f: Fleet, spec: RolloutSpec = SPEC) -> None:
    create_rollout(f.app.registry, name="sim-1-1", model="sim", version="1.1.0", target={"groups": ["lab"]},
                   spec=spec, actor="alice")


def test_a_good_version_rolls_out_in_waves_and_completes(fleet):
    f = fleet(bad_new=False)
    _start(f)
    wait_for(lambda: f.rollout().state == "completed", 120, "the rollout to complete")
    assert f.running(f.v2) == N
    actions = [e.action for e in f.audit()]
    assert actions[0] == "rollout.create" and actions[-1] == "rollout.completed"
    started = [e.detail for e in f.audit() if e.action == "rollout.wave_started"]
    assert [len(d["devices"]) for d in started] == [1, 1, 8, 10]  # cumulative 1 → 2 → 10 → 20
    assert actions.count("rollout.wave_passed") == 4
    with Session(f.app.registry.engine) as db:
        gates = db.exec(select(GateEvaluation)).all()
        devices = db.exec(select(Device)).all()
        assert {(g.wave, g.gate) for g in gates if g.verdict == "pass"} >= {
            (w, g) for w in range(4) for g in ("installed", "error_rate", "latency")}
        assert all(d.desired_manifest == f.v2 for d in devices)
        assert audit.verify(db).ok
    told = [d for w in started for d in w["devices"]]
    assert sorted(told) == [f"sim-{i:02d}" for i in range(N)]  # each device was told once


def test_a_version_with_a_doubled_error_rate_stops_at_the_canary_and_rolls_it_back(fleet):
    f = fleet(bad_new=True)
    _start(f)
    wait_for(lambda: f.rollout().state == "rolled_back", 120, "the rollout to roll back")
    wait_for(lambda: f.running(f.v1) == N, 30, "every device to run 1.0.0 again")
    with Session(f.app.registry.engine) as db:
        assert len(db.exec(select(RolloutDevice)).all()) == 1  # only the canary was ever touched
        failed_gate = db.exec(select(GateEvaluation).where(GateEvaluation.verdict == "fail")).one()
        assert failed_gate.gate == "error_rate" and failed_gate.wave == 0
        assert failed_gate.numbers["new_error_rate"] > failed_gate.numbers["limit"]
        assert audit.verify(db).ok
    failed = next(e for e in f.audit() if e.action == "rollout.wave_failed")
    gate = next(g for g in failed.detail["gates"] if g["gate"] == "error_rate")
    assert gate["verdict"] == "fail" and gate["new_error_rate"] > 0.1 and gate["baseline_error_rate"] < 0.05
    assert [e.action for e in f.audit()][-2:] == ["rollout.rollback_started", "rollout.rolled_back"]


def test_a_server_killed_mid_rollout_finishes_it_after_a_restart_as_if_nothing_happened(fleet, tmp_path):
    f = fleet(bad_new=False, rollout_interval=0)  # this process keeps the broker; another one orchestrates
    log = tmp_path / "server.log"
    broker = f.app.registry.broker_url
    proc = server_process(f.data, broker, log)
    try:
        _start(f)
        wait_for(lambda: f.rollout().wave >= 2, 120, "the rollout to reach its third wave")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        killed_at = f.rollout()
        assert killed_at.state == "running", killed_at.state
        proc = server_process(f.data, broker, log)
        wait_for(lambda: f.rollout().state == "completed", 120, "the restarted server to finish the rollout")
    finally:
        proc.terminate()
        proc.wait(30)
    assert f.running(f.v2) == N
    started = [e.detail for e in f.audit() if e.action == "rollout.wave_started"]
    assert [len(d["devices"]) for d in started] == [1, 1, 8, 10]
    assert sorted(d for w in started for d in w["devices"]) == [f"sim-{i:02d}" for i in range(N)]
    assert [e.action for e in f.audit()].count("rollout.wave_passed") == 4
    with Session(f.app.registry.engine) as db:
        assert all(d.desired_manifest == f.v2 for d in db.exec(select(Device)).all())
        assert all(r.state == "installed" for r in db.exec(select(RolloutDevice)).all())
        assert audit.verify(db).ok
