"""A fleet simulator: many lightweight devices that speak the real protocol.

Each simulated device is a real MQTT 5 connection with its own credentials
(:class:`~server.broker.DeviceCredentials`, as the registry issues them) and
last will; it publishes an online state and a hello (reporting the
runtimes of this installation, :func:`local_runtimes`), then one
telemetry window (and, when the device runs a bundle with a reference
profile, feature statistics) per interval. Drift can be injected into the
statistics of chosen devices. Devices are spread over worker processes, each
driving its share of connections, so the simulator itself does not become
the bottleneck on a small machine; once every worker's devices are logged in,
they all start sending together.

On an ``mqtts://`` listener every device connects over TLS 1.2+ as an agent
does: with its own certificate and key, verifying the broker's certificate
against the device's CA bundle (the system's CAs for a password device that
has none) and checking that it names the host of the broker URL. The TLS
contexts are built in the worker processes (they cannot be pickled); Python's
ssl loads a certificate chain from files only, so each worker writes its
devices' certificates and keys to a private temporary directory (0700,
files 0600) and removes them once loaded.

With ``follow_desired`` the devices also act on their desired state as an
agent would, without running anything: after ``install_s`` they report the
new bundle as running (install step ``done``), and from then on their
telemetry carries its manifest digest and the error rate and latency that
:class:`Behaviour` gives that manifest, so rollouts and their gates can be
exercised against a fleet of hundreds on one machine.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt

from hardware.files import atomic_write
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
from server.broker import DeviceCredentials
from server.bus import new_client

__all__ = ["PROFILE", "Behaviour", "SimConfig", "SimResult", "device_tls_context", "load_credentials",
           "local_runtimes", "simulate", "store_credentials"]

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


#: Where ``edgeherd fleet simulate`` keeps its devices' credentials, in ``<data>/simulator`` (0700, the file 0600).
CREDENTIALS_FILE = "credentials.json"
#: What it kept before devices had certificates: {device id: password}.
LEGACY_PASSWORDS_FILE = "passwords.json"


def store_credentials(directory: Path, creds: Mapping[str, DeviceCredentials]) -> Path:
    """Keep simulated devices' credentials in ``directory/credentials.json``: {device id: {"password": ...} or
    {"certificate", "key", "ca_bundle" (PEM text), "serial"}}; the directory 0700, the file 0600 (keys inside).
    Removes the legacy ``passwords.json``: ``creds`` is what the devices log in with from then on."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    entries = {}
    for device_id, c in creds.items():
        entry: dict[str, str | int] = {}
        if c.password is not None:
            entry["password"] = c.password
        for name in ("certificate", "key", "ca_bundle"):
            pem = getattr(c, name)
            if pem is not None:
                entry[name] = pem.decode()
        if c.serial is not None:
            entry["serial"] = c.serial
        entries[device_id] = entry
    path = directory / CREDENTIALS_FILE
    atomic_write(path, json.dumps(entries), 0o600)
    (directory / LEGACY_PASSWORDS_FILE).unlink(missing_ok=True)
    return path


def load_credentials(directory: Path) -> dict[str, DeviceCredentials]:
    """What :func:`store_credentials` kept (or the legacy ``passwords.json``); {} when neither exists. ValueError
    naming the file when it is not what :func:`store_credentials` writes."""
    path = directory / CREDENTIALS_FILE
    legacy = directory / LEGACY_PASSWORDS_FILE
    try:
        if path.exists():
            out = {}
            for device_id, entry in json.loads(path.read_text()).items():
                pem = {k: entry[k].encode() for k in ("certificate", "key", "ca_bundle") if entry.get(k) is not None}
                out[device_id] = DeviceCredentials(password=entry.get("password"), serial=entry.get("serial"), **pem)
            return out
        if legacy.exists():
            return {d: DeviceCredentials(password=str(p)) for d, p in json.loads(legacy.read_text()).items()}
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise ValueError(f"{path if path.exists() else legacy} is not a simulator credentials file ({exc}); remove "
                         "it (and the simulated devices with it) to start over") from None
    return {}


@dataclass(frozen=True)
class Behaviour:
    """How a simulated device running a given manifest behaves."""

    error_rate: float = 0.0
    p95_ms: float = 2.0


@dataclass(frozen=True)
class SimConfig:
    #: The devices' listener as agent configs name it (``Registry.broker_url``): ``mqtt://HOST:PORT``, or
    #: ``mqtts://HOST:PORT`` for TLS, where the broker's certificate must name HOST.
    broker_url: str
    #: Device id -> what it logs in with (``Registry.add_devices_bulk``): a certificate and key (TLS only) or a
    #: password.
    devices: Mapping[str, DeviceCredentials]
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
    #: How long to wait for every device's CONNACK before counting the silent ones as failed connects.
    connect_timeout: float = 60.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.broker_url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port == -1:
            raise ValueError(f"broker URL {self.broker_url!r}: give mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)")
        for device_id, creds in self.devices.items():
            if creds.certificate is not None:
                if creds.key is None:
                    raise ValueError(f"device {device_id} has a certificate but no key")
                if parts.scheme != "mqtts":
                    raise ValueError(f"device {device_id} logs in with a certificate, which needs TLS, but "
                                     f"{self.broker_url} is plain MQTT: give the mqtts:// listener")
            elif creds.password is None:
                raise ValueError(f"device {device_id} has neither a certificate nor a password")

    @property
    def host(self) -> str:
        """The broker's host name (or address), as its certificate must name it on TLS."""
        return urlsplit(self.broker_url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.broker_url).port or (8883 if self.tls else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker_url).scheme == "mqtts"


