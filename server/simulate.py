"""A fleet simulator: many lightweight devices that speak the real protocol.

Each simulated device is a real MQTT 5 connection with its own credentials
(:class:`~server.broker.DeviceCredentials`, as the registry issues them) and
last will; it publishes an online state and a hello (reporting the
runtimes of this installation, :func:`local_runtimes`), then one
telemetry window (and, when the device runs a bundle with a reference
profile, feature statistics) per interval. Drift can be injected into the
statistics of chosen devices. Each device sends at its own phase within the
interval, so a fleet's windows are spread over it rather than all sent on
the same tick.

Devices are spread over worker processes (shards); each drives all its
connections from one thread through one selector, with paho's external event
loop (``socket()``, ``loop_read``/``loop_write``/``loop_misc`` and its socket
callbacks) rather than a thread and a socket pair per client, so 10,000
devices fit on two cores. Once every shard's devices are logged in, they all
start sending together. On a loopback broker the connections come from
several source addresses in 127.0.1.0/24 (:func:`source_addresses`), one per
:data:`DEVICES_PER_SOURCE` devices, as one address pair has only so many
ephemeral ports. A shard that dies stops the run loudly::

    ServerError (server/errors.py)
    └── SimulationError: a shard died (its error, or the signal that killed it)
        or this machine cannot hold its connections (open files, ports)

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
import errno
import heapq
import ipaddress
import json
import multiprocessing as mp
import os
import queue
import random
import resource
import selectors
import signal
import socket
import ssl
import tempfile
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
from server.errors import ServerError

__all__ = ["PROFILE", "Behaviour", "SimConfig", "SimResult", "SimulationError", "device_tls_context",
           "load_credentials", "local_runtimes", "simulate", "source_addresses", "store_credentials"]

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


class SimulationError(ServerError):
    """A shard of the simulator died or cannot run; the message names the shard and its error."""


#: Devices per source address on a loopback broker: each connection from one address to the broker holds one
#: of that address's ephemeral ports (net.ipv4.ip_local_port_range, about 28,000 by default).
DEVICES_PER_SOURCE = 8192
#: Errors of this machine, not of a device's login: a shard that meets one dies (and the run fails) rather than
#: counting its devices as refused.
_LOCAL_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                           errno.ENOMEM})
#: Seconds between two passes of paho's housekeeping over a shard's clients (a ping is due after 60 s
#: of silence; the broker gives up after 90).
_MISC_S = 5.0
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def source_addresses(host: str, devices: int) -> list[str]:
    """The local addresses the devices' connections come from: on an IPv4 loopback broker, one 127.0.1.x per
    :data:`DEVICES_PER_SOURCE` devices, so a large fleet does not run out of ephemeral ports on one address
    pair; elsewhere [""] (the system chooses)."""
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if not loopback:
        return [""]
    return [f"127.0.1.{k + 1}" for k in range(min(250, -(-devices // DEVICES_PER_SOURCE)))]


def _raise_open_files(needed: int) -> None:
    """Raise this process's soft limit of open files to ``needed`` (within the hard limit); SimulationError when
    the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SimulationError(f"this shard needs {needed} open files but the hard limit is {hard} (ulimit -Hn): "
                              "raise it or use more --processes")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class _Shard:
    """One worker process's devices: every connection driven by one thread through one selector (paho's
    external event loop: ``socket()``, ``loop_read``/``loop_write``/``loop_misc`` and its socket callbacks),
    no thread or socket pair per client. A device whose connection drops while the run goes on reconnects, as
    an agent does."""

    def __init__(self, cfg: SimConfig, ids: list[str], sources: list[str], stop: Any) -> None:
        self.cfg, self.ids, self.stop = cfg, ids, stop
        self.sources = sources
        self.sel = selectors.DefaultSelector()
        self.clients: dict[str, mqtt.Client] = {}  # connected (or connecting) devices
        self.answered: dict[str, bool] = {}  # whether each device's login was accepted (absent: no answer yet)
        self.session = int(time.time() * 1000)
        self.running: dict[str, RunningBundle | None] = dict.fromkeys(ids)
        if cfg.running is not None:
            self.running = {d: RunningBundle(model="sim", version="0.0.0", manifest_sha256=cfg.running[0],
                                             artifact=cfg.running[1], slot="a") for d in ids}
        self.pending: dict[str, tuple[float, DesiredState]] = {}  # device -> (due, desired)
        self.seqs = dict.fromkeys(ids, 0)
        self.generations = dict.fromkeys(ids, 0)
        self.reconnects: list[tuple[float, str]] = []  # (due, device), a heap
        self.backoff = dict.fromkeys(ids, 1.0)
        self.sending = False
        self.sent = self.acked = self.failed = 0
        self.next_misc = 0.0

    # -- paho's external event loop ------------------------------------------------------------------------
    def _opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.sel.register(sock, _READ, client)

    def _closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, _READ | _WRITE, client)

    def _written(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, _READ, client)

    def pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` for socket events and handle them; paho's housekeeping every few seconds."""
        for key, mask in self.sel.select(timeout):
            c: mqtt.Client = key.data
            if mask & _READ:
                c.loop_read()
                sock = c.socket()
                while sock is not None and getattr(sock, "pending", lambda: 0)() > 0:  # TLS records already read
                    c.loop_read()
                    sock = c.socket()
            if mask & _WRITE and c.socket() is not None:
                c.loop_write()
        now = time.monotonic()
        if now >= self.next_misc:
            self.next_misc = now + _MISC_S
            for c in list(self.clients.values()):
                c.loop_misc()
        while self.reconnects and self.reconnects[0][0] <= now and not self._stopping():
            _, device_id = heapq.heappop(self.reconnects)
            if device_id in self.clients:
                self._reconnect(device_id)

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    # -- devices -------------------------------------------------------------------------------------------
    def _on_connect(self, device_id: str, client: mqtt.Client, reason: Any) -> None:
        self.answered[device_id] = not reason.is_failure
        if reason.is_failure:
            self.clients.pop(device_id, None)
            client.disconnect()  # a refused login: no retries
            return
        self.backoff[device_id] = 1.0
        if self.cfg.follow_desired:
            client.subscribe(device_topic(device_id, TopicKind.DESIRED), qos=1)

    def _on_disconnect(self, device_id: str, reason: Any) -> None:
        self.answered.setdefault(device_id, False)  # dropped before a CONNACK: the broker refused its certificate
        if self.answered[device_id] and device_id in self.clients and reason.is_failure and self.sending:
            self._retry(device_id)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        self.acked += 1

    def _on_desired(self, device_id: str, payload: bytes) -> None:
        try:
            desired = decode(DesiredState, payload)
        except InvalidMessage:
            return
        if (desired.device_id != device_id or desired.bundle is None
                or desired.generation <= self.generations[device_id]):
            return
        self.generations[device_id] = desired.generation
        self.pending[device_id] = (time.monotonic() + self.cfg.install_s, desired)

    def _retry(self, device_id: str) -> None:
        delay = self.backoff[device_id]
        self.backoff[device_id] = min(30.0, delay * 2)
        heapq.heappush(self.reconnects, (time.monotonic() + delay * (0.5 + random.random()), device_id))  # noqa: S311

    def _reconnect(self, device_id: str) -> None:
        try:
            self.clients[device_id].reconnect()
        except OSError as exc:
            if exc.errno in _LOCAL_ERRNOS:
                raise
            self._retry(device_id)  # the broker is away (restarting): try again later

    def _client(self, device_id: str, tls: ssl.SSLContext | None) -> mqtt.Client:
        creds = self.cfg.devices[device_id]
        c = new_client(device_id, device_id, creds.password, tls=tls)
        topic, payload = will_message(device_id, self.session)
        c.will_set(topic, payload, qos=1, retain=True)
        c.on_socket_open = self._opened
        c.on_socket_close = self._closed
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._written
        c.on_publish = self._on_publish
        c.on_connect = lambda cl, u, f, rc, p, d=device_id: self._on_connect(d, cl, rc)
        c.on_disconnect = lambda cl, u, f, rc, p, d=device_id: self._on_disconnect(d, rc)
        if self.cfg.follow_desired:
            c.on_message = lambda cl, u, m, d=device_id: self._on_desired(d, bytes(m.payload))
        return c

    def connect_all(self) -> float:
        """Log every device in (TLS handshakes run in ``connect``), handling answers as they come; the devices
        still unanswered after ``connect_timeout`` count as failed. Returns the seconds it took."""
        cfg = self.cfg
        contexts = _tls_contexts(cfg, self.ids) if cfg.tls else {}
        started = time.monotonic()
        for i, device_id in enumerate(self.ids):
            c = self._client(device_id, contexts.pop(device_id) if cfg.tls else None)
            self.clients[device_id] = c
            try:
                c.connect(cfg.host, cfg.port, keepalive=60, bind_address=self.sources[i % len(self.sources)])
            except OSError as exc:  # ssl.SSLError included: the broker's certificate not signed by the CA, ...
                if exc.errno in _LOCAL_ERRNOS:
                    raise SimulationError(f"device {device_id} cannot open a connection on this machine ({exc}); "
                                          "ulimit -n, net.ipv4.ip_local_port_range or more source addresses") \
                        from exc
                del self.clients[device_id]
                self.failed += 1
                continue
            if i % 64 == 63:
                self.pump(0)  # take the answers so far
        deadline = time.monotonic() + cfg.connect_timeout
        while time.monotonic() < deadline and not self.answered.keys() >= self.clients.keys():
            self.pump(0.05)
        refused = [d for d in list(self.clients) if not self.answered.get(d)]  # refused, or never answered
        for device_id in refused:
            c = self.clients.pop(device_id)
            c.disconnect()
            self.failed += 1
        self.failed += sum(1 for d, ok in self.answered.items() if not ok and d not in refused)
        return time.monotonic() - started

    def state(self, device_id: str, install: InstallStatus | None = None) -> DeviceState:
        self.seqs[device_id] += 1
        return DeviceState(device_id=device_id, status="online", session=self.session, seq=self.seqs[device_id],
                           reason="update", running=self.running[device_id], install=install)

    def _publish(self, device_id: str, kind: TopicKind, payload: bytes, *, retain: bool = False) -> bool:
        c = self.clients.get(device_id)
        if c is None or c.publish(device_topic(device_id, kind), payload, qos=1, retain=retain).rc != 0:
            return False
        self.sent += 1
        return True

    def run(self) -> dict[str, int]:
        """Online state and hello from every device, then one window each per interval, each device at its own
        phase within the interval (a fleet's windows do not all end on the same second), until ``seconds`` are
        up or ``stop`` is set. Returns the telemetry windows sent per device."""
        cfg = self.cfg
        self.sending = True
        fp = Fingerprint(arch="x86_64", os="simulated", python="3.11", cpu_count=1, memory_bytes=1 << 30,
                         disk_free_bytes=1 << 30, runtimes=cfg.runtimes)
        for device_id in list(self.clients):
            self._publish(device_id, TopicKind.STATE, encode(DeviceState(
                device_id=device_id, status="online", session=self.session, seq=0, reason="connected",
                running=self.running[device_id])), retain=True)
            self._publish(device_id, TopicKind.HELLO, encode(Hello(
                device_id=device_id, session=self.session, agent_version="0.0.0-sim", protocols=[1],
                fingerprint=fp)))
        per_device = dict.fromkeys(self.clients, 0)
        rng = np.random.default_rng(abs(hash(tuple(self.ids))) % 2**32)
        start = time.monotonic()
        end = start + cfg.seconds
        n = max(1, len(per_device))
        due = [(start + cfg.interval * k / n, k, d, 0) for k, d in enumerate(per_device)]  # (at, tiebreak, id, seq)
        heapq.heapify(due)
        while time.monotonic() < end and not self._stopping():
            now = time.monotonic()
            for device_id, (at, desired) in list(self.pending.items()):
                if at <= now:
                    del self.pending[device_id]
                    self._installed(device_id, desired)
            while due and due[0][0] <= now:
                at, k, device_id, seq = heapq.heappop(due)
                if self._window(rng, device_id, seq):
                    per_device[device_id] += 1
                if at + cfg.interval < end:
                    heapq.heappush(due, (at + cfg.interval, k, device_id, seq + 1))
            wake = min(due[0][0] if due else end, end, now + _MISC_S)
            self.pump(max(0.0, wake - time.monotonic()))
        self.sending = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.acked < self.sent:
            self.pump(0.1)
        for c in self.clients.values():
            c.disconnect()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.sel.get_map():
            self.pump(0.1)
        return per_device

    def _installed(self, device_id: str, desired: DesiredState) -> None:
        """The install "finishes": report the new bundle as running."""
        assert desired.bundle is not None and desired.artifact is not None  # noqa: S101 - checked on receipt
        m = desired.bundle.manifest
        digest = manifest_digest(m)
        self.running[device_id] = RunningBundle(model=m.model, version=m.version, manifest_sha256=digest,
                                                artifact=desired.artifact, slot="b")
        install = InstallStatus(model=m.model, version=m.version, manifest_sha256=digest, step=InstallStep.DONE)
        self._publish(device_id, TopicKind.STATE, encode(self.state(device_id, install)), retain=True)

    def _window(self, rng: np.random.Generator, device_id: str, seq: int) -> bool:
        cfg = self.cfg
        now = datetime.now(timezone.utc)
        bundle = self.running[device_id]
        behaviour = cfg.behaviours.get(bundle.manifest_sha256, Behaviour()) if bundle else Behaviour()
        n = cfg.requests_per_window
        p95 = behaviour.p95_ms
        window = TelemetryWindow(
            device_id=device_id, session=self.session, window_seq=seq, start=now - timedelta(seconds=cfg.interval),
            end=now, requests=n, errors=int(rng.binomial(n, behaviour.error_rate)),
            manifest_sha256=bundle.manifest_sha256 if bundle else None,
            latency_ms=LatencySummary(p50=p95 / 2, p95=p95, p99=p95 * 1.5, max=p95 * 2, mean=p95 * 0.6))
        sent = self._publish(device_id, TopicKind.TELEMETRY, encode(window))
        if sent and cfg.reference is not None and cfg.manifest_sha256 is not None:
            self._publish(device_id, TopicKind.STATS,
                          encode(_stats(cfg, rng, device_id, self.session, seq, window.start, now)))
        return sent


def _run_shard(index: int, cfg: SimConfig, ids: list[str], sources: list[str], out: mp.Queue,  # type: ignore[type-arg]
               stop: Any, ready: Any, shards: int) -> None:
    """A worker process: its devices logged in, then (once every shard's are) sending. Puts ("done", index,
    result) on ``out``, or ("error", index, message) before dying of an exception."""
    try:
        _raise_open_files(len(ids) + 64)
        shard = _Shard(cfg, ids, sources, stop)
        connect_s = shard.connect_all()
        with ready.get_lock():
            ready.value += 1
        deadline = time.monotonic() + cfg.connect_timeout + 60
        while ready.value < shards and time.monotonic() < deadline and not shard._stopping():
            shard.pump(0.1)  # every shard has its devices logged in: the fleet starts sending at once
        per_device = shard.run()
        out.put(("done", index, (shard.sent, shard.acked, shard.failed, per_device, connect_s)))
    except BaseException as exc:
        out.put(("error", index, f"{type(exc).__name__}: {exc}"))
        raise


def simulate(cfg: SimConfig, stop: Any = None) -> SimResult:
    """Run the simulated fleet for ``cfg.seconds`` (or until ``stop``, a multiprocessing Event, is set).

    A device whose connection fails (the TLS handshake or the login refused, or no CONNACK within
    ``cfg.connect_timeout``) counts in ``failed_connects`` and sends nothing. A shard that dies (an error in it,
    or killed) stops the run: the other shards are terminated and :class:`SimulationError` names the shard, its
    devices and its error."""
    ids = sorted(cfg.devices)
    shards = [s for s in (ids[i :: cfg.processes] for i in range(cfg.processes)) if s]
    sources = source_addresses(cfg.host, len(ids))
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    ready = ctx.Value("i", 0)
    procs = [ctx.Process(target=_run_shard, args=(i, cfg, s, sources, out, stop, ready, len(shards)),
                         name=f"edgeherd-sim-{i}", daemon=True) for i, s in enumerate(shards)]
    for p in procs:
        p.start()
    result = SimResult()
    done: set[int] = set()
    # generous: logging in is slow with many TLS devices on a small machine, but a shard that died says so at once
    limit = cfg.seconds + 2 * cfg.connect_timeout + 600 + 0.05 * len(ids)
    deadline = time.monotonic() + limit
    try:
        while len(done) < len(procs):
            try:
                kind, index, payload = out.get(timeout=0.5)
            except queue.Empty:
                dead = next((i for i, p in enumerate(procs) if i not in done and p.exitcode is not None), None)
                if dead is None:
                    if time.monotonic() > deadline:
                        late = [i for i in range(len(procs)) if i not in done]
                        raise SimulationError(f"simulator shard(s) {late} did not finish within {limit:.0f} s") \
                            from None
                    continue
                try:  # what it put before exiting is in the queue by now (its feeder thread was flushed)
                    kind, index, payload = out.get(timeout=2)
                except queue.Empty:
                    kind, index, payload = "error", dead, _exit_reason(procs[dead].exitcode)
            if kind == "error":
                s = shards[index]
                raise SimulationError(f"simulator shard {index} of {len(procs)} ({len(s)} devices, {s[0]} … {s[-1]}) "
                                      f"died: {payload}")
            sent, acked, failed, per_device, connect_s = payload
            done.add(index)
            result.connect_s = max(result.connect_s, connect_s)
            result.sent += sent
            result.acked += acked
            result.failed_connects += failed
            result.per_device.update(per_device)
    finally:
        for p in procs:
            if p.exitcode is None and len(done) < len(procs):
                p.terminate()
        for p in procs:
            p.join(30)
    return result


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
