"""The command line as the operator API's client: what every remote-capable command shares.

With a login (``edgeherd login``, or ``EDGEHERD_URL``/``EDGEHERD_CA``/``EDGEHERD_TOKEN``), the commands that act on
the fleet go through the API as the token's operator; without one they open the server host's database, as the
operator ``--as`` names. :func:`remote` says which: the client, or None.

Errors: :class:`~server.api.client.ApiError` and :class:`~server.api.client.LoginError` become ``error: …`` on
stderr and exit status 1 (:func:`api_errors`).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from server.api.client import ApiClient, ApiError, LoginError, load_login
from server.cli._common import CliState, fail

__all__ = ["AS_WITH_LOGIN", "api_errors", "call", "fail", "pack_bundle", "remote", "require_remote", "short_time",
           "sign_decision_remote", "whoami"]

AS_WITH_LOGIN = "--as is for working on the server host; with a login, you act as your token's operator"
NO_LOGIN = ("no login: run `edgeherd login https://HOST:PORT --ca ca-bundle.pem` first (`edgeherd server init` on "
            "the server host prints the exact line)")


@contextmanager
def api_errors() -> Iterator[None]:
    """Turn the API's refusals and login problems into ``error: …``, exit 1."""
    try:
        yield
    except (ApiError, LoginError) as exc:
        fail(exc)


def _as_user(ctx: typer.Context | None) -> str | None:
    state = ctx.find_object(CliState) if ctx is not None else None
    return state.as_user if state is not None else None


def remote(ctx: typer.Context | None = None) -> ApiClient | None:
    """The logged-in API client, or None when there is no login (the command works on the local database).

    With a login, ``--as`` is an error: the token says who acts."""
    with api_errors():
        login = load_login()
    if login is None:
        return None
    if _as_user(ctx) is not None:
        fail(AS_WITH_LOGIN)
    with api_errors():
        return login.client()


def require_remote(ctx: typer.Context | None = None) -> ApiClient:
    """The logged-in client; ``error: no login`` otherwise."""
    client = remote(ctx)
    if client is None:
        fail(NO_LOGIN)
    return client


def call(client: ApiClient, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None,
         upload: Path | None = None) -> Any:
    """One request; the API's refusal as ``error: …``, exit 1."""
    with api_errors():
        if method == "POST" and body is None and upload is None:
            body = {}
        return client.request(method, path, body, query=query, upload=upload)


def whoami(client: ApiClient) -> dict[str, Any]:
    """GET /whoami: operator, role, scope, token, public_key."""
    answer: dict[str, Any] = call(client, "GET", "/whoami")
    return answer


def short_time(value: Any, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """An ISO timestamp from the API, shown in UTC as the local commands show it; ``—`` for none."""
    if not value:
        return "—"
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if at.tzinfo is not None:
        at = at.astimezone(timezone.utc)
    return at.strftime(fmt)


def pack_bundle(bundle: Path) -> Path:
    """The bundle directory as an uncompressed tar in a temporary file (the caller deletes it): ``manifest.json``,
    the model card if any and ``artifacts/*``, regular files only, at the archive's root."""
    from toolchain.bundle import CARD, MANIFEST

    if not bundle.is_dir():
        fail(f"{bundle} is not a bundle directory (manifest.json and artifacts/, as `edgeherd build` writes it)")
    if not (bundle / MANIFEST).is_file():
        fail(f"{bundle} has no {MANIFEST}: is it a bundle directory?")
    members = [MANIFEST] + ([CARD] if (bundle / CARD).is_file() else [])
    artifacts = bundle / "artifacts"
    if artifacts.is_dir():
        members += [f"artifacts/{p.name}" for p in sorted(artifacts.iterdir())
                    if p.is_file() and not p.is_symlink()]
    fd, name = tempfile.mkstemp(prefix="edgeherd-bundle-", suffix=".tar")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for member in members:
                info = tar.gettarinfo(str(bundle / member), arcname=member)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with (bundle / member).open("rb") as data:
                    tar.addfile(info, data)
    except OSError as exc:
        path.unlink(missing_ok=True)
        fail(f"cannot pack {bundle}: {exc.strerror or exc}")
    return path


def sign_decision_remote(client: ApiClient, ref: str, decision: str, reason: str, operator: str
                         ) -> dict[str, Any]:
    """Sign ``decision`` on ``ref`` as ``operator`` (the token's, from GET /whoami) with their key (``edgeherd
    operator keygen``) and send it; the answer of POST /models/{ref}/{decision}."""
    from protocol.errors import KeyFormatError
    from protocol.signing import load_private_key
    from server.api.client import key_path
    from server.signatures import sign_decision

    path = key_path()
    try:
        key = load_private_key(path.read_bytes())
    except FileNotFoundError:
        fail(f"no signing key at {path}: decisions are signed; run `edgeherd operator keygen` first (it writes the "
             f"key and registers its public half with the server)")
    except (OSError, KeyFormatError) as exc:
        fail(f"cannot use the signing key {path}: {exc}; `edgeherd operator keygen --force` makes a new one")
    version: dict[str, Any] = call(client, "GET", f"/models/{ref}")
    model = f"{version['name']}:{version['version']}"
    signature = sign_decision(key, manifest_sha256=str(version["manifest_sha256"]), model=model, decision=decision,
                              operator=operator, reason=reason)
    answer: dict[str, Any] = call(client, "POST", f"/models/{ref}/{decision}",
                                  {"reason": reason, "signature": signature})
    return answer
