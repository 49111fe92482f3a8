"""Chaos: faults injected into a running fleet under steady traffic, then the books are checked.

The fleet is real: a Mosquitto broker, the server (one replica in this process keeping the broker and ingesting,
one in a child process orchestrating the rollout and ingesting too), and agents as real processes on the x86-64
profile, each sent predictions every 0.2 s and closing a telemetry window every second. The scenario deploys
1.0.0, injects the faults of its plan, and rolls out 1.1.0 in canary waves through them. After it:

- every device runs a verified model (1.1.0, the one the rollout targeted), and the rollout completed with every
  device installed once, its audit chain intact;
- every telemetry window each agent closed is stored exactly once on the server or still waits in that agent's
  outbox: per agent run, window numbers 0..max with no gap and no repeat.

The fault table is printed. `make chaos` runs the full plan (12 agents, every fault); `make test` runs a smaller
one (4 agents; no agent frozen past its keepalive, which alone takes 10 s).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from protocol import (
    Chunk,
    TopicKind,
    decode_model,
    device_topic,
    encode_chunk,
    encode_model,
    sign_manifest,
    verify_manifest,
)
from protocol.signing import SignedManifest
from server import audit
from server.app import ServerApp
from server.broker import SERVER_USER
from server.db.models import AuditEntry, Device, ModelVersion, Rollout, RolloutDevice, TelemetryRow
from server.orchestrator import command_rollout, create_rollout
from server.registry import RegistryError
from server.rollouts import Gates, RolloutSpec
from tests._mosquitto import free_port
from tests.agent_harness import AgentProcess
from tests.mqtt_helpers import TestClient
from tests.server_helpers import server_dir, server_process, wait_for
from tests.tls_device_helpers import listeners
from toolchain.data import load_digits

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@dataclass(frozen=True)
class Plan:
    agents: int
    freeze: bool = True  # an agent SIGSTOPped past its keepalive (its socket left open), then thawed
    broker_kill: bool = True  # the broker SIGKILLed under traffic
    tamper: bool = True  # tampered bundles pushed
    kill_download: bool = True  # an agent SIGKILLed half-way through downloading 1.1.0
    kill_install: bool = True  # an agent SIGKILLed on entering the install step
    disk_full: bool = True  # an agent's disk (a tmpfs) filled while it downloads
    corrupt: bool = True  # corrupted chunks sent to every device during the rollout
    server_kill: bool = True  # the orchestrating server SIGKILLed mid-rollout, then restarted


FULL = Plan(agents=12)
FAST = Plan(agents=4, freeze=False)
KILL_DOWNLOAD, KILL_INSTALL, DISK_FULL, FROZEN = "chaos-01", "chaos-02", "chaos-03", "chaos-00"


def _revision(bundle: Path, out: Path, key: Any, version: str) -> Path:
    """``bundle`` as a new version: the same weights in ONNX files of other bytes (a new doc string), so the
    rollout moves real new artifacts; the manifest re-signed."""
    import onnx

    shutil.copytree(bundle, out)
    signed = decode_model(SignedManifest, (out / "manifest.json").read_bytes())
    manifest = verify_manifest(signed, key.public_key())
    renamed: dict[str, tuple[str, int]] = {}
    for art in manifest.artifacts:
        if art.target.value != "onnx" or art.sha256 in renamed:
            continue
        model = onnx.load(str(out / "artifacts" / art.sha256))
        model.doc_string = f"{manifest.model} {version}"
        data = model.SerializeToString()
        sha = hashlib.sha256(data).hexdigest()
        (out / "artifacts" / sha).write_bytes(data)
        renamed[art.sha256] = (sha, len(data))
    for old in renamed:  # every entry naming an old file now names its new one (artifacts share files by sha)
        (out / "artifacts" / old).unlink()  # the bundle holds what its manifest names, nothing else
    artifacts = [a.model_copy(update=dict(zip(("sha256", "size"), renamed[a.sha256], strict=True)))
                 if a.sha256 in renamed else a for a in manifest.artifacts]
    new = manifest.model_copy(update={"version": version, "artifacts": artifacts})
    (out / "manifest.json").write_bytes(encode_model(sign_manifest(new, key)))
    return out


class Chaos:
    def __init__(self, plan: Plan, bundle: Any, tmp: Path) -> None:
        self.plan, self.tmp = plan, tmp
        self.faults: list[tuple[str, str]] = []
        data, _ = server_dir(tmp / "server", bundle.key)
        self.data = data
        self.app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
        self.reg = self.app.registry
        self.v1 = self.reg.push_model(bundle.dir).manifest_sha256
        self.v2_dir = _revision(bundle.dir, tmp / "v2", bundle.key, "1.1.0")
        self.v2 = self.reg.push_model(self.v2_dir).manifest_sha256
        self.devices = [f"chaos-{i:02d}" for i in range(plan.agents)]
        self.agents: dict[str, AgentProcess] = {}
        self.ports: dict[str, int] = {}
        self.configs: dict[str, Path] = {}
        self.mounted: list[Path] = []
        #: Telemetry windows left in the agents' outboxes once they stopped: (device, session, window_seq).
        self.waiting: list[tuple[str, int, int]] = []
        self.corrupted = 0
        self.server: subprocess.Popen[bytes] | None = None
        self._stop_traffic = threading.Event()
        self._traffic: threading.Thread | None = None

    # -- processes -----------------------------------------------------------------------

    def data_dir(self, device: str) -> Path:
        return self.tmp / device

    def start_agent(self, device: str, kill_at: str | None = None) -> None:
        self.agents[device] = AgentProcess(self.configs[device], self.tmp / f"{device}.log", env={
            "EDGEHERD_AGENT_DATA_DIR": str(self.data_dir(device)),
            "EDGEHERD_AGENT_API_PORT": str(self.ports[device]), "EDGEHERD_AGENT_WINDOW_SECONDS": "1",
            "EDGEHERD_AGENT_KEEPALIVE": "5", "EDGEHERD_AGENT_CHUNK_KIB": "4",
            "EDGEHERD_AGENT_RECEIPT_TIMEOUT_S": "5"}, kill_at=kill_at)

    def start_server(self) -> None:
        self.server = server_process(self.data, self.reg.broker_url, self.tmp / "server.log")

    def enrol(self) -> None:
        for device in self.devices:
            enrolled = self.reg.add_device(device, "x86-64-cpu", ["chaos"])
            self.configs[device], self.ports[device] = enrolled.agent_config, free_port()
            if device == DISK_FULL and self.plan.disk_full:
                self.data_dir(device).mkdir()
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(self.data_dir(device))],
                               check=True)
                self.mounted.append(self.data_dir(device))
            self.start_agent(device)
        for device in self.devices:
            self.reg.deploy("digits", "1.0.0", device)
        wait_for(lambda: self.running(self.v1) == len(self.devices), 120, "every agent to install 1.0.0")

    def running(self, manifest: str) -> int:
        with Session(self.reg.engine) as db:
            return len(db.exec(select(Device).where(Device.running_manifest == manifest,
                                                    Device.install_step == "done")).all())

    def device(self, device: str) -> Device:
        with Session(self.reg.engine) as db:
            d = db.get(Device, device)
            assert d is not None
            return d

    def rollout(self) -> Rollout:
        with Session(self.reg.engine) as db:
            return db.exec(select(Rollout)).one()

    # -- traffic ---------------------------------------------------------------------------

    def start_traffic(self) -> None:
        x = load_digits().x[:8].tolist()

        def run() -> None:
            while not self._stop_traffic.wait(0.2):
                for port in self.ports.values():
                    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict",
                                                 data=json.dumps({"inputs": x}).encode(),
                                                 headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(req, timeout=5) as resp:
                            resp.read()
                    except (OSError, http.client.HTTPException):  # a reply cut off by a kill: IncompleteRead
                        pass  # a killed, frozen or restarting agent does not answer; the others must

        self._traffic = threading.Thread(target=run, daemon=True)
        self._traffic.start()

    # -- faults ------------------------------------------------------------------------------

    def kill_broker(self) -> None:
        assert self.reg.broker.proc is not None
        self.reg.broker.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: self.reg.broker.alive(), 30, "the broker to be restarted")
        self.faults.append(("broker SIGKILLed under traffic", "restarted by the server's supervisor"))
        time.sleep(4)

    def freeze(self) -> None:
        proc = self.agents[FROZEN].proc
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: self.device(FROZEN).status == "offline", 30, f"the broker to publish {FROZEN}'s will")
        os.kill(proc.pid, signal.SIGCONT)
        self.faults.append((f"{FROZEN} SIGSTOPped {time.monotonic() - stopped:.0f} s (keepalive 5 s)",
                            "marked offline by its will, then back"))
        wait_for(lambda: self.device(FROZEN).status == "online", 60, f"{FROZEN} to reconnect")

    def tamper(self) -> None:
        before = self._versions()
        art = self.tmp / "tampered-artifact"
        shutil.copytree(self.v2_dir, art)
        signed = decode_model(SignedManifest, (art / "manifest.json").read_bytes())
        victim = art / "artifacts" / next(a.sha256 for a in signed.manifest.artifacts if a.name == "digits-onnx-int8")
        blob = bytearray(victim.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        victim.write_bytes(bytes(blob))
        with pytest.raises(RegistryError) as artifact_error:
            self.reg.push_model(art)
        manifest = self.tmp / "tampered-manifest"
        shutil.copytree(self.v2_dir, manifest)
        doc = json.loads((manifest / "manifest.json").read_text())
        doc["manifest"]["version"] = "9.9.9"  # edited after signing
        (manifest / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(RegistryError) as manifest_error:
            self.reg.push_model(manifest)
        assert self._versions() == before
        for fault, error in (("bundle pushed with one artifact bit flipped", artifact_error.value),
                             ("bundle pushed with its manifest edited after signing", manifest_error.value)):
            self.faults.append((fault, "refused: " + str(error).split(": ", 1)[-1][:80]))

    def _versions(self) -> list[str]:
        with Session(self.reg.engine) as db:
            return sorted(v.manifest_sha256 for v in db.exec(select(ModelVersion)))

    def arm_agent_faults(self) -> None:
        """Restart the agents that die during the rollout with their fault armed (1.0.0 is installed)."""
        armed = {}
        if self.plan.kill_download:
            armed[KILL_DOWNLOAD] = "download-mid"
        if self.plan.kill_install:
            armed[KILL_INSTALL] = "install"
        if self.plan.disk_full:
            armed[DISK_FULL] = "download-mid"
        for device, step in armed.items():
            self.agents[device].stop()
            self.start_agent(device, kill_at=step)

    def corrupt_chunks(self, stop: threading.Event) -> None:
        """While the rollout runs, every 0.05 s to every device: a chunk of 1.1.0's artifact whose data does not
        match the hash in its header (a frame corrupted in transit). A well-formed frame of wrong bytes, caught
        only by the whole-file hash, is tests/test_agent_faults.py's (it needs to land mid-download)."""
        art = next(a for a in decode_model(SignedManifest, (self.v2_dir / "manifest.json").read_bytes())
                   .manifest.artifacts if a.name == "digits-onnx-int8")
        frame = encode_chunk(Chunk(request_id="0" * 32, artifact_sha256=art.sha256, offset=0, total_size=art.size,
                                   data=b"\x55" * 4096))
        broken = frame[:-1] + b"\x56"  # the data no longer matches its hash
        client = TestClient(listeners(self.reg.broker), SERVER_USER, self.reg.broker.server_password())  # type: ignore[arg-type]
        try:
            while not stop.wait(0.05):
                for device in self.devices:
                    client.client.publish(device_topic(device, TopicKind.ARTIFACT_CHUNK), broken, qos=1)
                    self.corrupted += 1
        finally:
            client.close()

    def fill_disk(self, device: str) -> Path:
        st = os.statvfs(self.data_dir(device))
        filler = self.data_dir(device) / "filler"
        with filler.open("wb") as fh:
            fh.write(b"\x00" * max(st.f_bavail * st.f_frsize - 8 * 1024, 0))
        return filler

    # -- the rollout, with the faults that happen during it ----------------------------------------

    def roll_out(self) -> None:
        self.arm_agent_faults()
        self.start_server()
        spec = RolloutSpec(waves=("1", "50%", "100%"), soak_s=3, install_timeout_s=90, on_failure="pause",
                           gates=Gates(min_requests=20, error_margin=0.01, latency_margin=5.0, min_drift_windows=0))
        create_rollout(self.reg, name="chaos-1-1", model="digits", version="1.1.0", target={"groups": ["chaos"]},
                       spec=spec, actor="alice")
        stop_corrupting = threading.Event()
        corrupter = threading.Thread(target=self.corrupt_chunks, args=(stop_corrupting,), daemon=True)
        if self.plan.corrupt:
            corrupter.start()
        server_killed = not self.plan.server_kill
        filler: Path | None = None
        restarted: set[str] = set()
        deadline = time.monotonic() + 300
        try:
            while (r := self.rollout()).state != "completed":
                assert time.monotonic() < deadline, f"the rollout did not complete: {r.state} wave {r.wave}"
                assert r.state in ("pending", "running", "paused"), f"the rollout ended {r.state}"
                for device, agent in self.agents.items():
                    if agent.proc.poll() is None or device in restarted:
                        continue
                    restarted.add(device)
                    if device == DISK_FULL:
                        filler = self.fill_disk(device)
                    self.start_agent(device)  # the fault is not armed again
                if r.state == "paused":
                    assert filler is not None, f"the rollout paused: {self._why()}"
                    why = self._why()
                    assert DISK_FULL in why and "No space left" in why, why
                    assert self.device(DISK_FULL).running_manifest == self.v1  # and 1.0.0 still serves
                    filler.unlink()
                    self.faults.append((f"{DISK_FULL}'s disk filled mid-download (tmpfs, 8 KiB left)",
                                        "install failed, 1.0.0 kept serving; paused, disk freed, resumed"))
                    filler = None
                    command_rollout(self.reg, "chaos-1-1", "resume", "alice", "disk freed")
                if not server_killed and r.state == "running" and r.wave >= 1:
                    assert self.server is not None
                    self.server.send_signal(signal.SIGKILL)
                    self.server.wait(30)
                    self.start_server()
                    server_killed = True
                    self.faults.append((f"server SIGKILLed in wave {r.wave + 1} of 3", "restarted; rollout resumed"))
                time.sleep(0.3)
        finally:
            stop_corrupting.set()
            if corrupter.is_alive():
                corrupter.join(10)
        if self.plan.corrupt:
            dropped = sum(log.read_text(errors="replace").count("does not match its sha256")
                          for log in self.tmp.glob("chaos-*.log"))
            assert dropped > 0
            self.faults.append((f"{self.corrupted} corrupted chunks sent during the rollout",
                                f"{dropped} arrived mid-download and were dropped by the frame check; the rest "
                                "arrived between downloads and were ignored"))
        for device, step in ((KILL_DOWNLOAD, "half-way through its download"), (KILL_INSTALL, "entering install")):
            if device in restarted:
                self.faults.append((f"{device} SIGKILLed {step}", "restarted; resumed and installed 1.1.0"))
        expected = {d for d, on in ((KILL_DOWNLOAD, self.plan.kill_download), (KILL_INSTALL, self.plan.kill_install),
                                    (DISK_FULL, self.plan.disk_full)) if on}
        assert restarted == expected, f"agents killed: {sorted(restarted)}, faults armed on {sorted(expected)}"

    def _why(self) -> str:
        with Session(self.reg.engine) as db:
            rows = db.exec(select(AuditEntry).where(col(AuditEntry.action) == "rollout.wave_failed")).all()
            devices = db.exec(select(RolloutDevice).where(RolloutDevice.state == "failed")).all()
        return json.dumps([r.detail for r in rows] + [(d.device_id, d.error) for d in devices], default=str)[:2000]

    # -- the end -----------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop_traffic.set()
        if self._traffic is not None:
            self._traffic.join(10)
        time.sleep(2)  # the last windows are closed, sent and confirmed
        for agent in self.agents.values():
            agent.stop()
        for device in self.devices:  # windows not confirmed yet stay on the device, to be sent when it is back
            db = sqlite3.connect(self.data_dir(device) / "outbox.sqlite")
            for (key,) in db.execute("SELECT key FROM outbox WHERE key LIKE 'telemetry:%'"):
                _, session, seq = key.split(":")
                self.waiting.append((device, int(session), int(seq)))
            db.close()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(30)
        self.app.stop()

    def cleanup(self) -> None:
        for agent in self.agents.values():
            if agent.proc.poll() is None:
                os.kill(agent.proc.pid, signal.SIGCONT)
                agent.proc.kill()
                agent.proc.wait()
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        for path in self.mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)

    def books(self) -> dict[str, Any]:
        """Windows per agent run: stored on the server or still in the agent's outbox; gaps and repeats."""
        app = ServerApp(self.data, metrics_port=0, drift_interval=0, rollout_interval=0)
        with Session(app.registry.engine) as db:
            stored = [tuple(r) for r in db.exec(select(TelemetryRow.device_id, TelemetryRow.session,
                                                       TelemetryRow.window_seq)).all()]
            devices = db.exec(select(Device)).all()
            rollout = db.exec(select(Rollout)).one()
            rollout_devices = db.exec(select(RolloutDevice)).all()
            chain = audit.verify(db)
        app.registry.engine.dispose()
        waiting = self.waiting
        by: dict[tuple[str, int], list[int]] = defaultdict(list)
        for device, session, seq in stored + waiting:
            by[(device, session)].append(seq)
        # a run stopped gracefully logged how many windows it closed: none may be missing at its end either
        closed: dict[tuple[str, int], int] = {}
        for device in self.devices:
            for m in re.finditer(r"this run \(session (\d+)\) closed (\d+) reporting windows",
                                 (self.tmp / f"{device}.log").read_text(errors="replace")):
                closed[(device, int(m.group(1)))] = int(m.group(2))
        lost = {}
        for k in set(by) | {k for k, n in closed.items() if n}:
            top = max(closed.get(k, 0), max(by.get(k, [-1])) + 1)
            missing = sorted(set(range(top)) - set(by.get(k, [])))
            if missing:
                lost[k] = missing
        return {"stored": len(stored), "waiting": len(waiting), "lost": lost, "closed": closed,
                "runs": by, "devices": devices, "rollout": rollout,
                "rollout_devices": rollout_devices, "chain": chain}


