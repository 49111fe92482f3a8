"""`edgeherd tui --web`: the same app served to a browser on loopback (textual-serve), to that browser only: a
one-time token becomes a session cookie, foreign Host headers and websocket Origins are refused, the page carries
security headers and references no other host."""

from __future__ import annotations

import os
import re

import pytest

from tests.web_tui_helpers import filled_web_tui, get, session_cookie, stream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """One ``edgeherd --as dave tui --web`` on a filled database: (base URL, one-time token, process, log)."""
    pytest.importorskip("aiohttp")
    tmp = tmp_path_factory.mktemp("web")
    os.chmod(tmp, 0o701)
    with filled_web_tui(tmp) as served:
        yield served


@pytest.fixture(scope="module")
def cookie(web):
    base, token, _, _ = web
    return session_cookie(base, token)


def test_the_printed_url_starts_a_session_once_and_the_app_streams_with_it(web, cookie):
    base, token, _, log = web
    assert f"{base}/?token={token}" in log.read_text()
    again, _, _ = get(base, f"/?token={token}")  # one time only
    assert again == 401
    status, _, page = get(base, "/", {"Cookie": cookie})
    assert status == 200 and "textual.js" in page and f'data-session-websocket-url="{base.replace("http", "ws")}/ws"' \
        in page, page
    screen = stream(base, b"12 devices", cookie=cookie)
    assert "12 devices" in screen and "pi-04" in screen and "dave (viewer)" in screen


def test_without_the_session_every_page_and_the_websocket_get_401(web):
    import aiohttp

    base, _, _, _ = web
    for headers in ({}, {"Cookie": "edgeherd_tui=guessed"}):
        assert get(base, "/", headers)[0] == 401
        assert get(base, "/download/anything", headers)[0] == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            stream(base, b"devices", cookie=headers.get("Cookie"), timeout=5)
        assert refused.value.status == 401
    assert get(base, "/?token=not-the-token")[0] == 401


def test_a_websocket_from_another_origin_is_refused_even_with_the_cookie(web, cookie):
    import aiohttp

    base, _, _, _ = web
    for origin in ("http://evil.example", f"{base}.evil.example", "null", base.replace("127.0.0.1", "localhost")
                   + "0"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            stream(base, b"devices", cookie=cookie, origin=origin, timeout=5)
        assert refused.value.status == 403, origin
    assert "devices" in stream(base, b"devices", cookie=cookie, origin=base)  # its own origin is fine


def test_a_foreign_host_header_gets_421(web, cookie):
    base, token, _, _ = web
    port = base.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "127.0.0.1"):
        for path in ("/", f"/?token={token}", "/static/js/textual.js"):
            status, _, _ = get(base, path, {"Host": host, "Cookie": cookie})
            assert status == 421, (host, path)
    assert get(base, "/", {"Host": f"localhost:{port}", "Cookie": cookie})[0] == 200  # loopback names are fine


def test_answers_carry_security_headers_and_the_page_needs_no_other_host(web, cookie):
    base, _, _, _ = web
    for path, headers in (("/", {"Cookie": cookie}), ("/", {}), ("/edgeherd/page.css", {}),
                          ("/static/js/textual.js", {})):
        status, got, _ = get(base, path, headers)
        assert status in (200, 401), (path, status)
        csp = got["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp and "unsafe-inline" not in \
            csp.split("script-src", 1)[1].split(";", 1)[0], csp
        assert got["x-content-type-options"] == "nosniff" and got["x-frame-options"] == "DENY"
        assert got["referrer-policy"] == "no-referrer"
    _, got, page = get(base, "/", {"Cookie": cookie})
    assert got["cache-control"] == "no-store"
    assert "<script>" not in page and "onclick" not in page.lower()  # no inline script for the CSP to allow
    css = get(base, "/edgeherd/page.css")[2] + get(base, "/static/css/xterm.css")[2]
    script = get(base, "/edgeherd/focus.js")[2]
    # what a browser would fetch: src/href attributes, CSS url() and @import, script fetches (comments may name sites)
    fetched = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']|url\(\s*["']?|@import\s+["']|fetch\(\s*["'])"""
                         r"""\s*(?:https?:|wss?:)?//""", re.I)
    for text in (page, css, script):
        assert not fetched.findall(text), fetched.findall(text)
    assert re.findall(r'(?:src|href)="(/[^"]*)"', page) == ["/static/css/xterm.css", "/edgeherd/page.css",
                                                           "/static/js/textual.js", "/edgeherd/focus.js", "/"]
    assert "/static/fonts/RobotoMono" in css and "fonts.googleapis" not in page + css


def test_a_wildcard_listener_answers_to_loopback_and_this_machines_names():
    import socket

    from server.tui.web import allowed_hosts

    allowed = allowed_hosts("0.0.0.0", 8471)  # noqa: S104 - what the operator passed
    assert {"127.0.0.1:8471", "localhost:8471", f"{socket.gethostname().lower()}:8471"} <= allowed
    assert "0.0.0.0:8471" not in allowed and "evil.example:8471" not in allowed
    assert allowed_hosts("127.0.0.1", 8471) >= {"127.0.0.1:8471", "localhost:8471", "[::1]:8471"}
