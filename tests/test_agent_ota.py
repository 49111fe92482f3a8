"""The agent updates itself (agent/selfupdate.py, hardware/templates/edgeherd-launch.sh, server/agent_releases.py):
a signed agent release rolls out in waves to real agent processes on a real server, broker and database, and a
release whose agent crashes at start is switched back by the device's launcher and stops the rollout.

No systemd here: the test is the service manager. It runs each device's launcher in a loop (Restart=always),
with the agent environments made from wheels of this source: the old agent's, a newer one's, and a broken one's
(its ``main`` raises). The dependencies come from the test's own environment through PYTHONPATH (every entry of
its site-packages but edgeherd's own), so the releases hold only the edgeherd wheel and install in seconds.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import threading
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename
from sqlmodel import Session, col, select

from agent.download import Download
from agent.selfupdate import SelfUpdate
from agent.trust import Trust
from hardware.wheelhouse import agent_wheel
from protocol import (
    AgentRelease,
    AgentUpdateStep,
    generate_signing_key,
    sign_agent_release,
)
from server import audit
from server.agent_releases import AgentReleaseError, advance, inspect, push, start_rollout
from server.app import ServerApp
from server.db.models import AgentRollout, AgentRolloutDevice, AuditEntry, Device
from tests.server_helpers import server_dir, wait_for
from tests.tls_device_helpers import reachable

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "hardware" / "templates" / "edgeherd-launch.sh"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


# --- wheels and environments ----------------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def rewheel(src: Path, dest: Path, version: str, patch: dict[str, tuple[bytes, bytes]] | None = None) -> Path:
    """A copy of the edgeherd wheel ``src`` as ``version``; ``patch``: {file: (old, new)} replaced in it."""
    old_info = f"edgeherd-{parse_wheel_filename(src.name)[1]}.dist-info"
    info = f"edgeherd-{version}.dist-info"
    out = dest / f"edgeherd-{version}-py3-none-any.whl"
    dest.mkdir(parents=True, exist_ok=True)
    record = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            name, data = item.filename, zin.read(item.filename)
            if name == f"{old_info}/RECORD":
                continue
            if name.startswith(old_info + "/"):
                name = info + name[len(old_info):]
            if name == f"{info}/METADATA":
                data = re.sub(rb"(?m)^Version: .*$", b"Version: " + version.encode(), data)
            if patch and name in patch:
                old, new = patch[name]
                assert old in data, f"{old!r} is not in {name}"
                data = data.replace(old, new)
            zout.writestr(name, data)
            record.append(f"{name},{_record_hash(data)},{len(data)}")
        record.append(f"{info}/RECORD,,")
        zout.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return out


def release_dir(path: Path, wheel: Path) -> Path:
    """A release directory as `edgeherd flash` leaves one: the wheelhouse and its hash-pinned requirements."""
    (path / "wheelhouse").mkdir(parents=True)
    shutil.copy(wheel, path / "wheelhouse" / wheel.name)
    version = parse_wheel_filename(wheel.name)[1]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (path / "requirements.txt").write_text(f"edgeherd=={version} --hash=sha256:{digest}\n")
    return path


def deps_path(dest: Path) -> Path:
    """This environment's site-packages without edgeherd: what PYTHONPATH gives the agents' environments."""
    dest.mkdir(parents=True, exist_ok=True)
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            if "edgeherd" in entry.name.lower() or entry.name.startswith("__editable__"):
                continue
            if not (dest / entry.name).is_symlink():
                (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """The old agent's environment and the good and bad releases' directories."""
    base = reachable(tmp_path_factory.mktemp("ota"))
    old_wheel = agent_wheel(base / "old")
    old_version = str(parse_wheel_filename(old_wheel.name)[1])
    good = rewheel(old_wheel, base / "good", f"{old_version}.post1")
    bad = rewheel(old_wheel, base / "bad", f"{old_version}.post2", patch={
        "agent/cli.py": (b"def main() -> None:\n    app()",
                         b"def main() -> None:\n    raise RuntimeError('this agent is broken')")})
    deps = deps_path(base / "deps")
    env = base / "old-env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "--isolated", "--disable-pip-version-check", "install",
                    "--quiet", "--no-index", "--no-deps", str(old_wheel)], check=True)
    return {"old_env": env, "old_version": old_version, "deps": deps,
            "good": release_dir(base / "good-release", good), "good_version": f"{old_version}.post1",
            "bad": release_dir(base / "bad-release", bad), "bad_version": f"{old_version}.post2"}


# --- the fleet: a server, and each device's launcher restarted as a service manager would ---------------------


class Launched:
    """A device's launcher run again whenever it exits (Restart=always, RestartSec=0.2)."""

    def __init__(self, home: Path, fallback: Path, config: Path, env: dict[str, str], log: Path) -> None:
        self.stopping = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.exits: list[int] = []
        self._args = (home, fallback, config, env, log)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        home, fallback, config, env, log = self._args
        home.mkdir(parents=True, exist_ok=True)
        while not self.stopping.is_set():
            with log.open("ab") as out:
                self.proc = subprocess.Popen(["sh", str(LAUNCHER), str(home), str(fallback), "run", "--config",
                                              str(config)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                             cwd=home.parent)
            self.exits.append(self.proc.wait())
            self.stopping.wait(0.2)

    def stop(self) -> None:
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._thread.join(30)


class Fleet:
    def __init__(self, tmp: Path, wheels: dict) -> None:
        self.tmp, self.wheels = reachable(tmp), wheels
        self.data, self.key = server_dir(self.tmp / "server")
        # the server's own orchestrator loop moves agent rollouts on (Orchestrator.step, every 0.5 s)
        self.app = ServerApp(self.data, metrics_port=0, drift_interval=3600, rollout_interval=0.5).start()
        self.reg = self.app.registry
        self.launched: dict[str, Launched] = {}

    def start(self, device_id: str) -> None:
        enrolled = self.reg.add_device(device_id, "x86-64", ["lab"], custom_profile=True)
        config = shutil.copytree(enrolled.agent_config.parent, self.tmp / device_id) / "agent.toml"
        data = self.tmp / f"{device_id}-data"
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(self.wheels["deps"]),
               "EDGEHERD_AGENT_DATA_DIR": str(data), "EDGEHERD_AGENT_API_PORT": "0",
               "EDGEHERD_AGENT_WINDOW_SECONDS": "3600"}
        self.launched[device_id] = Launched(data / "agent", self.wheels["old_env"], config, env,
                                            self.tmp / f"{device_id}.log")

    def device(self, device_id: str) -> Device:
        with Session(self.reg.engine) as db:
            found = db.get(Device, device_id)
            assert found is not None
            return found

    def rollout(self) -> AgentRollout:
        with Session(self.reg.engine) as db:
            return db.exec(select(AgentRollout)).one()

    def records(self) -> dict[str, AgentRolloutDevice]:
        with Session(self.reg.engine) as db:
            return {r.device_id: r for r in db.exec(select(AgentRolloutDevice)).all()}

    def wait_rollout(self, state: str, timeout: float) -> AgentRollout:
        """Wait for the server's orchestrator to move the agent rollout to ``state``."""
        def reached() -> AgentRollout | None:
            r = self.rollout()
            assert r.state in ("running", state), f"the rollout is {r.state}: {r.reason}"
            return r if r.state == state else None

        return wait_for(reached, timeout, f"the agent rollout to be {state}", poll=0.5)

    def close(self) -> None:
        for launched in self.launched.values():
            launched.stop()
        self.app.stop()


