"""`edgeherd demo --no-tui`, as `make demo` runs it (with the digits build already made): once in `make test`,
ten times in a row in the slow suite."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest

from tests.server_helpers import server_dir, wait_for

pytestmark = pytest.mark.integration

#: A line a logging handler printed (the default format, or ours), not the demo's narrative.
LOG_LINE = re.compile(r"^(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]+:|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )", re.M)


def _run_demo(data: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "server.cli", "demo", "--no-tui", "--data-dir", str(data)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200",
                         "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:] + "".join(
        f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((data / "logs").glob("*.log")))
    return text


def _check(text: str) -> None:
    assert "v1 on all devices: yes" in text
    assert "v2 rolled back at the canary by the predictions gate" in text
    assert "drift alert on x86-lab ·" in text  # and on nobody else
    assert "not as narrated" not in text
    # the Jetson's line says what it reported, and what that gets it
    jetson = next(line for line in text.splitlines() if line.strip().startswith("orin-dock") and "reported" in line)
    assert re.search(r"reported .*onnxruntime \d", jetson) and "gets digits-onnx-int8" in jetson, jetson
    assert "no TensorRT here" in jetson or "tensorrt" in jetson
    assert not LOG_LINE.search(text), LOG_LINE.search(text)


def test_the_demo_rolls_out_v1_catches_v2_at_the_canary_and_the_drifting_device(digits_bundle, tmp_path):
    data, _ = server_dir(tmp_path / "demo", digits_bundle.key)
    shutil.copytree(digits_bundle.dir, data / "bundles" / "digits-1.0.0")
    text = _run_demo(data)
    assert "reusing" in text and "signature checked" in text
    _check(text)
    assert (data / "logs" / "server.log").stat().st_size > 0  # the logs went to the file instead
    # four-eyes went through the API: two operators' tokens, the approver's signature verified and kept
    assert "approved by reviewer with a signature the server verified" in text
    with sqlite3.connect(data / "edgeherd.db") as db:
        rows = db.execute("SELECT a.actor, a.decision, a.signature, a.public_key, e.actor FROM approvals a "
                          "JOIN audit_log e ON e.seq = a.audit_seq").fetchall()
        promoted = {r[0] for r in db.execute("SELECT actor FROM audit_log WHERE action = 'model.promote'")}
    assert {(r[0], r[1]) for r in rows} == {("reviewer", "approve")} and len(rows) == 2
    assert all(r[2] and r[3] and r[4] == "reviewer" for r in rows)
    assert promoted == {"ml-engineer"}
    verified = subprocess.run([sys.executable, "-m", "server.cli", "audit", "verify", "--data-dir", str(data)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ten runs of about a minute each; the suite's 300 s is per ordinary test
def test_the_demo_passes_ten_times_in_a_row(digits_bundle, tmp_path):
    """Ten fresh runs (each its own server, broker, database and agents; the builds reused): all ten pass."""
    first, _ = server_dir(tmp_path / "run-0", digits_bundle.key)
    shutil.copytree(digits_bundle.dir, first / "bundles" / "digits-1.0.0")
    _check(_run_demo(first))
    for i in range(1, 10):
        data, _ = server_dir(tmp_path / f"run-{i}", digits_bundle.key)
        for built in ("digits-1.0.0", "digits-2.0.0"):
            shutil.copytree(first / "bundles" / built, data / "bundles" / built)
        _check(_run_demo(data))


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_demo_stopped_half_way_leaves_no_process_behind(digits_bundle, tmp_path, sig):
    """Stopped once its six agents run (SIGTERM as a supervisor or a timeout sends it, SIGINT as Ctrl-C does):
    the demo exits and every process it started — agents, the managed broker — is gone with it."""
    data, _ = server_dir(tmp_path / "demo", digits_bundle.key)
    shutil.copytree(digits_bundle.dir, data / "bundles" / "digits-1.0.0")
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        demo = subprocess.Popen([sys.executable, "-m", "server.cli", "demo", "--no-tui", "--data-dir", str(data)],
                                stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "COLUMNS": "200",
                                     "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        wait_for(lambda: len(re.findall(r" pid \d+, API on", out.read_text())) == 6 or demo.poll() is not None, 240,
                 "the demo's six agents to start")
        assert demo.poll() is None, out.read_text()[-3000:]
        children = _descendants(demo.pid)
        agents = {int(p) for p in re.findall(r" pid (\d+), API on", out.read_text())}
        assert agents <= children and len(children) >= 7  # six agents and the broker, at least
        demo.send_signal(sig)
        assert demo.wait(120) == (130 if sig == signal.SIGINT else 128 + sig)
        left = wait_for(lambda: not any(_alive(p) for p in children) or None, 30, "the demo's children to exit",
                        poll=0.5) and [p for p in children if _alive(p)]
        assert not left, left
        assert "every process the demo started is stopped" in out.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in children if "children" in locals() else ():  # whatever a failure here left behind
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
