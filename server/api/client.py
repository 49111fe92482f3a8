"""The operator API's client: what ``edgeherd login`` stores, and requests made with it.

``edgeherd login https://HOST:PORT --ca ca-bundle.pem`` stores the URL, the CA bundle it pins and the token in
``$XDG_CONFIG_HOME/edgeherd/login.json`` (``~/.config/edgeherd``; the file 0600, the directory 0700). A CI job
that has no login gives ``EDGEHERD_URL``, ``EDGEHERD_CA`` (a file) and ``EDGEHERD_TOKEN`` instead; those win over
the file. The operator's signing key (``edgeherd operator keygen``) is ``operator.key`` beside it.

Only the standard library: HTTPS with the pinned CA and host name checking, JSON in and out; a bundle is
streamed from its file.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from hardware.files import atomic_write

__all__ = ["ApiClient", "ApiError", "Login", "LoginError", "config_dir", "key_path", "load_login", "save_login"]

LOGIN_FILE = "login.json"
KEY_FILE = "operator.key"
TIMEOUT = 60.0
#: Largest answer read, bytes (an audit export of a busy year is far less).
MAX_RESPONSE = 256 << 20


class LoginError(Exception):
    """No usable login: the message says how to make one."""


class ApiError(Exception):
    """The server refused or failed a request; ``status`` is the HTTP status (0: it could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgeherd"


def key_path() -> Path:
    return config_dir() / KEY_FILE


@dataclass(frozen=True)
class Login:
    url: str
    ca_pem: str
    token: str

    def client(self) -> ApiClient:
        return ApiClient(self.url, self.ca_pem, self.token)


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise LoginError(f"{url!r}: the API's URL is https://HOST:PORT (edgeherd server run prints it)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise LoginError(f"{url!r}: give the server's address only, https://HOST:PORT, without a path")
    return f"https://{parts.netloc}"


def save_login(login: Login) -> Path:
    directory = config_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    path = directory / LOGIN_FILE
    atomic_write(path, json.dumps({"url": login.url, "ca": login.ca_pem, "token": login.token}), 0o600)
    return path


def load_login() -> Login | None:
    """The environment's login (``EDGEHERD_URL``/``EDGEHERD_CA``/``EDGEHERD_TOKEN``), else the stored one, else
    None: commands then work on the server host's database directly."""
    url = os.environ.get("EDGEHERD_URL")
    if url:
        token = os.environ.get("EDGEHERD_TOKEN", "")
        ca = os.environ.get("EDGEHERD_CA", "")
        if not token or not ca:
            raise LoginError("EDGEHERD_URL is set: set EDGEHERD_TOKEN (the token) and EDGEHERD_CA (the server's CA "
                             "bundle, a file) too")
        try:
            return Login(check_url(url), Path(ca).read_text(), token)
        except OSError as exc:
            raise LoginError(f"EDGEHERD_CA: cannot read {ca}: {exc.strerror or exc}") from None
    path = config_dir() / LOGIN_FILE
    try:
        raw = json.loads(path.read_text())
        return Login(check_url(raw["url"]), str(raw["ca"]), str(raw["token"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoginError(f"{path} is damaged ({exc}); run `edgeherd login` again") from None


class ApiClient:
    """Requests to one server, over HTTPS with its CA pinned."""

    def __init__(self, url: str, ca_pem: str, token: str | None, *, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(check_url(url))
        self.url = f"https://{parts.netloc}"
        self.host, self.port = parts.hostname or "", parts.port or 443
        self.token = token
        self.timeout = timeout
        try:
            self.context = ssl.create_default_context(cadata=ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise LoginError(f"the CA bundle is not PEM certificates: {exc}") from None
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2

    def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None,
                upload: Path | None = None) -> Any:
        """``method`` ``/api/v1`` + ``path``; the decoded JSON answer, or :class:`ApiError` with the server's
        reason."""
        target = "/api/v1" + quote(path, safe="/:@")
        if query:
            target += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=self.timeout)
        try:
            if upload is not None:
                headers["Content-Type"] = "application/octet-stream"
                headers["Content-Length"] = str(upload.stat().st_size)
                with upload.open("rb") as f:
                    conn.request(method, target, body=f, headers=headers)
                    response = conn.getresponse()
            else:
                data = None if body is None else json.dumps(body).encode()
                if data is not None:
                    headers["Content-Type"] = "application/json"
                conn.request(method, target, body=data, headers=headers)
                response = conn.getresponse()
            raw = response.read(MAX_RESPONSE + 1)
            if len(raw) > MAX_RESPONSE:
                raise ApiError(0, f"{self.url} answered with more than {MAX_RESPONSE >> 20} MiB; not a response "
                                  f"of the edgeherd API")
        except ssl.SSLCertVerificationError as exc:
            raise ApiError(0, f"{self.url} is not the server you logged in to: its certificate does not verify "
                              f"against the pinned CA ({exc.verify_message})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(0, f"cannot reach {self.url}: {exc}") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")[:500]
        if response.status >= 400:
            raise ApiError(response.status, f"{response.status}: {_reason(decoded)}")
        return decoded

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})


def _reason(decoded: Any) -> str:
    detail = decoded.get("detail") if isinstance(decoded, dict) else decoded
    if isinstance(detail, list):  # 422: the fields that did not validate
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []) if p != 'body')}: {d.get('msg', '')}"
                         if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)
