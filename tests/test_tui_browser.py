"""`edgeherd tui --web` in a real browser: headless Chromium (Debian's `chromium`; `make test` installs it), driven
over the DevTools protocol. With the printed URL the page loads, `r` pressed without a click reaches the TUI and the
rollouts screen comes back; without the token the browser gets 401."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request
from typing import Any

import pytest

from tests._mosquitto import free_port
from tests.server_helpers import wait_for
from tests.web_tui_helpers import filled_web_tui

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab over the DevTools protocol: commands, and the events that arrive meanwhile."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mine = self.next_id
        await self.ws.send_str(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=30)).data)
            if msg.get("id") == mine:
                assert "error" not in msg, msg
                return dict(msg.get("result", {}))
            self.events.append(msg)

    async def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = await self.ws.receive(timeout=max(0.05, end - time.monotonic()))
            except asyncio.TimeoutError:
                return
            self.events.append(json.loads(msg.data))

    def frames(self) -> str:
        """Everything the page's websockets received so far, as text."""
        out = []
        for e in self.events:
            if e.get("method") == "Network.webSocketFrameReceived":
                r = e["params"]["response"]
                out.append(base64.b64decode(r["payloadData"]).decode(errors="replace") if r["opcode"] == 2
                           else r["payloadData"])
        return "".join(out)

    def document_status(self, url_prefix: str) -> int | None:
        for e in self.events:
            if e.get("method") == "Network.responseReceived" and e["params"]["type"] == "Document" and \
                    e["params"]["response"]["url"].startswith(url_prefix):
                return int(e["params"]["response"]["status"])
        return None

    async def wait_frames(self, text: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while text not in self.frames():
            assert time.monotonic() < end, f"{text!r} never came: {self.frames()[-2000:]!r}"
            await self.pump(0.5)
        return self.frames()


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium with the DevTools protocol on a free loopback port: its base URL."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed; `make test` installs it (apt-get install chromium)")
    profile = tmp_path / "chromium"
    port = free_port()
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking",
                             "--remote-allow-origins=*", f"--remote-debugging-port={port}",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def tabs() -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                found = [t for t in json.loads(resp.read()) if t.get("type") == "page"]
                return found or None
        except OSError:
            assert proc.poll() is None, "chromium exited"
            return None

    try:
        wait_for(tabs, 60, "chromium's DevTools endpoint")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _open_tab(devtools: str) -> tuple[Any, Any]:
    import aiohttp

    session = aiohttp.ClientSession()
    async with session.put(f"{devtools}/json/new?about:blank") as resp:
        target = await resp.json()
    ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20)
    return session, ws


def test_the_browser_loads_the_tui_with_the_token_keys_work_without_a_click_and_without_it_gets_401(
        tmp_path, chromium):
    pytest.importorskip("aiohttp")
    with filled_web_tui(tmp_path) as (base, token, _, _):

        async def browse() -> tuple[int | None, str, str, int | None]:
            session, ws = await _open_tab(chromium)
            try:
                page = Page(ws)
                await page.send("Network.enable")
                await page.send("Page.enable")
                # without the token first: the browser gets 401 and the page says what to do
                await page.send("Page.navigate", url=f"{base}/")
                await page.pump(2)
                refused = page.document_status(base)
                said = (await page.send("Runtime.evaluate", expression="document.body.innerText"))["result"]["value"]
                # then the printed URL: the session starts, the TUI streams its Fleet screen
                page.events.clear()
                await page.send("Page.navigate", url=f"{base}/?token={token}")
                await page.wait_frames("12 devices", 60)
                landed = page.document_status(base)
                # `r`, pressed with no click anywhere: the terminal has the keyboard already
                for kind in ("keyDown", "char", "keyUp"):
                    await page.send("Input.dispatchKeyEvent", type=kind, key="r", code="KeyR", text="r",
                                    unmodifiedText="r", windowsVirtualKeyCode=82)
                screen = await page.wait_frames("digits-1-1-lab", 30)
                return refused, said, screen, landed
            finally:
                await ws.close()
                await session.close()

        refused, said, screen, landed = asyncio.run(browse())
    assert refused == 401 and "Open the URL with the token" in said, (refused, said)
    assert landed == 200  # after the token's redirect, the page itself
    assert "digits-1-1-lab" in screen and "digits-1-0-prod" in screen
