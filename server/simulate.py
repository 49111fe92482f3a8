"""A fleet simulator: many lightweight devices that speak the real protocol.

Each simulated device is a real MQTT 5 connection with its own credentials
and last will; it publishes an online state and a hello, then one
telemetry window (and, when the device runs a bundle with a reference
profile, feature statistics) per interval. Drift can be injected into the
statistics of chosen devices. Devices are spread over worker processes, each
driving its share of connections, so the simulator itself does not become
the bottleneck on a small machine.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import (
    DeviceState,
    FeatureStats,
    FeatureWindow,
    Hello,
    LatencySummary,
    ReferenceProfile,
    TelemetryWindow,
    TopicKind,
    device_topic,
    encode,
)
from protocol.messages import Fingerprint, will_message

__all__ = ["SimConfig", "SimResult", "simulate"]


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


@dataclass
class SimResult:
    sent: int = 0
    acked: int = 0
    failed_connects: int = 0
    per_device: dict[str, int] = field(default_factory=dict)


def _run_shard(cfg: SimConfig, ids: list[str], out: mp.Queue) -> None:  # type: ignore[type-arg]
    clients: dict[str, mqtt.Client] = {}
    acked = 0
    lock = threading.Lock()
    failed = 0

    def on_publish(client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        nonlocal acked
        with lock:
            acked += 1

    session = int(time.time() * 1000)
    for device_id in ids:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(device_id, cfg.devices[device_id])
        topic, payload = will_message(device_id, session)
        c.will_set(topic, payload, qos=1, retain=True)
        c.on_publish = on_publish
        try:
            c.connect(cfg.host, cfg.port, keepalive=60)
        except OSError:
            failed += 1
            continue
        c.loop_start()
        clients[device_id] = c
    time.sleep(1.0)
    fp = Fingerprint(arch="x86_64", os="simulated", python="3.11", cpu_count=1, memory_bytes=1 << 30,
                     disk_free_bytes=1 << 30)
    for device_id, c in clients.items():
        c.publish(device_topic(device_id, TopicKind.STATE), encode(DeviceState(
            device_id=device_id, status="online", session=session, seq=0, reason="connected")), qos=1, retain=True)
        c.publish(device_topic(device_id, TopicKind.HELLO), encode(Hello(
            device_id=device_id, session=session, agent_version="0.0.0-sim", protocols=[1], fingerprint=fp)), qos=1)
    sent = 2 * len(clients)
    per_device = dict.fromkeys(clients, 0)
    rng = np.random.default_rng(abs(hash(tuple(ids))) % 2**32)
    start = time.monotonic()
    seq = 0
    while time.monotonic() - start < cfg.seconds:
        tick = time.monotonic()
        now = datetime.now(timezone.utc)
        for device_id, c in clients.items():
            window = TelemetryWindow(
                device_id=device_id, session=session, window_seq=seq, start=now - timedelta(seconds=cfg.interval),
                end=now, requests=10, errors=0,
                latency_ms=LatencySummary(p50=1.0, p95=2.0, p99=3.0, max=4.0, mean=1.2))
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


def simulate(cfg: SimConfig) -> SimResult:
    ids = sorted(cfg.devices)
    shards = [ids[i :: cfg.processes] for i in range(cfg.processes)]
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_run_shard, args=(cfg, s, out)) for s in shards if s]
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
