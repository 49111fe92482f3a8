"""Fleet connections: how many devices one server and its managed broker hold on this machine, and what each
costs while it is connected and reporting once a minute.

For each fleet size N: enrols N devices on a fresh data directory (``Registry.add_devices_bulk``: a certificate
each, on the default TLS listener), runs ``edgeherd server run`` as its own process (with its managed Mosquitto),
measures the server's and the broker's resident memory with no device connected (the baseline), then connects
the N devices with the fleet simulator (``server.simulate``: 2 processes, one event loop each) and, once the
server counts them online, measures again. Printed per size:

- devices online (the server's ``online`` count) against N, and how long logging them in took;
- broker RSS and server RSS per device: (RSS with the fleet connected − baseline RSS) / devices online;
- the broker's, the server's and the simulator's CPU over ``--idle`` seconds (60 by default) with every device
  connected and sending one telemetry window a minute, each at its own phase (share of one core), against the
  broker's and the server's over the same time with no device connected (the baseline);
- the per-device costs extrapolated linearly to 100,000 devices (an extrapolation, not a measurement).

The simulated devices run on the same machine as the server and the broker and share its cores with them
(2 on the reference machine, itself shared with other jobs): their CPU is printed so it can be read apart.

Run: ``python -m benchmarks.fleet_connections [--devices 1000 10000] [--idle 60] [--runs 1]``
(``make bench-load`` runs 1,000 and 10,000.)
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, col, func, select

from server.db.models import Device
from server.registry import Registry
from server.simulate import SimConfig, SimResult, simulate

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measured:
    devices: int
    online: int
    failed_connects: int
    enrol_s: float
    online_s: float  # from starting the simulator until the server counted them online
    broker_rss_per_device: float  # bytes
    server_rss_per_device: float
    broker_cpu: float  # share of one core, over the idle window
    server_cpu: float
    broker_cpu0: float  # the same with no device connected
    server_cpu0: float
    simulator_cpu: float
    broker_rss: int
    server_rss: int
    simulator_rss: int


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def _tree(pid: int, exclude: int | None = None) -> list[int]:
    """``pid`` and its descendants, less ``exclude`` and its own."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p == exclude:
            continue
        pids.append(p)
        todo += _children(p)
    return pids


def _rss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
    return total


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):
            pass
    return total


