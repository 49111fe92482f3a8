"""Ingest: the server's capacity, as the drain rate of a backlog, and the live load of N simulated devices over
the devices' TLS listener and over plain TCP in the same run.

Capacity (``--suite drain``): ``edgeherd server run`` as its own process (managed Mosquitto, SQLite or
PostgreSQL) subscribes, then is stopped (SIGSTOP) with its MQTT session open. 2,000 enrolled devices, in
generator processes, publish a backlog (QoS 1, round-robin over the devices) of 25 telemetry windows and 25
feature-statistics windows each, 100,000 messages, which the broker queues for the server's session; the
generator has finished before the server is resumed (SIGCONT), so it does not compete for the cores during the
timed interval: from resuming the server until every window is a row (row counts polled). Printed per run: the
drain rate (windows stored / drain time), lost windows (must be 0: each window is one row, counted), the server's
own drops by reason (``overload``: its queues were full), whether the broker logged dropping messages (its
``max_queued_messages``/``max_queued_bytes``), and the windows no receipt named: after the drain each device logs in
again and reads the receipts the broker kept for its persistent session (must be 0). Then the median over the runs
with the lowest and highest.

Live (``--suite live``): N simulated devices, one telemetry window per device per second, against one server.
Reads back what was stored and prints messages/s ingested (the offered load, when the server keeps up: not its
capacity), p95 ingest lag (stored time − window end), lost messages (acknowledged by the broker but not stored;
must be 0), how long the devices took to log in, and the server's and the broker's CPU share of the machine.

The cost of TLS (live): each run measures the same workload twice, on two data
directories served by the same code. One is the default (the devices'
listener speaks TLS 1.2+ and each device logs in with its own certificate);
the other has ``broker/listener.json`` written with ``"tls": false`` before
the registry first opens it, so its devices log in with passwords over plain
TCP. The order alternates from run to run. Printed: TLS / plain for ingest
messages/s, p95 lag, log-in time and broker CPU, the median over the runs
with the lowest and highest. The load generator (the simulated devices, each
a real MQTT connection) runs on the same machine as the broker and the
server and competes with them for its cores, so TLS's cost on the device
side is counted against the server too.

Run: ``python -m benchmarks.ingest [--suite drain|live|both] [--devices N] [--windows 25] [--seconds 30] [--runs 3]
[--db sqlite|postgresql|both]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func
from sqlmodel import Session, col, select

from server.db import make_engine
from server.db.models import StatsWindow, TelemetryRow
from server.registry import Registry
from server.simulate import SimConfig, simulate

_log = logging.getLogger("benchmarks.ingest")
PG_ADMIN = os.environ.get("EDGEHERD_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
LISTENERS = ("tls", "plain")


@dataclass(frozen=True)
class Measured:
    sent: int
    stored: int
    lost: int
    rate: float  # messages/s stored
    p95_lag: float  # s
    connect_s: float
    server_cpu: float  # share of the machine
    broker_cpu: float
    failed_connects: int


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pg_url() -> tuple[str, str] | None:
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception:
        return None
    name = f"edgeherd_bench_{uuid.uuid4().hex[:8]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name


def _drop_pg(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _broker_pid(data: Path, timeout: float = 30.0) -> int:
    """The managed Mosquitto's process id, from the pid file ``server run`` writes once it has started it."""
    deadline = time.monotonic() + timeout
    pid_file = data / "broker" / "mosquitto.pid"
    while time.monotonic() < deadline:
        try:
            return int(pid_file.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise RuntimeError(f"the server did not start its broker within {timeout:.0f} s (no {pid_file})")


def measure(db: str, devices: int, seconds: float, listener: str) -> Measured | None:
    """One run of the workload on a fresh data directory (and database); None when PostgreSQL is asked for and
    none answers."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o711)  # noqa: S103 - search only: the broker, run as its own user, reads its files below
        data = Path(tmp) / "data"
        if listener == "plain":  # before the registry first opens it: the broker keeps a "tls" it finds
            (data / "broker").mkdir(parents=True, mode=0o700)
            (data / "broker" / "listener.json").write_text(json.dumps({"tls": False}))
        env = dict(os.environ)
        pg = None
        if db == "postgresql":
            pg = _pg_url()
            if pg is None:
                return None
            env["EDGEHERD_DATABASE_URL"] = pg[0]
            os.environ["EDGEHERD_DATABASE_URL"] = pg[0]
        else:
            os.environ.pop("EDGEHERD_DATABASE_URL", None)
        try:
            reg = Registry(data)
            assert reg.certificates == (listener == "tls"), reg.broker_url  # what is measured
            ids = [f"sim-{i:05d}" for i in range(devices)]
            creds = reg.add_devices_bulk(ids, "simulated", custom_profile=True)
            url = reg.broker_url
            reg.engine.dispose()
            with open(Path(tmp) / "server.log", "wb") as log:
                server = subprocess.Popen(
                    [str(Path(sys.executable).parent / "edgeherd"), "server", "run", "--data-dir", str(data),
                     "--metrics-port", "0", "--log-level", "WARNING"], env=env, stdout=subprocess.DEVNULL,
                    stderr=log)
            try:
                broker = _broker_pid(data)
                time.sleep(3)
                cpu0, broker0, t0 = _cpu_seconds(server.pid), _cpu_seconds(broker), time.monotonic()
                result = simulate(SimConfig(url, creds, seconds=seconds, interval=1.0, processes=4))
                expected = result.acked - 2 * (devices - result.failed_connects)  # minus state + hello
                engine = make_engine(env.get("EDGEHERD_DATABASE_URL") or f"sqlite:///{data / 'edgeherd.db'}")
                stored, last_change, previous = 0, time.monotonic(), -1
                while time.monotonic() - last_change < 5 and time.monotonic() - t0 < seconds + 120:
                    with Session(engine) as s:
                        stored = s.exec(select(func.count()).select_from(TelemetryRow)).one()
                    if stored != previous:
                        previous, last_change = stored, time.monotonic()
                    if stored >= expected:
                        break
                    time.sleep(0.5)
                wall = time.monotonic() - t0
                cpu, broker_cpu = _cpu_seconds(server.pid) - cpu0, _cpu_seconds(broker) - broker0
                with Session(engine) as s:
                    rows = s.exec(select(TelemetryRow.received_at, TelemetryRow.end)).all()
                    first = s.exec(select(func.min(TelemetryRow.received_at))).one()
                    last = s.exec(select(func.max(col(TelemetryRow.received_at)))).one()
                engine.dispose()
            finally:
                server.terminate()
                server.wait(30)
            lags = sorted((r - e).total_seconds() for r, e in rows)
            span = (last - first).total_seconds() if first and last else 0
            cores = os.cpu_count() or 1
            return Measured(sent=result.sent, stored=stored, lost=max(expected - stored, 0),
                            rate=stored / span if span else 0.0,
                            p95_lag=lags[int(0.95 * (len(lags) - 1))] if lags else float("nan"),
                            connect_s=result.connect_s, server_cpu=cpu / wall / cores,
                            broker_cpu=broker_cpu / wall / cores, failed_connects=result.failed_connects)
        finally:
            if pg is not None:
                _drop_pg(pg[1])


# -- capacity: the drain rate of a backlog --------------------------------------------------------------------------

#: A stats window's features: as many as a small tabular model has, on ten bins each.
DRAIN_FEATURES = 8
DRAIN_MANIFEST = "d" * 64


@dataclass(frozen=True)
class Drained:
    backlog: int  # windows queued at the broker for the server
    stored: int  # of them, rows stored after the drain
    lost: int
    drain_s: float  # from resuming the server until the last row was in the database
    generate_s: float  # how long the generator took to publish the backlog (before the measured interval)
    receipts_missing: int  # windows no receipt named, read by the devices after the drain
    dropped: dict[str, int]  # the server's dropped_total by reason (overload: its queues were full)
    broker_dropped: bool  # the broker logged that it dropped outgoing messages (its queue limits)
    server_cpu: float  # share of the machine during the drain
    broker_cpu: float

    @property
    def rate(self) -> float:
        return self.stored / self.drain_s if self.drain_s else 0.0


def _drain_messages(ids: list[str], windows: int, session: int) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """Each device's windows as it would send them after an outage, encoded: a telemetry window and a
    feature-statistics window per second, ending now."""
    import numpy as np

    from protocol import FeatureStats, FeatureWindow, LatencySummary, TelemetryWindow, TopicKind, device_topic, encode

    rng = np.random.default_rng(session % 2**32)
    now = datetime.now(timezone.utc)
    out = []
    for device_id in ids:
        msgs = []
        for seq in range(windows):
            end = now - timedelta(seconds=windows - seq)
            start = end - timedelta(seconds=1)
            tele = TelemetryWindow(device_id=device_id, session=session, window_seq=seq, start=start, end=end,
                                   requests=10, errors=int(rng.binomial(10, 0.05)), manifest_sha256=DRAIN_MANIFEST,
                                   latency_ms=LatencySummary(p50=4.0, p95=9.0, p99=12.0, max=15.0, mean=5.0))
            feats = [FeatureWindow(name=f"f{k}", version=1, counts=[int(c) for c in rng.multinomial(50, [0.1] * 10)])
                     for k in range(DRAIN_FEATURES)]
            stats = FeatureStats(device_id=device_id, session=session, window_seq=seq, start=start, end=end,
                                 manifest_sha256=DRAIN_MANIFEST, n=50, features=feats)
            msgs += [(device_topic(device_id, TopicKind.TELEMETRY), encode(tele)),
                     (device_topic(device_id, TopicKind.STATS), encode(stats))]
        out.append((device_id, msgs))
    return out


def _pump(clients: list[Any], until: Any, timeout: float) -> bool:
    """Run every client's network I/O (one non-blocking pass each) until ``until()`` or ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            return False
        for c in clients:
            c.loop(timeout=0.0)
        time.sleep(0.001)
    return True


def _drain_devices(host: str, port: int, creds: list[tuple[str, str]], windows: int, session: int, go: Any,
                   collect: Any, out: Any) -> None:
    """One shard of the backlog's devices (a process of its own): encode their windows, log in (persistent
    sessions, subscribed to their receipts), and when ``go`` is set publish every window (QoS 1, round-robin
    over the devices, one window each per round) and log out; when ``collect`` is set log in again and read the
    receipts the server queued for them meanwhile. Puts what it did on ``out``."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from protocol import Receipt, TopicKind, decode, device_topic
    from server.bus import new_client

    by_device = dict(_drain_messages([d for d, _ in creds], windows, session))
    named: dict[str, set[tuple[str, int, int]]] = {d: set() for d, _ in creds}
    connected: set[str] = set()
    acked = [0]

    def on_receipt(client: Any, userdata: Any, msg: Any) -> None:
        r = decode(Receipt, bytes(msg.payload))
        named[r.device_id].update({("telemetry", s, w) for s, w in r.telemetry})
        named[r.device_id].update({("stats", s, w) for s, w in r.stats})

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        device_id = client._client_id.decode()
        connected.add(device_id)
        client.subscribe(device_topic(device_id, TopicKind.RECEIPT), qos=1)

    clients = []
    for device_id, password in creds:
        c = new_client(device_id, device_id, password)
        c.max_inflight_messages_set(0)
        c.on_message = on_receipt
        c.on_connect = on_connect
        c.on_publish = lambda cl, u, mid, rc, p: acked.__setitem__(0, acked[0] + 1)
        clients.append(c)

    def login() -> None:
        connected.clear()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        for c in clients:
            c.connect(host, port, keepalive=600, clean_start=False, properties=props)
        if not _pump(clients, lambda: len(connected) == len(clients), 120):
            raise RuntimeError(f"{len(clients) - len(connected)} devices could not log in")
        _pump(clients, lambda: False, 1.0)  # the SUBACKs

    login()
    out.put(("ready", len(clients)))
    go.wait()
    t0 = time.monotonic()
    total = sum(len(m) for m in by_device.values())
    for i in range(0, 2 * windows, 2):
        for c, (device_id, _) in zip(clients, creds, strict=True):
            for topic, payload in by_device[device_id][i:i + 2]:
                c.publish(topic, payload, qos=1)
        for c in clients:
            c.loop(timeout=0.0)
    _pump(clients, lambda: acked[0] >= total, 300)
    out.put(("sent", acked[0], time.monotonic() - t0))
    for c in clients:
        c.disconnect()
    _pump(clients, lambda: False, 0.5)
    collect.wait()
    login()
    expected = {d: {(k, session, w) for k in ("telemetry", "stats") for w in range(windows)} for d, _ in creds}
    _pump(clients, lambda: all(expected[d] <= named[d] for d in expected), 120)
    for c in clients:
        c.disconnect()
    out.put(("receipts", sum(len(expected[d] - named[d]) for d in expected),
             sum(1 for d in expected if not named[d])))


def _receipts_sent(port: int) -> int:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next(int(float(x.rsplit(" ", 1)[1])) for x in text.splitlines()
                if x.startswith("edgeherd_server_receipts_sent_total "))


def _metrics(port: int) -> dict[str, int]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    got = {}
    for line in text.splitlines():
        if line.startswith("edgeherd_server_dropped_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            got[reason] = int(float(line.rsplit(" ", 1)[1]))
    return got


#: Devices per generator process: paho's loop() uses select(), which cannot watch a descriptor numbered 1,024 or
#: more, and a paho client holds three (its socket and a pair to wake its loop).
DEVICES_PER_SHARD = 250


def measure_drain(db: str, devices: int, windows: int) -> Drained | None:
    """One backlog drained by a fresh server (data directory, database): the server is started and subscribed,
    then stopped (SIGSTOP) while the devices publish the backlog, which the broker queues for its session; then
    resumed, and timed until every window is a row. None when PostgreSQL is asked for and none answers."""
    import multiprocessing as mp

    from server.broker import free_port

    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o711)  # noqa: S103 - search only: the broker, run as its own user, reads its files below
        data = Path(tmp) / "data"
        (data / "broker").mkdir(parents=True, mode=0o700)  # passwords over plain TCP: a cheaper generator
        (data / "broker" / "listener.json").write_text(json.dumps({"tls": False}))
        env = dict(os.environ)
        pg = None
        if db == "postgresql":
            pg = _pg_url()
            if pg is None:
                return None
            env["EDGEHERD_DATABASE_URL"] = os.environ["EDGEHERD_DATABASE_URL"] = pg[0]
        else:
            os.environ.pop("EDGEHERD_DATABASE_URL", None)
        server = None
        ctx = mp.get_context("spawn")
        procs: list[Any] = []
        try:
            reg = Registry(data)
            ids = [f"dev-{i:05d}" for i in range(devices)]
            creds = reg.add_devices_bulk([*ids, "dev-probe"], "simulated", custom_profile=True)
            url = urlsplit(reg.broker_url)
            reg.engine.dispose()
            metrics_port = free_port("127.0.0.1")
            with open(Path(tmp) / "server.log", "wb") as log:
                server = subprocess.Popen(
                    [str(Path(sys.executable).parent / "edgeherd"), "server", "run", "--data-dir", str(data),
                     "--metrics-port", str(metrics_port), "--log-level", "WARNING"], env=env,
                    stdout=subprocess.DEVNULL, stderr=log)
            broker = _broker_pid(data)
            engine = make_engine(env.get("EDGEHERD_DATABASE_URL") or f"sqlite:///{data / 'edgeherd.db'}")
            session = int(time.time() * 1000)
            go, collect, out = ctx.Event(), ctx.Event(), ctx.Queue()
            step = DEVICES_PER_SHARD
            for i in range(0, devices, step):
                part = [(d, creds[d].password or "") for d in ids[i:i + step]]
                procs.append(ctx.Process(target=_drain_devices, args=(
                    url.hostname, url.port, part, windows, session, go, collect, out), daemon=True))
            _wait_subscribed(engine, url.hostname or "127.0.0.1", url.port or 1883, "dev-probe",
                             creds["dev-probe"].password or "")
            for p in procs:
                p.start()
            ready = [out.get(timeout=300) for _ in procs]
            assert all(r[0] == "ready" for r in ready), ready
            before = _count(engine)
            os.kill(server.pid, signal.SIGSTOP)  # the server's session stays; the broker queues for it
            t_gen = time.monotonic()
            go.set()
            sent = [out.get(timeout=600) for _ in procs]
            generate_s = time.monotonic() - t_gen
            backlog = sum(s[1] for s in sent)
            cpu0, broker0 = _cpu_seconds(server.pid), _cpu_seconds(broker)
            t0 = time.monotonic()
            os.kill(server.pid, signal.SIGCONT)
            stored, last, changed = 0, -1, time.monotonic()
            while time.monotonic() - changed < 20:
                stored = _count(engine) - before
                now = time.monotonic()
                if stored != last:
                    last, changed = stored, now
                if stored >= backlog:
                    break
                time.sleep(0.2)
            drain_s = now - t0
            cpu, broker_cpu = _cpu_seconds(server.pid) - cpu0, _cpu_seconds(broker) - broker0
            dropped = _metrics(metrics_port)
            collect.set()
            missing = [out.get(timeout=300) for _ in procs]
            _log.info("receipts missing per shard (windows, devices with none): %s; server %s",
                     [m[1:] for m in missing], _receipts_sent(metrics_port))
            engine.dispose()
            cores = os.cpu_count() or 1
            text = (data / "broker" / "mosquitto.log").read_text(errors="replace")
            return Drained(backlog=backlog, stored=stored, lost=max(backlog - stored, 0), drain_s=drain_s,
                           generate_s=generate_s, receipts_missing=sum(m[1] for m in missing), dropped=dropped,
                           broker_dropped="dropped" in text.lower(), server_cpu=cpu / drain_s / cores,
                           broker_cpu=broker_cpu / drain_s / cores)
        finally:
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
            if server is not None:
                os.kill(server.pid, signal.SIGCONT)
                server.terminate()
                server.wait(60)
            if pg is not None:
                _drop_pg(pg[1])


def _count(engine: Any) -> int:
    with Session(engine) as s:
        return int(s.exec(select(func.count()).select_from(TelemetryRow)).one()) + int(
            s.exec(select(func.count()).select_from(StatsWindow)).one())


def _wait_subscribed(engine: Any, host: str, port: int, device_id: str, password: str, timeout: float = 60.0) -> None:
    """Until a window the device ``device_id`` publishes is stored: the server has subscribed (and migrated)."""
    from protocol import TelemetryWindow, TopicKind, device_topic, encode
    from server.bus import new_client

    client = new_client(device_id, device_id, password)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.connect(host, port)
            break
        except OSError:  # the broker is starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    client.loop_start()
    try:
        while True:
            now = datetime.now(timezone.utc)
            window = TelemetryWindow(device_id=device_id, session=1, window_seq=int(time.time()), start=now, end=now,
                                     requests=0, errors=0)
            client.publish(device_topic(device_id, TopicKind.TELEMETRY), encode(window), qos=1)
            time.sleep(1.0)
            try:
                with Session(engine) as s:
                    if s.exec(select(func.count()).select_from(TelemetryRow)).one():
                        return
            except Exception:  # not migrated yet
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server stored nothing within {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()


def drain(db: str, devices: int, windows: int, runs: int) -> None:
    got = []
    for i in range(runs):
        d = measure_drain(db, devices, windows)
        if d is None:
            print(f"{db}: no server answers; skipped")
            return
        got.append(d)
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(d.dropped.items())) or "none"
        print(f"{db:10s} drain run {i + 1}  backlog {d.backlog:7d} windows (generated in {d.generate_s:5.1f} s, "
              f"before the timed drain)  stored {d.stored:7d}  lost {d.lost}  drained in {d.drain_s:6.1f} s = "
              f"{d.rate:6.0f} msg/s  receipts missing {d.receipts_missing}  server drops: {dropped}  broker "
              f"dropped: {'YES' if d.broker_dropped else 'no'}  CPU during the drain: server "
              f"{100 * d.server_cpu:4.1f}%, broker {100 * d.broker_cpu:4.1f}% of the machine", flush=True)
    rates = sorted(d.rate for d in got)
    print(f"{db:10s} drain rate over {runs} run(s): median {statistics.median(rates):.0f} msg/s "
          f"(lowest {rates[0]:.0f}, highest {rates[-1]:.0f}); lost {sum(d.lost for d in got)}, receipts missing "
          f"{sum(d.receipts_missing for d in got)}", flush=True)


def _ratio(tls: list[float], plain: list[float]) -> str:
    """TLS / plain per run: the median, with the lowest and highest."""
    ratios = sorted(t / p for t, p in zip(tls, plain, strict=True) if p)
    if not ratios:
        return "   n/a"
    return f"{statistics.median(ratios):5.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})"


def run(db: str, devices: int, seconds: float, runs: int) -> None:
    got: dict[str, list[Measured]] = {name: [] for name in LISTENERS}
    for i in range(runs):
        for listener in (LISTENERS if i % 2 == 0 else LISTENERS[::-1]):
            m = measure(db, devices, seconds, listener)
            if m is None:
                print(f"{db}: no server answers; skipped")
                return
            got[listener].append(m)
            print(f"{db:10s} {listener:5s} run {i + 1}  devices {devices:5d}  sent {m.sent:7d}  stored {m.stored:7d}  "
                  f"lost {m.lost:5d}  ingest {m.rate:7.0f} msg/s  p95 lag {m.p95_lag * 1000:6.0f} ms  "
                  f"log-in {m.connect_s:5.1f} s  CPU: server {100 * m.server_cpu:4.1f}%, broker "
                  f"{100 * m.broker_cpu:4.1f}% of the machine  failed connects {m.failed_connects}", flush=True)
    tls, plain = got["tls"], got["plain"]
    print(f"{db:10s} TLS / plain over {runs} run(s), median (lowest–highest): "
          f"ingest msg/s {_ratio([m.rate for m in tls], [m.rate for m in plain])}, "
          f"p95 lag {_ratio([m.p95_lag for m in tls], [m.p95_lag for m in plain])}, "
          f"log-in time {_ratio([m.connect_s for m in tls], [m.connect_s for m in plain])}, "
          f"broker CPU {_ratio([m.broker_cpu for m in tls], [m.broker_cpu for m in plain])}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["drain", "live", "both"], default="both",
                    help="drain: capacity (a backlog's drain rate); live: the offered load, TLS against plain TCP")
    ap.add_argument("--devices", type=int, default=None, help="live: 1000; drain: 2000")
    ap.add_argument("--seconds", type=float, default=30.0, help="live: how long each run sends")
    ap.add_argument("--windows", type=int, default=25,
                    help="drain: windows per device in the backlog (a telemetry and a statistics message each)")
    ap.add_argument("--runs", type=int, default=3, help="runs (live: per listener, TLS and plain TCP)")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    args = ap.parse_args()
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if args.suite in ("drain", "both"):
        devices = args.devices or 2000
        print(f"Capacity: a backlog of {devices} devices x {args.windows} windows x 2 messages, published (QoS 1) "
              "while the server is stopped (SIGSTOP) with its session open, so the broker queues it; the "
              "generator finishes before the server is resumed, and the drain is timed from resuming it until "
              f"every window is a row. {os.cpu_count()} cores, shared with other jobs.", flush=True)
        for db in dbs:
            drain(db, devices, args.windows, args.runs)
    if args.suite in ("live", "both"):
        devices = args.devices or 1000
        print(f"Live: {devices} simulated devices in 4 processes on this machine, one window per device per "
              "second: the ingest rate below is the offered load (the simulator shares the "
              f"{os.cpu_count()} cores with the broker and the server; TLS's cost on the devices' side counts too), "
              "not the server's capacity", flush=True)
        for db in dbs:
            run(db, devices, args.seconds, args.runs)

if __name__ == "__main__":
    main()
