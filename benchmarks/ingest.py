"""Ingest load: N simulated devices, one telemetry window per device per second, against one server.

Runs ``edgeherd server run`` as its own process (managed Mosquitto, SQLite or
PostgreSQL), enrols the devices, drives them with the fleet simulator in
other processes, then reads back what was stored. Prints messages/s
ingested, p95 ingest lag (stored time − window end), lost messages
(acknowledged by the broker but not stored; must be 0) and the server
process's CPU share of the machine.

Run: ``python -m benchmarks.ingest [--devices 1000] [--seconds 60] [--db sqlite|postgresql|both]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from server.db import make_engine
from server.db.models import TelemetryRow
from server.registry import Registry
from server.simulate import SimConfig, simulate

PG_ADMIN = os.environ.get("EDGEHERD_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


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


def run(db: str, devices: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        env = dict(os.environ)
        pg = None
        if db == "postgresql":
            pg = _pg_url()
            if pg is None:
                print("postgresql: no server answers; skipped")
                return
            env["EDGEHERD_DATABASE_URL"] = pg[0]
            os.environ["EDGEHERD_DATABASE_URL"] = pg[0]
        else:
            os.environ.pop("EDGEHERD_DATABASE_URL", None)
        try:
            reg = Registry(data)
            ids = [f"sim-{i:05d}" for i in range(devices)]
            passwords = reg.add_devices_bulk(ids, "simulated", custom_profile=True)
            server = subprocess.Popen(
                [str(Path(sys.executable).parent / "edgeherd"), "server", "run", "--data-dir", str(data),
                 "--metrics-port", "0", "--log-level", "WARNING"], env=env,
                stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "server.log", "wb"))  # noqa: SIM115
            time.sleep(3)
            cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
            result = simulate(SimConfig("127.0.0.1", reg.broker.port, passwords, seconds=seconds, interval=1.0,
                                        processes=4))
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
            cpu = _cpu_seconds(server.pid) - cpu0
            with Session(engine) as s:
                rows = s.exec(select(TelemetryRow.received_at, TelemetryRow.end)).all()
                first = s.exec(select(func.min(TelemetryRow.received_at))).one()
                last = s.exec(select(func.max(col(TelemetryRow.received_at)))).one()
            lags = sorted((r - e).total_seconds() for r, e in rows)
            span = (last - first).total_seconds() if first and last else 0
            server.terminate()
            server.wait(30)
            engine.dispose()
            p95 = lags[int(0.95 * (len(lags) - 1))] if lags else float("nan")
            print(f"{db:10s} devices {devices:5d}  sent {result.sent:7d}  stored {stored:7d}  "
                  f"lost {max(expected - stored, 0):5d}  ingest {stored / span if span else 0:7.0f} msg/s  "
                  f"p95 lag {p95 * 1000:7.0f} ms  server CPU {100 * cpu / wall / os.cpu_count():5.1f}% of the machine"
                  f"  failed connects {result.failed_connects}")
        finally:
            if pg is not None:
                _drop_pg(pg[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    args = ap.parse_args()
    for db in (["sqlite", "postgresql"] if args.db == "both" else [args.db]):
        run(db, args.devices, args.seconds)


if __name__ == "__main__":
    main()