def _broker_pid(data: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int((data / "broker" / "mosquitto.pid").read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise RuntimeError(f"the server did not start its broker within {timeout:.0f} s")


def measure(devices: int, idle: float, processes: int) -> Measured:
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o711)  # noqa: S103 - search only: the broker, run as its own user, reads its files below
        data = Path(tmp) / "data"
        os.environ.pop("EDGEHERD_DATABASE_URL", None)
        reg = Registry(data)
        t0 = time.monotonic()
        creds = reg.add_devices_bulk([f"sim-{i:06d}" for i in range(devices)], "simulated", custom_profile=True)
        enrol_s = time.monotonic() - t0
        url, engine = reg.broker_url, reg.engine
        with open(Path(tmp) / "server.log", "wb") as log:
            server = subprocess.Popen(
                [str(Path(sys.executable).parent / "edgeherd"), "server", "run", "--data-dir", str(data),
                 "--metrics-port", "0", "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=log)
        stop = mp.get_context("spawn").Event()
        got: dict[str, SimResult | BaseException] = {}
        try:
            broker = _broker_pid(data)
            time.sleep(5)
            server_pids = _tree(server.pid, exclude=broker)
            b0, s0, w0 = _cpu([broker]), _cpu(server_pids), time.monotonic()
            time.sleep(idle)  # the baseline: the same processes, the same time, no device connected
            wall = time.monotonic() - w0
            base_cpu = ((_cpu([broker]) - b0) / wall, (_cpu(_tree(server.pid, exclude=broker)) - s0) / wall)
            server_pids = _tree(server.pid, exclude=broker)
            broker0, server0 = _rss([broker]), _rss(server_pids)

            def run() -> None:
                try:
                    got["result"] = simulate(SimConfig(url, creds, seconds=3600, interval=60.0, processes=processes,
                                                       connect_timeout=120), stop)
                except BaseException as exc:
                    got["error"] = exc

            sim = threading.Thread(target=run, daemon=True)
            t0 = time.monotonic()
            sim.start()

            def online() -> int:
                with Session(engine) as db:
                    return int(db.exec(select(func.count()).select_from(Device)
                                       .where(col(Device.status) == "online")).one())

            count, last, changed = 0, -1, time.monotonic()
            while sim.is_alive() and time.monotonic() - changed < 60:  # until all are online, or none come for 60 s
                count = online()
                if count != last:
                    last, changed = count, time.monotonic()
                if count >= devices:
                    break
                time.sleep(1)
            online_s = time.monotonic() - t0
            if not sim.is_alive():
                raise RuntimeError(f"the simulator stopped: {got.get('error')}")
            time.sleep(10)  # the hellos and states worked through
            sim_pids = [p.pid for p in mp.active_children() if p.name.startswith("edgeherd-sim-") and p.pid]
            server_pids = _tree(server.pid, exclude=broker)
            c0 = (_cpu([broker]), _cpu(server_pids), _cpu(sim_pids))
            w0 = time.monotonic()
            time.sleep(idle)
            c1 = (_cpu([broker]), _cpu(server_pids), _cpu(sim_pids))
            wall = time.monotonic() - w0
            count = online()
            broker1, server1, sim_rss = _rss([broker]), _rss(server_pids), _rss(sim_pids)
            stop.set()
            sim.join(120)
            result = got.get("result")
            if not isinstance(result, SimResult):
                raise RuntimeError(f"the simulator failed: {got.get('error')}")
        finally:
            stop.set()
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            engine.dispose()
        per = max(count, 1)
        return Measured(devices=devices, online=count, failed_connects=result.failed_connects, enrol_s=enrol_s,
                        online_s=online_s, broker_rss_per_device=(broker1 - broker0) / per,
                        server_rss_per_device=(server1 - server0) / per, broker_cpu=(c1[0] - c0[0]) / wall,
                        server_cpu=(c1[1] - c0[1]) / wall, broker_cpu0=base_cpu[0],
                        server_cpu0=base_cpu[1], simulator_cpu=(c1[2] - c0[2]) / wall,
                        broker_rss=broker1, server_rss=server1, simulator_rss=sim_rss)


def _spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return format(med, fmt) + (f" ({format(min(values), fmt)}–{format(max(values), fmt)})" if len(values) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, nargs="+", default=[1000])
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of CPU measured with the fleet connected")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--processes", type=int, default=2, help="simulator processes")
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores, shared by the server, its broker and the {args.processes} simulator processes "
          "driving the devices (the machine may be shared with other jobs too); every device on the TLS listener "
          "with its own certificate, one telemetry window a minute. RSS per device: (RSS connected − RSS of the "
          "same processes before any device connected) / devices online. CPU: share of one core over "
          f"{args.idle:.0f} s with the fleet connected, and over as long before it connected. Median "
          f"(lowest–highest) of {args.runs} run(s).")
    for n in args.devices:
        runs = [measure(n, args.idle, args.processes) for _ in range(args.runs)]
        kib = [r.broker_rss_per_device / 1024 for r in runs]
        skib = [r.server_rss_per_device / 1024 for r in runs]
        bcpu = [100 * r.broker_cpu for r in runs]
        scpu = [100 * r.server_cpu for r in runs]
        bdelta = [100 * (r.broker_cpu - r.broker_cpu0) for r in runs]
        sdelta = [100 * (r.server_cpu - r.server_cpu0) for r in runs]
        print(f"\n{n:,} devices: online {_spread([r.online for r in runs], '.0f')} of {n:,} "
              f"(failed connects {_spread([r.failed_connects for r in runs], '.0f')}); enrolment "
              f"{_spread([r.enrol_s for r in runs], '.1f')} s; online after "
              f"{_spread([r.online_s for r in runs], '.1f')} s")
        print(f"  broker RSS {_spread([r.broker_rss / 2**20 for r in runs], '.1f')} MiB, "
              f"{_spread(kib, '.1f')} KiB/device; server RSS {_spread([r.server_rss / 2**20 for r in runs], '.1f')} "
              f"MiB, {_spread(skib, '.1f')} KiB/device; simulator RSS "
              f"{_spread([r.simulator_rss / 2**20 for r in runs], '.1f')} MiB")
        print(f"  CPU with the fleet connected: broker {_spread(bcpu, '.1f')} %, server {_spread(scpu, '.1f')} %, "
              f"simulator {_spread([100 * r.simulator_cpu for r in runs], '.1f')} % of one core; with no device: "
              f"broker {_spread([100 * r.broker_cpu0 for r in runs], '.1f')} %, server "
              f"{_spread([100 * r.server_cpu0 for r in runs], '.1f')} %")
        k = 100_000 / n
        mib = 100_000 / 1024
        print(f"  extrapolated linearly to 100,000 devices (not measured): broker "
              f"{statistics.median(kib) * mib:.0f} MiB, server {statistics.median(skib) * mib:.0f} MiB above idle; "
              f"CPU above idle: broker {statistics.median(bdelta) * k:.0f} %, server "
              f"{statistics.median(sdelta) * k:.0f} % of one core")


if __name__ == "__main__":
    main()