def _scenario(plan: Plan, bundle: Any, tmp: Path) -> None:
    if plan.disk_full and os.geteuid() != 0:
        pytest.skip("the disk-full fault mounts a small tmpfs, which needs root")
    chaos = Chaos(plan, bundle, tmp)
    try:
        chaos.enrol()
        chaos.start_traffic()
        time.sleep(3)
        if plan.broker_kill:
            chaos.kill_broker()
        if plan.freeze:
            chaos.freeze()
        if plan.tamper:
            chaos.tamper()
        chaos.roll_out()
        chaos.stop()
    finally:
        chaos.cleanup()
    books = chaos.books()
    print(f"\n{'fault':<58} | outcome")
    for fault, outcome in chaos.faults:
        print(f"{fault:<58} | {outcome}")
    lost = sum(map(len, books["lost"].values()))
    print(f"windows: {books['stored']} stored, {books['waiting']} still in an outbox, {lost} lost (of "
          f"{sum(books['closed'].values())} that gracefully stopped runs say they closed, and every run's gaps); "
          f"sent again and dropped as duplicates by the in-process replica: "
          f"{chaos.app.ingestor.accepted['duplicate']} (a window is stored once: its key is the table's)")
    assert not books["lost"], f"windows lost: {books['lost']}"
    assert len(books["closed"]) >= len(chaos.devices)  # every agent's last run said how many windows it closed
    assert {d for d, _ in books["runs"]} == set(chaos.devices)
    assert all(len(v) >= 5 for (d, _), v in books["runs"].items() if d not in (KILL_DOWNLOAD, KILL_INSTALL, DISK_FULL))
    # every device runs a verified model: the version rolled out, installed and reported by the agent itself
    assert all(d.running_manifest == chaos.v2 and d.install_step == "done" for d in books["devices"]), [
        (d.id, d.running_manifest == chaos.v2, d.install_step) for d in books["devices"]]
    assert books["rollout"].state == "completed"
    assert sorted(r.device_id for r in books["rollout_devices"]) == chaos.devices
    assert all(r.state == "installed" for r in books["rollout_devices"])
    assert books["chain"].ok


def test_chaos_fast(digits_bundle, tmp_path):
    _scenario(FAST, digits_bundle, tmp_path)


@pytest.mark.slow
def test_chaos_full(digits_bundle, tmp_path):
    _scenario(FULL, digits_bundle, tmp_path)
