"""A real ``edgeherd server run`` process serving the operator API over HTTPS, with operators and their tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.api.client import ApiClient
from server.governance import Role
from server.operators import add_operator, init_operators
from server.registry import Registry
from tests.server_helpers import server_dir, wait_for

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ApiServer:
    """The server process, its data directory, and a token per operator."""

    data: Path
    key: Ed25519PrivateKey
    proc: subprocess.Popen[bytes]
    log: Path
    url: str
    ca_pem: str
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, operator: str | None = None, *, token: str | None = None) -> ApiClient:
        """A client with ``operator``'s token (or ``token`` as given; None: no token)."""
        return ApiClient(self.url, self.ca_pem, self.tokens[operator] if operator is not None else token)

    @property
    def ca_file(self) -> Path:
        return self.data / "pki" / "ca-bundle.pem"


def start_server(data: Path, log: Path, *,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``edgeherd server run`` on ``data`` (managed broker, API on a free loopback port); the process and what
    ``api.json`` says once the API listens."""
    (data / "api.json").unlink(missing_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "server", "run", "--data-dir", str(data),
                                 "--metrics-port", "0", "--drift-interval", "0", "--rollout-interval", "0.3",
                                 "--api-listen", "127.0.0.1:0", *extra],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_for(lambda: (data / "api.json").exists() or proc.poll() is not None, 60, "the operator API to listen")
    assert proc.poll() is None, f"server run exited {proc.returncode}:\n{log.read_text()[-3000:]}"
    info: dict[str, str] = json.loads((data / "api.json").read_text())
    return proc, info


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def api_server(tmp: Path, operators: dict[str, Role] | None = None) -> Iterator[ApiServer]:
    """A fresh data directory whose first admin is ``admin``, plus ``operators`` (name → role), each with a token;
    ``edgeherd server run`` serving it until the block ends."""
    data, key = server_dir(tmp / "data")
    registry = Registry(data)
    tokens = {"admin": init_operators(data, registry.engine, "admin", actor="root")[0]}
    for name, role in (operators or {}).items():
        tokens[name] = add_operator(data, registry.engine, name, role, actor="admin")[0]
    registry.engine.dispose()
    log = tmp / "server.log"
    proc, info = start_server(data, log)
    try:
        yield ApiServer(data, key, proc, log, info["url"], Path(info["ca"]).read_text(), tokens)
    finally:
        stop_server(proc)
