"""Chaos: faults injected into a running fleet (real broker, server and agent processes under steady
traffic), then the books are checked: every device runs a verified model, and every telemetry window each
agent produced is stored exactly once — none lost, none twice.

`make chaos` runs every test marked `chaos`. Other faults have their own
tests: a server SIGKILLed mid-rollout (tests/test_rollout_e2e.py), agents SIGKILLed at every install step
(tests/test_agent_crash.py), corrupted chunks and a broker restart mid-download (tests/test_agent_faults.py),
tampered bundles (tests/test_cli.py, tests/test_server_cli.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections import defaultdict

import pytest
from sqlmodel import Session, select

from protocol import private_key_to_pem, public_key_to_pem
from server.app import ServerApp
from server.db.models import Device, TelemetryRow
from tests._mosquitto import free_port
from tests.agent_harness import AgentProcess
from tests.server_helpers import wait_for
from toolchain.data import load_digits

# Slow as well, for now: on a loaded machine a broker SIGKILL has lost the two windows every agent had in
# flight (PUBACKed by the broker, never delivered to the server); `make chaos` shows it. See docs/testing.md.
pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]
N = 6



def _status(reg, device: str) -> str:
    with Session(reg.engine) as db:
        d = db.get(Device, device)
        return d.status if d else "?"


def test_broker_killed_and_an_agent_frozen_past_its_keepalive_lose_no_window(digits_bundle, tmp_path):
    data = tmp_path / "server"
    (data / "keys").mkdir(parents=True)
    (data / "keys" / "signing.key").write_bytes(private_key_to_pem(digits_bundle.key))
    (data / "keys" / "signing.pub").write_bytes(public_key_to_pem(digits_bundle.key.public_key()))
    app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
    reg = app.registry
    reg.push_model(digits_bundle.dir)
    agents: dict[str, AgentProcess] = {}
    ports: dict[str, int] = {}
    stop_traffic = threading.Event()
    faults: list[tuple[str, str]] = []
    try:
        for i in range(N):
            device = f"chaos-{i}"
            enrolled = reg.add_device(device, "x86-64-cpu", ["chaos"])
            ports[device] = free_port()
            agents[device] = AgentProcess(enrolled.agent_config, tmp_path / f"{device}.log", env={
                "EDGEHERD_AGENT_DATA_DIR": str(tmp_path / device), "EDGEHERD_AGENT_API_PORT": str(ports[device]),
                "EDGEHERD_AGENT_WINDOW_SECONDS": "1", "EDGEHERD_AGENT_KEEPALIVE": "5"})
        for device in agents:
            reg.deploy("digits", "1.0.0", device)

        def running() -> bool:
            with Session(reg.engine) as db:
                return all(d.running_artifact and d.install_step == "done" for d in db.exec(select(Device)))

        wait_for(running, 120, "every agent to install v1")
        x = load_digits().x[:64]

        def traffic() -> None:
            while not stop_traffic.wait(0.2):
                for port in ports.values():
                    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict",
                                                 data=json.dumps({"inputs": x[:8].tolist()}).encode(),
                                                 headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(req, timeout=5) as resp:
                            resp.read()
                    except OSError:
                        pass  # a frozen agent does not answer; the others must

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        time.sleep(3)

        # 1. the broker dies (SIGKILL); the server's supervisor restarts it; agents keep windows meanwhile
        assert reg.broker.proc is not None
        reg.broker.proc.send_signal(signal.SIGKILL)
        faults.append(("broker SIGKILLed under traffic", "restarted by the server's supervisor"))
        wait_for(lambda: reg.broker.alive(), 30, "the broker to be restarted")
        time.sleep(4)

        # 2. an agent frozen (SIGSTOP: its socket stays open) past 1.5 × its keepalive, then thawed
        frozen = agents["chaos-2"]
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: _status(reg, "chaos-2") == "offline", 30, "the broker to publish chaos-2's will")
        os.kill(frozen.proc.pid, signal.SIGCONT)
        faults.append((f"agent SIGSTOPped {time.monotonic() - stopped:.0f} s (keepalive 5 s)",
                       "marked offline by its will, then back"))
        wait_for(lambda: _status(reg, "chaos-2") == "online", 60, "chaos-2 to reconnect")
        time.sleep(4)
        stop_traffic.set()
        t.join(10)
    finally:
        stop_traffic.set()
        for a in agents.values():
            a.stop()  # graceful: the agent flushes its last window and its offline queue first
        time.sleep(1)
        app.stop()

    # the books: per device and session, window numbers 0..max with no gap (none lost), stored once each
    app2 = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0)
    with Session(app2.registry.engine) as db:
        rows = db.exec(select(TelemetryRow.device_id, TelemetryRow.session, TelemetryRow.window_seq)).all()
        devices = db.exec(select(Device)).all()
    app2.registry.engine.dispose()
    by: dict[tuple[str, int], list[int]] = defaultdict(list)
    for device, session, seq in rows:
        by[(device, session)].append(seq)
    lost = {k: sorted(set(range(max(v) + 1)) - set(v)) for k, v in by.items() if set(range(max(v) + 1)) - set(v)}
    twice = len(rows) - len(set(rows))
    print("\nfault                                      | outcome")
    for fault, outcome in faults:
        print(f"{fault:<42} | {outcome}")
    print(f"windows stored: {len(rows)}, lost: {sum(map(len, lost.values()))}, stored twice: {twice}; "
          f"duplicates received and dropped by the server: {app.ingestor.accepted['duplicate']}")
    assert not lost, f"windows lost: {lost}"
    assert twice == 0
    assert len({d for d, _ in by}) == N and all(len(v) >= 10 for v in by.values())
    assert all(d.running_artifact and d.running_manifest for d in devices)  # every device runs a verified model
