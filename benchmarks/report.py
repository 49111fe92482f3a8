"""Run every suite in benchmarks/ and write one Markdown report, ``benchmarks/REPORT.md`` (generated).

Each suite prints its own figures, each a ratio against a baseline measured in the same run; this runs
them one after another (so they do not compete for the two cores), times them, and puts their output under
one heading each, with the machine they ran on. A suite that fails is reported as failed, with its output.

Run: ``make bench`` (or ``python -m benchmarks.report [--only NAME ...] [--out FILE]``)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

#: (module, title, what it compares) in report order.
SUITES = [
    ("bench_protocol", "Protocol codec", "strict decoding, canonical encoding, chunk frames and signature checks "
                                         "against bare json / hashlib in the same process"),
    ("toolchain_targets", "Targets: int8 against fp32", "each artifact's accuracy and latency against the fp32 "
                                                        "ONNX artifact of the same build; where int8 is not "
                                                        "faster, why (ONNX Runtime's fused graph and operator "
                                                        "profile)"),
    ("agent_overhead", "Agent overhead", "a prediction through the agent (validation, statistics, API) against "
                                         "the bare runtime session"),
    ("ingest", "Ingest: capacity and 1,000 live devices", "the drain rate of a 100,000-window backlog queued at "
                                                          "the broker, with loss and receipts counted; live: "
                                                          "messages/s, p95 lag and loss against what the simulator "
                                                          "sent, on SQLite and PostgreSQL; the devices' TLS listener "
                                                          "against plain TCP in the same run (TLS / plain)"),
    ("artifact_fanout", "Artifact fan-out", "50 devices pulling 20 MiB against mosquitto_pub/sub moving the same "
                                            "bytes, over the TLS listener and over plain TCP (TLS / plain wave "
                                            "time), each run a pair, median (lowest–highest) of the runs, with "
                                            "the CPU each party used"),
    ("fleet_connections", "Fleet connections: 1,000 devices", "devices online, broker and server RSS per device "
                                                               "and CPU with the fleet connected (one window a "
                                                               "minute each) against the same processes with no "
                                                               "device, the simulator on the same cores; 10,000 "
                                                               "with `make bench-load`"),
    ("tui_refresh", "TUI refresh at 10,000 devices", "fetch and render against a bare SELECT of the devices"),
    ("demo_time", "End-to-end demo", "the whole demo against building its model alone"),
    ("drift_accuracy", "Drift accuracy on public tabular data", "edgeherd's drift decision (false alarms and "
                                                                 "detection per data set × shift × window size) "
                                                                 "against scipy's two-sample KS test on the raw "
                                                                 "values, Bonferroni at the same family rate"),
]
#: Suites whose output is Markdown (tables), put into the report as it is rather than as preformatted text.
MARKDOWN = {"drift_accuracy"}
ROOT = Path(__file__).resolve().parent.parent


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
                  .split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()}"


def run(only: list[str] | None, out: Path, timeout: float) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sections = []
    failed = 0
    started = time.monotonic()
    for module, title, what in SUITES:
        if only and module not in only:
            continue
        print(f"== {title} (benchmarks/{module}.py)", flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            output, ok = proc.stdout.strip(), proc.returncode == 0
            if not ok:
                output += "\n" + proc.stderr.strip()[-3000:]
        except subprocess.TimeoutExpired:
            output, ok = f"timed out after {timeout:.0f} s", False
        seconds = time.monotonic() - t0
        failed += not ok
        print(output, flush=True)
        status = f"{seconds:.0f} s" if ok else f"**FAILED** after {seconds:.0f} s"
        body = output if module in MARKDOWN and ok else f"```\n{output}\n```"
        sections.append(f"## {title}\n\n`benchmarks/{module}.py` — {what}. ({status})\n\n{body}\n")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# edgeherd benchmark report",
        "",
        f"Generated by `make bench` (`benchmarks/report.py`) on {stamp}, in {time.monotonic() - started:.0f} s, "
        f"on {_machine()}. Do not edit: run it again. Every figure is a ratio against a baseline measured "
        "in the same run, because the machines are shared and noisy; absolute times are given for scale.",
        "",
        *sections,
    ])
    out.write_text(text)
    print(f"wrote {out}" + (f"; {failed} suite(s) failed" if failed else ""))
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", help="run only these suites (module names)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "REPORT.md")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one suite may take")
    args = ap.parse_args()
    raise SystemExit(run(args.only, args.out, args.timeout))


if __name__ == "__main__":
    main()
