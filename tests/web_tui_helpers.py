"""Driving ``edgeherd tui --web`` as a browser does: the printed one-time URL, its session cookie, the websocket."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from tests.server_helpers import wait_for

URL = re.compile(r"(http://[^\s/]+)/\?token=([A-Za-z0-9_-]+)")


def printed_url(proc: subprocess.Popen[bytes], log: Path) -> tuple[str, str]:
    """(base URL, one-time token) once ``tui --web`` has printed them and answers on its port."""
    found = wait_for(lambda: URL.search(log.read_text()) or proc.poll() is not None, 60, "the web TUI's URL")
    assert proc.poll() is None, log.read_text()
    base, token = found.group(1), found.group(2)
    wait_for(lambda: _answers(base), 60, "the web TUI to listen")
    return base, token


def _answers(base: str) -> bool:
    try:
        get(base, "/static/css/xterm.css")
    except OSError:
        return False
    return True


def get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """(status, headers with lower-case names, body) of one GET, redirects not followed."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(errors="replace")
    finally:
        conn.close()


def session_cookie(base: str, token: str) -> str:
    """Open the one-time URL: the ``Cookie`` header value of the session it starts."""
    status, headers, _ = get(base, f"/?token={token}")
    assert status == 303 and headers["location"] == "/", (status, headers)
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    return cookie.split(";", 1)[0]


def stream(base: str, until: bytes, *, cookie: str | None, origin: str | None = None, timeout: float = 60) -> str:
    """What the websocket streams until ``until`` shows (or it closes); raises aiohttp's WSServerHandshakeError
    when the upgrade is refused."""
    import aiohttp

    headers = {}
    if cookie is not None:
        headers["Cookie"] = cookie
    if origin is not None:
        headers["Origin"] = origin

    async def run() -> str:
        seen = b""
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{base.replace('http://', 'ws://')}/ws?width=140&height=40", headers=headers) as ws:
            end = time.monotonic() + timeout
            while time.monotonic() < end and until not in seen:
                try:
                    msg = await ws.receive(timeout=5)
                except asyncio.TimeoutError:
                    continue
                if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    seen += msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
        return seen.decode("utf-8", errors="replace")

    return asyncio.run(run())


@contextmanager
def filled_web_tui(tmp: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes], Path]]:
    """``edgeherd --as dave tui --web`` on the TUI's fixed database state (tests/tui_state.py), on a free port: (base
    URL, one-time token, process, log) until the block ends."""
    from tests._mosquitto import free_port
    from tests.server_helpers import server_dir
    from tests.tui_state import fill

    data, _ = server_dir(tmp / "data")
    fill(data).engine.dispose()
    log = tmp / "web.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--as", "dave", "tui", "--web", "--port",
                                 str(free_port()), "--data-dir", str(data)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        base, token = printed_url(proc, log)
        yield base, token, proc, log
    finally:
        proc.terminate()
        proc.wait(30)