@pytest.fixture
def fleet(tmp_path, wheels):
    f = Fleet(tmp_path, wheels)
    yield f
    f.close()


def _online(fleet: Fleet, device_id: str, version: str) -> None:
    wait_for(lambda: (d := fleet.device(device_id)).status == "online" and d.agent_version == version, 90,
             f"{device_id} online with agent {version}")


@pytest.mark.integration
def test_an_agent_release_rolls_out_in_waves(fleet, wheels):
    for d in ("dev-1", "dev-2"):
        fleet.start(d)
    for d in ("dev-1", "dev-2"):
        _online(fleet, d, wheels["old_version"])
    push(fleet.reg, wheels["good"], fleet.key, PY, "alice")
    new = wheels["good_version"]
    start_rollout(fleet.reg, new, {"groups": ["lab"]}, ["1", "100%"], 180, "alice")
    records = fleet.records()
    assert list(records) == ["dev-1"] and records["dev-1"].wave == 0  # the canary alone
    assert fleet.device("dev-2").desired_agent is None
    fleet.wait_rollout("done", 240)
    records = fleet.records()
    assert {d: (r.wave, r.state) for d, r in records.items()} == {"dev-1": (0, "done"), "dev-2": (1, "done")}
    for d in ("dev-1", "dev-2"):
        device = fleet.device(d)
        assert device.agent_version == new and device.status == "online"
        assert device.agent_update == {"version": new, "step": "done"}
        home = fleet.tmp / f"{d}-data" / "agent"
        assert (home / "current").resolve().name.startswith(new) and not (home / "trial").exists()
    with Session(fleet.reg.engine) as db:
        actions = [e.action for e in db.exec(select(AuditEntry).where(col(AuditEntry.action).startswith("agent."))
                                             .order_by(col(AuditEntry.seq)))]
        assert actions == ["agent.push", "agent.rollout.start", "agent.rollout.wave", "agent.rollout.wave",
                           "agent.rollout.done"]
        assert audit.verify(db).ok


