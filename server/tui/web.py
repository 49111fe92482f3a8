"""``edgeherd tui --web``: the TUI served to a browser (textual-serve), and only to the browser it was meant for.

textual-serve runs the TUI as a child process per websocket and streams its terminal. Whoever can open that
websocket drives the TUI as the operator who started it, so :class:`WebTui` puts in front of it:

- **A session secret.** ``tui --web`` prints a URL with a one-time token (as Jupyter does). Opening it sets an
  HttpOnly, ``SameSite=Strict`` cookie holding a separate session secret, and redirects to the bare page, so the
  token leaves the address bar and cannot be used again. Every page, download and websocket needs the cookie:
  401 without it.
- **The Host header** must be one the server was told to answer to (its listening address, plus ``localhost`` and
  the loopback addresses when it listens on loopback): 421 otherwise, so a DNS-rebinding page that reaches the
  port under its own name gets nothing.
- **The Origin of a websocket upgrade** must be this server's own origin: 403 otherwise, so another website open
  in the operator's browser cannot connect, even with the cookie (which ``SameSite=Strict`` already withholds).
- **Security headers** on every answer: a Content-Security-Policy with no inline or third-party script
  (``frame-ancestors 'none'``, connections to this origin only), ``X-Content-Type-Options: nosniff``,
  ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``; pages are ``Cache-Control: no-store``.
- **A page of our own** (``server/tui/webpage/``): no third-party fonts or stylesheets (the font comes from
  textual-serve's own static files), and a script file that gives the terminal keyboard focus as soon as it
  exists, so keys work without a click.
"""

from __future__ import annotations

import hmac
import secrets
import socket
from html import escape
from pathlib import Path
from typing import Any

from aiohttp import web
from textual_serve.server import Server

from server.net import is_loopback

__all__ = ["COOKIE", "WebTui", "allowed_hosts"]

COOKIE = "edgeherd_tui"
ASSETS = Path(__file__).with_name("webpage")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """Host header values (``name:port``, lower case) the server answers to."""
    names = {host, *extra}
    if host in ("0.0.0.0", "::"):  # noqa: S104 - every address: loopback, and this machine's own names
        names = (names - {host}) | set(LOOPBACK_NAMES) | {socket.gethostname(), socket.getfqdn()}
    if is_loopback(host):
        names |= set(LOOPBACK_NAMES)
    out = set()
    for name in names:
        shown = f"[{name}]" if ":" in name else name
        out.add(f"{shown}:{port}".lower())
        if port == 80:
            out.add(shown.lower())
    return frozenset(out)


def _csp(origin_host: str) -> str:
    return ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            f"font-src 'self'; connect-src ws://{origin_host}; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'none'")


class WebTui(Server):
    """textual-serve's server, answering only its own operator's browser (see the module docstring)."""

    def __init__(self, command: str, *, host: str, port: int, title: str = "edgeherd",
                 extra_hosts: tuple[str, ...] = ()) -> None:
        super().__init__(command, host=host, port=port, title=title)
        self.allowed = allowed_hosts(host, port, extra_hosts)
        #: The one-time token in the printed URL; None once it has been exchanged for the cookie.
        self.token: str | None = secrets.token_urlsafe(32)
        self.session = secrets.token_urlsafe(32)
        shown = f"[{host}]" if ":" in host else host
        if host in ("0.0.0.0", "::"):  # noqa: S104 - a listening address, chosen by the operator
            shown = "127.0.0.1"
        self.url = f"http://{shown}:{port}/?token={self.token}"

    # -- the checks -------------------------------------------------------------------------------

    def _authenticated(self, request: web.Request) -> bool:
        return hmac.compare_digest(request.cookies.get(COOKIE, ""), self.session)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host", "").lower()
        if host not in self.allowed:
            return self._headers(web.Response(status=421, text=f"this server does not answer to {host!r}\n"),
                                 host)
        if request.path.startswith("/static/") or request.path.startswith("/edgeherd/"):
            return self._headers(await handler(request), host)
        if request.path == "/" and "token" in request.query:
            return self._headers(self._exchange(request), host)
        if request.path == "/ws":
            origin = request.headers.get("Origin")
            if origin is not None and origin.lower() != f"http://{host}":
                return self._headers(web.Response(status=403, text="websocket from another origin refused\n"),
                                     host)
        if not self._authenticated(request):
            return self._headers(web.Response(
                status=401, content_type="text/html",
                text="<!DOCTYPE html><title>edgeherd</title><p>Open the URL with the token that "
                     "<code>edgeherd tui --web</code> printed.</p>"), host)
        return self._headers(await handler(request), host)

    def _exchange(self, request: web.Request) -> web.StreamResponse:
        given = request.query.get("token", "")
        if self.token is None or not hmac.compare_digest(given, self.token):
            return web.Response(status=401, text="this token is not valid (it works once; restart "
                                                 "`edgeherd tui --web` for a new one)\n")
        self.token = None
        response = web.HTTPSeeOther("/")
        response.set_cookie(COOKIE, self.session, httponly=True, samesite="Strict", path="/")
        return response

    @staticmethod
    def _headers(response: web.StreamResponse, host: str) -> web.StreamResponse:
        if response.prepared:  # a websocket or a stream: its headers are gone already
            return response
        h = response.headers
        h.setdefault("Content-Security-Policy", _csp(host))
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "no-referrer")
        if response.content_type == "text/html":
            h["Cache-Control"] = "no-store"
        return response

    # -- the app ------------------------------------------------------------------------------------

    async def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.add_routes([
            web.get("/", self.handle_index, name="index"),
            web.get("/ws", self.handle_websocket, name="websocket"),
            web.get("/download/{key}", self.handle_download, name="download"),
            web.static("/static", self.statics_path, show_index=False, name="static"),
            web.static("/edgeherd", ASSETS, show_index=False, name="assets"),
        ])
        app.on_startup.append(self.on_startup)
        app.on_shutdown.append(self.on_shutdown)
        return app

    async def handle_index(self, request: web.Request) -> web.Response:
        """The page, with the websocket on the host the browser used (so the cookie goes with it)."""
        font_size = request.query.get("fontsize", "16")
        size = int(font_size) if font_size.isdigit() and 6 <= int(font_size) <= 64 else 16
        page = (ASSETS / "page.html").read_text()
        page = (page.replace("@@TITLE@@", escape(self.title))
                .replace("@@WS@@", escape(f"ws://{request.host}/ws"), 1)
                .replace("@@FONT_SIZE@@", str(size)))
        return web.Response(text=page, content_type="text/html")

    async def on_startup(self, app: web.Application) -> None:
        self.console.print(f"serving {self.title} on {self.url.split('?')[0]}")

