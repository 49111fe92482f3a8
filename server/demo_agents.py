"""The demo's device side: real agent processes, one per demo device, that die with the demo however it ends,
and the traffic it sends to their local APIs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

__all__ = ["DemoAgent", "Traffic", "free_port", "parent_death_signal", "start_agents", "stopping"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DemoAgent:
    device: str
    profile: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


def parent_death_signal() -> Callable[[], None] | None:
    """A function for the child to run before exec, after which Linux sends it SIGTERM when the demo dies, however
    it dies (SIGKILL included); None elsewhere, where the demo's own cleanup is all there is. ``prctl`` is looked
    up here, in the parent, so the child only calls it (nothing to load or lock between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def child() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return child


def start_agents(data: Path, registry: Any, console: Console, agents: list[DemoAgent],
                 devices: list[tuple[str, str]], group: str) -> None:
    """Start one agent per demo device, each appended to ``agents`` as soon as it runs, so whatever fails
    half-way, the caller's cleanup stops the ones already started."""
    die_with_parent = parent_death_signal()
    exe = Path(sys.executable).with_name("edgeherd-agent")
    for device, profile in devices:
        enrolled = registry.add_device(device, profile, [group], actor="ops")
        port = free_port()
        log = data / "logs" / f"{device}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "EDGEHERD_AGENT_DATA_DIR": str(data / "agents" / device),
               "EDGEHERD_AGENT_API_PORT": str(port), "EDGEHERD_AGENT_WINDOW_SECONDS": "2"}
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from agent.cli import main; main()"]
        with log.open("wb") as out:
            proc = subprocess.Popen([*cmd, "run", "--config", str(enrolled.agent_config)], stdout=out,  # noqa: S603
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=die_with_parent)
        agents.append(DemoAgent(device, profile, port, proc, log))
        console.print(f"  {device:<12} {profile:<18} pid {proc.pid}, API on 127.0.0.1:{port}")


class Traffic:
    """Posts batches of the digits test set to every agent; one device's inputs can be shifted."""

    def __init__(self, agents: list[DemoAgent]) -> None:
        from toolchain.data import load_digits

        self.x = load_digits().x[-360:]
        self.agents = agents
        self.shifted: set[str] = set()
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        while not self._stop.wait(0.25):
            for a in self.agents:
                batch = self.x[rng.integers(0, len(self.x), 16)]
                if a.device in self.shifted:  # brighter digits: every pixel lifted, clipped at white
                    batch = np.clip(batch + 6.0, 0, 16)
                req = urllib.request.Request(f"http://127.0.0.1:{a.port}/v1/predict",
                                             data=json.dumps({"inputs": batch.tolist()}).encode(),
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - http://127.0.0.1 only
                        resp.read()
                    self.sent += 1
                except OSError:
                    self.failed += 1  # no model yet, or restarting: expected early on


@contextmanager
def stopping(agents: list[DemoAgent]) -> Iterator[None]:
    try:
        yield
    finally:
        for a in agents:
            if a.proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(a.proc.pid, signal.SIGTERM)
        for a in agents:
            try:
                a.proc.wait(15)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(a.proc.pid, signal.SIGKILL)