@pytest.mark.integration
def test_an_agent_that_does_not_start_is_switched_back_and_stops_the_rollout(fleet, wheels):
    for d in ("dev-1", "dev-2"):
        fleet.start(d)
    for d in ("dev-1", "dev-2"):
        _online(fleet, d, wheels["old_version"])
    push(fleet.reg, wheels["bad"], fleet.key, PY, "alice")
    bad = wheels["bad_version"]
    start_rollout(fleet.reg, bad, {"groups": ["lab"]}, ["1", "100%"], 180, "alice")
    rollout = fleet.wait_rollout("failed", 240)
    assert rollout.reason is not None and rollout.reason.startswith("dev-1: rolled_back: ")
    assert "did not report healthy in 3 starts" in rollout.reason
    assert list(fleet.records()) == ["dev-1"]  # the second wave was never assigned
    assert fleet.device("dev-2").desired_agent is None
    _online(fleet, "dev-1", wheels["old_version"])  # the old agent is back, by itself
    assert fleet.device("dev-1").agent_update["step"] == "rolled_back"
    assert fleet.launched["dev-1"].exits.count(1) >= 3  # the broken agent crashed, the launcher gave up on it
    home = fleet.tmp / "dev-1-data" / "agent"
    assert not (home / "current").exists() and not (home / "trial").exists()
    before = len(fleet.launched["dev-1"].exits)
    advance(fleet.reg)  # the old agent does not try the failed release again from its retained desired state
    wait_for(lambda: fleet.device("dev-1").status == "online", 30, "dev-1 online")
    assert len(fleet.launched["dev-1"].exits) == before


# --- refused releases -----------------------------------------------------------------------------------------