@dataclass
class SimResult:
    sent: int = 0
    acked: int = 0
    failed_connects: int = 0
    per_device: dict[str, int] = field(default_factory=dict)
    #: Seconds from a worker's first connection attempt until every one of its devices was answered (the
    #: slowest worker's): the cost of the logins, TLS handshakes included.
    connect_s: float = 0.0


def _run_shard(cfg: SimConfig, ids: list[str], out: mp.Queue, stop: Any = None,  # type: ignore[type-arg]
               together: Any = None) -> None:
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

    # whether each device's login was accepted (absent: no answer yet)
    answered: dict[str, bool] = {}

    def on_connect(device_id: str, client: mqtt.Client, reason: Any) -> None:
        with lock:
            answered[device_id] = not reason.is_failure
        if reason.is_failure:
            client.disconnect()  # a refused login: no retries
        elif cfg.follow_desired:
            client.subscribe(device_topic(device_id, TopicKind.DESIRED), qos=1)

    def on_disconnect(device_id: str) -> None:
        with lock:
            answered.setdefault(device_id, False)  # dropped before a CONNACK: the broker refused its certificate

    contexts = _tls_contexts(cfg, ids) if cfg.tls else {}
    connecting = time.monotonic()
    for device_id in ids:
        creds = cfg.devices[device_id]
        c = new_client(device_id, device_id, creds.password, tls=contexts.pop(device_id) if cfg.tls else None)
        topic, payload = will_message(device_id, session)
        c.will_set(topic, payload, qos=1, retain=True)
        c.on_publish = on_publish
        c.on_connect = lambda cl, u, f, rc, p, d=device_id: on_connect(d, cl, rc)
        c.on_disconnect = lambda cl, u, f, rc, p, d=device_id: on_disconnect(d)
        if cfg.follow_desired:
            c.on_message = lambda cl, u, m, d=device_id: on_desired(d, bytes(m.payload))
        try:
            c.connect(cfg.host, cfg.port, keepalive=60)  # on TLS, the handshake runs here
        except OSError:  # ssl.SSLError included: the broker's certificate not signed by the CA, or for another name
            failed += 1
            continue
        c.loop_start()
        clients[device_id] = c
    deadline = time.monotonic() + cfg.connect_timeout
    while time.monotonic() < deadline:
        with lock:
            if len(answered.keys() & clients.keys()) == len(clients):
                break
        time.sleep(0.05)
    with lock:
        refused = [d for d in clients if not answered.get(d)]  # refused, or never answered
    connect_s = time.monotonic() - connecting
    for device_id in refused:
        c = clients.pop(device_id)
        c.disconnect()
        c.loop_stop()
        failed += 1
    if together is not None:  # every worker has its devices logged in: the fleet starts sending at once
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait(cfg.connect_timeout + 60)
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
    out.put((sent, acked, failed, per_device, connect_s))


def device_tls_context(creds: DeviceCredentials, scratch: Path) -> ssl.SSLContext:
    """A device's TLS client context, as its agent builds one: TLS 1.2+, the broker's certificate verified
    against the device's CA bundle (the system's CAs when it has none) and its host name checked; the device's
    own certificate and key loaded, when it has them, through files in ``scratch`` (a private directory) that
    are removed once read."""
    ctx = ssl.create_default_context(cadata=creds.ca_bundle.decode() if creds.ca_bundle else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if creds.certificate is not None and creds.key is not None:
        fd, cert = tempfile.mkstemp(dir=scratch, suffix=".pem")  # 0600
        with os.fdopen(fd, "wb") as f:
            f.write(creds.certificate)
        fd, key = tempfile.mkstemp(dir=scratch, suffix=".key")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(creds.key)
            ctx.load_cert_chain(cert, key)
        finally:
            os.unlink(cert)
            os.unlink(key)
    return ctx


def _tls_contexts(cfg: SimConfig, ids: list[str]) -> dict[str, ssl.SSLContext]:
    with tempfile.TemporaryDirectory(prefix="edgeherd-sim-") as scratch:  # 0700, removed with whatever is left
        return {d: device_tls_context(cfg.devices[d], Path(scratch)) for d in ids}


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
    """Run the simulated fleet for ``cfg.seconds`` (or until ``stop``, a multiprocessing Event, is set).

    A device whose connection fails (the TLS handshake or the login refused, or no CONNACK within
    ``cfg.connect_timeout``) counts in ``failed_connects`` and sends nothing."""
    ids = sorted(cfg.devices)
    shards = [s for s in (ids[i :: cfg.processes] for i in range(cfg.processes)) if s]
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    together = ctx.Barrier(len(shards)) if shards else None
    procs = [ctx.Process(target=_run_shard, args=(cfg, s, out, stop, together)) for s in shards]
    for p in procs:
        p.start()
    result = SimResult()
    for _ in procs:
        sent, acked, failed, per_device, connect_s = out.get(timeout=cfg.seconds + cfg.connect_timeout + 300)
        result.connect_s = max(result.connect_s, connect_s)
        result.sent += sent
        result.acked += acked
        result.failed_connects += failed
        result.per_device.update(per_device)
    for p in procs:
        p.join(30)
    return result
