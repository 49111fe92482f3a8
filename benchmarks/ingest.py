"""Ingest load: N simulated devices, one telemetry window per device per second, against one server, over the
devices' TLS listener and over plain TCP in the same run.

Runs ``edgeherd server run`` as its own process (managed Mosquitto, SQLite or
PostgreSQL), enrols the devices, drives them with the fleet simulator in
other processes, then reads back what was stored. Prints messages/s
ingested, p95 ingest lag (stored time − window end), lost messages
(acknowledged by the broker but not stored; must be 0), how long the devices
took to log in, and the server's and the broker's CPU share of the machine.

The cost of TLS: each run measures the same workload twice, on two data
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

Run: ``python -m benchmarks.ingest [--devices 1000] [--seconds 30] [--runs 3] [--db sqlite|postgresql|both]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from server.db import make_engine
from server.db.models import TelemetryRow
from server.registry import Registry
from server.simulate import SimConfig, simulate

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
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30.0, help="how long each run sends")
    ap.add_argument("--runs", type=int, default=3, help="runs per listener (TLS and plain TCP)")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    args = ap.parse_args()
    print(f"{args.devices} simulated devices in 4 processes on this machine: the load generator shares its "
          f"{os.cpu_count()} cores with the broker and the server (TLS's cost on the devices' side counts too)",
          flush=True)
    for db in (["sqlite", "postgresql"] if args.db == "both" else [args.db]):
        run(db, args.devices, args.seconds, args.runs)


if __name__ == "__main__":
    main()