class _Downloader:
    """Fills a download with the given bytes, as the MQTT downloader would from a server holding them."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def fetch(self, dl: Download) -> None:
        os.pwrite(dl._fd, self.data, 0)
        dl.have = set(range(dl.chunks))
        dl.persist()


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _updater(tmp: Path, key, payload: bytes) -> tuple[SelfUpdate, list[str]]:
    restarts: list[str] = []
    up = SelfUpdate(tmp, Trust(key.public_key()), _Downloader(payload), 16 * 1024, lambda: None,  # type: ignore[arg-type]
                    restart=lambda: restarts.append("restart"))
    up.start()
    return up, restarts


def _release(key, payload: bytes, sha: str | None = None):
    sha = sha or hashlib.sha256(payload).hexdigest()
    return sign_agent_release(AgentRelease(version="9.9.9", python=PY, sha256=sha, size=len(payload),
                                           created_at=datetime.now(timezone.utc)), key)


def test_a_release_signed_by_another_key_is_refused(tmp_path):
    server, other = generate_signing_key(), generate_signing_key()
    payload = _tar({"requirements.txt": b""})
    up, restarts = _updater(tmp_path, server, payload)
    up.on_release(_release(other, payload))
    assert up.status is not None and up.status.step is AgentUpdateStep.FAILED
    assert "does not trust" in (up.status.error or "") and not restarts
    assert not (tmp_path / "agent" / "envs").exists()


def test_an_artifact_with_the_wrong_sha256_is_refused_and_never_installed(tmp_path):
    key = generate_signing_key()
    payload = _tar({"requirements.txt": b""})
    up, restarts = _updater(tmp_path, key, payload)
    up.on_release(_release(key, payload, sha="0" * 64))
    assert up.status is not None and up.status.step is AgentUpdateStep.FAILED
    assert "does not match its sha256" in (up.status.error or "") and not restarts
    assert not (tmp_path / "agent" / "current").exists()
    up.on_release(_release(key, payload, sha="0" * 64))  # failed once: not tried again
    assert not (tmp_path / "downloads" / f"{'0' * 64}.part").exists()


@pytest.mark.parametrize(("files", "why"), [
    ({"../evil.whl": b"x", "requirements.txt": b""}, "may hold only"),
    ({"wheelhouse/x.whl": b"x", "requirements.txt": b"", "wheelhouse/run.sh": b"x"}, "may hold only"),
])
def test_a_release_tar_with_other_paths_is_refused_by_the_device(tmp_path, files, why):
    key = generate_signing_key()
    payload = _tar(files)
    up, restarts = _updater(tmp_path, key, payload)
    up.on_release(_release(key, payload))
    assert up.status is not None and up.status.step is AgentUpdateStep.FAILED
    assert why in (up.status.error or "") and not restarts


@pytest.mark.parametrize(("files", "why"), [
    ({"requirements.txt": b"edgeherd==1.0\n", "wheelhouse/edgeherd-1.0-py3-none-any.whl": b"x"}, "without --hash"),
    ({"requirements.txt": b"", "wheelhouse/../x.whl": b"x"}, "holds"),
    ({"requirements.txt": b""}, "exactly one edgeherd wheel"),
])
def test_a_release_the_server_cannot_vouch_for_is_refused_at_push(tmp_path, files, why):
    tar = tmp_path / "r.tar"
    tar.write_bytes(_tar(files))
    with pytest.raises(AgentReleaseError, match=why):
        inspect(tar)


# --- the desired state keeps the agent release ------------------------------------------------------------------


def _retained_desired(reg, device_id: str):  # type: ignore[no-untyped-def]
    """The desired state the broker holds retained for ``device_id``, as a device connecting now would get it."""
    import queue

    from protocol import DesiredState, TopicKind, decode, device_topic

    got: queue.Queue[bytes] = queue.Queue()
    topic = device_topic(device_id, TopicKind.DESIRED)
    with reg.client() as bus:
        bus.route(topic, lambda _topic, payload: got.put(payload))
        assert bus.subscribe(topic, qos=1, wait=10)
        return decode(DesiredState, got.get(timeout=10))


@pytest.mark.integration
def test_an_offline_devices_agent_release_survives_a_key_rotation_and_a_republish(tmp_path):
    """A device assigned an agent release while offline finds it in its retained desired state even after a key
    rotation and a republish replaced that message (each builds the desired state from the device's record)."""
    from server.signing_keys import start_rotation

    data, key = server_dir(reachable(tmp_path) / "server")
    app = ServerApp(data, metrics_port=0, drift_interval=3600, rollout_interval=0).start()
    try:
        reg = app.registry
        reg.add_device("dev-off", "x86-64", ["lab"], custom_profile=True)  # enrolled, never connects
        wheel = b"not installed here: the device never fetches it in this test"
        name = "edgeherd-9.9.9-py3-none-any.whl"
        req = f"edgeherd==9.9.9 --hash=sha256:{hashlib.sha256(wheel).hexdigest()}\n".encode()
        tar = tmp_path / "release.tar"
        tar.write_bytes(_tar({"requirements.txt": req, f"wheelhouse/{name}": wheel}))
        release = push(reg, tar, key, PY, "alice")
        start_rollout(reg, "9.9.9", {"devices": ["dev-off"]}, ["100%"], 600, "alice")

        first = _retained_desired(reg, "dev-off")
        assert first.agent is not None and first.agent.release.version == "9.9.9" and first.keyset is None
        start_rotation(reg, "alice")
        rotated = _retained_desired(reg, "dev-off")
        assert rotated.keyset is not None and rotated.keyset.keyset.serial == 1
        assert rotated.agent == first.agent, "the key rotation's publish dropped the agent release"
        with reg.client() as bus:
            assert reg.republish_desired(bus) == 1  # a device with an agent release and no model is republished
        again = _retained_desired(reg, "dev-off")
        assert again.agent == first.agent and again.keyset == rotated.keyset
        with Session(reg.engine) as db:
            stored = db.get(Device, "dev-off")
            assert stored is not None and stored.desired_agent == release.digest
    finally:
        app.stop()
