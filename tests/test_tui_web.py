"""`edgeherd tui --web`: the same app served to a browser on loopback (textual-serve)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests._mosquitto import free_port
from tests.server_helpers import server_dir
from tests.tui_state import fill

pytestmark = pytest.mark.integration


def test_the_web_tui_serves_the_page_and_streams_the_app(tmp_path):
    aiohttp = pytest.importorskip("aiohttp")
    data, _ = server_dir(tmp_path / "data")
    fill(data).engine.dispose()
    port = free_port()
    log = (tmp_path / "web.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--as", "dave", "tui", "--web", "--port", str(port),
                             "--data-dir", str(data)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    page = resp.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "web.log").read_text()
                time.sleep(0.3)
        assert "textual.js" in page and f"ws://127.0.0.1:{port}/ws" in page

        async def stream() -> str:  # what a browser's terminal receives: the app drawing its Fleet screen
            seen = b""
            async with aiohttp.ClientSession() as session, session.ws_connect(
                    f"ws://127.0.0.1:{port}/ws?width=140&height=40") as ws:
                end = time.monotonic() + 60
                while time.monotonic() < end and b"12 devices" not in seen:
                    try:
                        msg = await ws.receive(timeout=5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        seen += msg.data
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        seen += msg.data.encode()
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
            return seen.decode("utf-8", errors="replace")

        screen = asyncio.run(stream())
        assert "12 devices" in screen and "pi-04" in screen and "dave (viewer)" in screen
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
