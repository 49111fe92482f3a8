"""Serving the operator API over HTTPS from ``edgeherd server run``: uvicorn in a thread of the server process.

The certificate is the server's own (``<data>/pki/api.pem``, from the CA that signs the broker's; re-issued when
the names change), for the names the broker's certificate has (``--public-host`` and loopback). Clients pin
``<data>/pki/ca-bundle.pem`` (``edgeherd login --ca``). TLS 1.2 at least. Where it listens is written to
``<data>/api.json`` (``{"url": …, "host": …, "port": …}``) for the server host's own tools.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import uvicorn

from hardware.files import atomic_write
from server.api.app import create_app
from server.pki import Authority
from server.registry import Registry

__all__ = ["API_FILE", "DEFAULT_API_PORT", "MAX_BUNDLE", "ApiServer", "parse_api_listen"]

log = logging.getLogger(__name__)

API_FILE = "api.json"
DEFAULT_API_PORT = 9443
#: Largest model bundle the API accepts, bytes (``EDGEHERD_API_MAX_BUNDLE``).
MAX_BUNDLE = int(os.environ.get("EDGEHERD_API_MAX_BUNDLE", str(1 << 30)))


def parse_api_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free one); ValueError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--api-listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_API_PORT}")
    return host.strip("[]"), int(port)


class ApiServer:
    """The API on ``host:port`` over HTTPS until :meth:`stop`."""

    def __init__(self, registry: Registry, host: str, port: int, names: list[str]) -> None:
        self.registry = registry
        authority = Authority.open(registry.data)
        extra = [] if host in ("0.0.0.0", "::") else [host]  # noqa: S104 - a listener, checked by the operator
        authority.api_certificate(list(dict.fromkeys([*names, *extra, "localhost", "127.0.0.1"])))
        # IPPROTO_TCP said outright: asyncio turns Nagle's algorithm off only for sockets whose proto says TCP, and
        # with it on every answer waits about 40 ms for the client's delayed ACK
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                  socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise OSError(f"the operator API cannot listen on {host}:{port}: {exc.strerror or exc}; pick another "
                          f"with --api-listen HOST:PORT") from None
        self.host, self.port = host, self.sock.getsockname()[1]
        shown = names[0] if names else ("127.0.0.1" if host in ("0.0.0.0", "::") else host)  # noqa: S104
        self.url = f"https://{shown}:{self.port}"
        config = uvicorn.Config(create_app(registry, max_bundle=MAX_BUNDLE), ssl_certfile=str(authority.api_cert),
                                ssl_keyfile=str(authority.api_key), ssl_version=ssl.PROTOCOL_TLS_SERVER,
                                log_level="warning", access_log=False, lifespan="off", server_header=False,
                                timeout_keep_alive=30, limit_concurrency=200, h11_max_incomplete_event_size=16384)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="operator-api", daemon=True)
        self.ca_bundle: Path = authority.ca_bundle

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except Exception:
            log.exception("the operator API stopped")

    def start(self, timeout: float = 30.0) -> ApiServer:
        self.sock.listen(128)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the operator API did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        atomic_write(self.registry.data / API_FILE,
                     json.dumps({"url": self.url, "host": self.host, "port": self.port,
                                 "ca": str(self.ca_bundle)}), 0o644)
        log.info("operator API on %s (CA bundle %s)", self.url, self.ca_bundle)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
