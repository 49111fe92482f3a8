"""A fleet simulator: many lightweight devices that speak the real protocol.

Each simulated device is a real MQTT 5 connection with its own credentials
and last will; it publishes an online state and a hello (reporting the
runtimes of this installation, :func:`local_runtimes`), then one
telemetry window (and, when the device runs a bundle with a reference
profile, feature statistics) per interval. Drift can be injected into the
statistics of chosen devices. Devices are spread over worker processes, each
driving its share of connections, so the simulator itself does not become
the bottleneck on a small machine.

With ``follow_desired`` the devices also act on their desired state as an
agent would, without running anything: after ``install_s`` they report the
new bundle as running (install step ``done``), and from then on their
telemetry carries its manifest digest and the error rate and latency that
:class:`Behaviour` gives that manifest, so rollouts and their gates can be
exercised against a fleet of hundreds on one machine.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import (
    DesiredState,
    DeviceState,
    FeatureStats,
    FeatureWindow,
    Hello,
    InstallStatus,
    InstallStep,
    InvalidMessage,
    LatencySummary,
    ReferenceProfile,
    RunningBundle,
    TelemetryWindow,
    TopicKind,
    decode,
    device_topic,
    encode,
    manifest_digest,
)
from protocol.messages import Fingerprint, will_message

__all__ = ["PROFILE", "Behaviour", "SimConfig", "SimResult", "local_runtimes", "simulate"]

#: The hardware profile simulated devices are enrolled with: a custom one (no latency budget, the general
#: artifact order), as no board has it.
PROFILE = "simulated"


def local_runtimes() -> dict[str, str]:
    """The CPU inference runtimes installed here and their versions. Simulated devices report these in their
    hello (the server gives a device only artifacts its reported runtimes can load): they run nothing, so they
    can take whatever this installation builds."""
    found = {}
    for name in ("onnxruntime", "ai-edge-litert"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class Behaviour:
    """How a simulated device running a given manifest behaves."""

    error_rate: float = 0.0
    p95_ms: float = 2.0


@dataclass(frozen=True)
class SimConfig:
    host: str
    port: int
    devices: dict[str, str]  # device id -> password
    seconds: float = 60.0
    interval: float = 1.0
    processes: int = 4
    #: With a reference profile, each window also carries feature statistics drawn from it...
    reference: ReferenceProfile | None = None
    manifest_sha256: str | None = None
    samples: int = 50
    #: ...and these devices' inputs drift: every feature's mass tilts towards its low bins by ``drift``.
    drifting: frozenset[str] = frozenset()
    drift: float = 1.5
    #: Act on desired states like an agent (see the module docstring)...
    follow_desired: bool = False
    install_s: float = 0.5
    #: ...starting from this bundle (manifest digest, artifact), with this behaviour per manifest digest.
    running: tuple[str, str] | None = None
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    requests_per_window: int = 10
    #: The runtimes every device reports in its hello ({name: version}).
    runtimes: dict[str, str] = field(default_factory=local_runtimes)


@dataclass
class SimResult:
    sent: int = 0
    acked: int = 0
    failed_connects: int = 0
    per_device: dict[str, int] = field(default_factory=dict)


def _run_shard(cfg: SimConfig, ids: list[str], out: mp.Queue, stop: Any = None) -> None:  # type: ignore[type-arg]
    clients: dict[str, mqtt.Client] = {}
    running: dict[str, RunningBundle | None] = dict.fromkeys(ids)
    if cfg.running is not None:
        running = {d: RunningBundle(model="sim", version="0.0.0", manifest_sha256=cfg.running[0],
                                    artifact=cfg.running[1], slot="a") for d in ids}
    pending: dict[str, tuple[float, DesiredState]] = {}  # device -> (due, desired)
    seqs = dict.fromkeys(ids, 0)
    generations = dict.fromkeys(ids, 0)
    acked = 0
    lock = threading.Lock()
    failed = 0

    def on_publish(client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        nonlocal acked
        with lock:
            acked += 1

    session = int(time.time() * 1000)

    def on_desired(device_id: str, payload: bytes) -> None:
        try:
            desired = decode(DesiredState, payload)
        except InvalidMessage:
            return
        if desired.device_id != device_id or desired.bundle is None or desired.generation <= generations[device_id]:
            return
        generations[device_id] = desired.generation
        with lock:
            pending[device_id] = (time.monotonic() + cfg.install_s, desired)

    def state(device_id: str, install: InstallStatus | None = None) -> DeviceState:
        seqs[device_id] += 1
        return DeviceState(device_id=device_id, status="online", session=session, seq=seqs[device_id],
                           reason="update", running=running[device_id], install=install)

    for device_id in ids:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(device_id, cfg.devices[device_id])
        topic, payload = will_message(device_id, session)
        c.will_set(topic, payload, qos=1, retain=True)
        c.on_publish = on_publish
        if cfg.follow_desired:
            c.on_connect = lambda cl, u, f, rc, p, d=device_id: cl.subscribe(device_topic(d, TopicKind.DESIRED), qos=1)
            c.on_message = lambda cl, u, m, d=device_id: on_desired(d, bytes(m.payload))
        try:
            c.connect(cfg.host, cfg.port, keepalive=60)
        except OSError:
            failed += 1
            continue
        c.loop_start()
        clients[device_id] = c
    time.sleep(1.0)
    fp = Fingerprint(arch="x86_64", os="simulated", python="3.11", cpu_count=1, memory_bytes=1 << 30,
                     disk_free_bytes=1 << 30, runtimes=cfg.runtimes)
    for device_id, c in clients.items():
        c.publish(device_topic(device_id, TopicKind.STATE), encode(DeviceState(
            device_id=device_id, status="online", session=session, seq=0, reason="connected",
            running=running[device_id])), qos=1, retain=True)
        c.publish(device_topic(device_id, TopicKind.HELLO), encode(Hello(
            device_id=device_id, session=session, agent_version="0.0.0-sim", protocols=[1], fingerprint=fp)), qos=1)
    sent = 2 * len(clients)
    per_device = dict.fromkeys(clients, 0)
    rng = np.random.default_rng(abs(hash(tuple(ids))) % 2**32)
    start = time.monotonic()
    seq = 0
    while time.monotonic() - start < cfg.seconds and not (stop is not None and stop.is_set()):
        tick = time.monotonic()
        now = datetime.now(timezone.utc)
        with lock:
            due = [(d, desired) for d, (at, desired) in pending.items() if at <= tick]
            for d, _ in due:
                del pending[d]
        for device_id, desired in due:  # the install "finishes": report the new bundle as running
            assert desired.bundle is not None and desired.artifact is not None  # noqa: S101 - checked on receipt
            m = desired.bundle.manifest
            digest = manifest_digest(m)
            running[device_id] = RunningBundle(model=m.model, version=m.version, manifest_sha256=digest,
                                               artifact=desired.artifact, slot="b")
            install = InstallStatus(model=m.model, version=m.version, manifest_sha256=digest, step=InstallStep.DONE)
            if device_id in clients and clients[device_id].publish(
                    device_topic(device_id, TopicKind.STATE), encode(state(device_id, install)), qos=1,
                    retain=True).rc == 0:
                sent += 1
        for device_id, c in clients.items():
            bundle = running[device_id]
            behaviour = cfg.behaviours.get(bundle.manifest_sha256, Behaviour()) if bundle else Behaviour()
            n = cfg.requests_per_window
            p95 = behaviour.p95_ms
            window = TelemetryWindow(
                device_id=device_id, session=session, window_seq=seq, start=now - timedelta(seconds=cfg.interval),
                end=now, requests=n, errors=int(rng.binomial(n, behaviour.error_rate)),
                manifest_sha256=bundle.manifest_sha256 if bundle else None,
                latency_ms=LatencySummary(p50=p95 / 2, p95=p95, p99=p95 * 1.5, max=p95 * 2, mean=p95 * 0.6))
            if c.publish(device_topic(device_id, TopicKind.TELEMETRY), encode(window), qos=1).rc == 0:
                sent += 1
                per_device[device_id] += 1
            if cfg.reference is not None and cfg.manifest_sha256 is not None:
                stats = _stats(cfg, rng, device_id, session, seq, window.start, now)
                if c.publish(device_topic(device_id, TopicKind.STATS), encode(stats), qos=1).rc == 0:
                    sent += 1
        seq += 1
        time.sleep(max(0.0, cfg.interval - (time.monotonic() - tick)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            if acked >= sent:
                break
        time.sleep(0.1)
    for c in clients.values():
        c.disconnect()
        c.loop_stop()
    out.put((sent, acked, failed, per_device))


def _stats(cfg: SimConfig, rng: np.random.Generator, device_id: str, session: int, seq: int, start: datetime,
           end: datetime) -> FeatureStats:
    ref = cfg.reference
    assert ref is not None and cfg.manifest_sha256 is not None  # noqa: S101 - checked by the caller
    feats = []
    for f in ref.features:
        p = np.asarray(f.counts, dtype=np.float64) + 0.5
        if device_id in cfg.drifting:
            p *= np.exp(cfg.drift * np.linspace(1.0, -1.0, len(p)))
        counts = rng.multinomial(cfg.samples, p / p.sum())
        feats.append(FeatureWindow(name=f.name, version=f.version, counts=[int(c) for c in counts]))
    classes = None
    if ref.class_counts is not None:
        cp = np.asarray(ref.class_counts, dtype=np.float64) + 0.5
        classes = [int(c) for c in rng.multinomial(cfg.samples, cp / cp.sum())]
    return FeatureStats(device_id=device_id, session=session, window_seq=seq, start=start, end=end,
                        manifest_sha256=cfg.manifest_sha256, n=cfg.samples, features=feats, class_counts=classes)


def simulate(cfg: SimConfig, stop: Any = None) -> SimResult:
    """Run the simulated fleet for ``cfg.seconds`` (or until ``stop``, a multiprocessing Event, is set)."""
    ids = sorted(cfg.devices)
    shards = [ids[i :: cfg.processes] for i in range(cfg.processes)]
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_run_shard, args=(cfg, s, out, stop)) for s in shards if s]
    for p in procs:
        p.start()
    result = SimResult()
    for _ in procs:
        sent, acked, failed, per_device = out.get(timeout=cfg.seconds + 300)
        result.sent += sent
        result.acked += acked
        result.failed_connects += failed
        result.per_device.update(per_device)
    for p in procs:
        p.join(30)
    return result
