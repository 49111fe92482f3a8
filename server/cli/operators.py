"""``edgeherd server init``, ``edgeherd login|logout`` and ``edgeherd operator …``: who may use the operator API.

On the server host, ``server init --admin NAME`` creates ``operators.toml`` with its first admin and prints that
admin's token once, with the ``edgeherd login`` line to run on the admin's own machine. Everything else here talks
to the API with the stored login (server/api/client.py); only ``operator add`` also works on the server host
without one, as an admin named by ``--as``.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from server.cli._common import DataDir, acting_operator, console, open_engine
from server.cli.remote import api_errors, call, fail, remote, require_remote, short_time, whoami

__all__ = ["login_command", "logout_command", "operator_app", "server_init"]

operator_app = typer.Typer(help="Operators, their API tokens and signing keys (docs/api.md).", no_args_is_help=True)

TtlDays = Annotated[float, typer.Option("--ttl-days", min=0.001, max=366, help="Days until the token expires.")]
#: A token or key file bigger than this is not one.
MAX_TOKEN_FILE = 4096


def _plain(text: str) -> None:
    """A line to copy: unwrapped, no markup."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def _api_url(data_dir: Path, api_listen: str | None) -> str:
    """The address the API will be reached at: what a running server wrote to api.json, else what --api-listen
    and the broker's public host names say."""
    from server.api.serve import API_FILE, DEFAULT_API_PORT, parse_api_listen

    if api_listen is None:
        try:
            url = json.loads((data_dir / API_FILE).read_text()).get("url")
            if isinstance(url, str) and url.startswith("https://"):
                return url
        except (OSError, ValueError, AttributeError):
            pass
    try:
        names = json.loads((data_dir / "broker" / "listener.json").read_text()).get("public_hosts") or []
    except (OSError, ValueError, AttributeError):
        names = []
    host, port = parse_api_listen(api_listen) if api_listen else ("", DEFAULT_API_PORT)
    if port == 0:  # any free port: known once the server runs
        return f"https://{names[0] if names else host or '127.0.0.1'}:PORT"
    if names:
        shown = str(names[0])
    elif host and host not in ("0.0.0.0", "::"):  # noqa: S104 - a listener's wildcard, not a bind
        shown = host
    else:
        shown = "127.0.0.1"
    return f"https://{shown}:{port}"


def server_init(
    ctx: typer.Context,
    admin: Annotated[str, typer.Option("--admin", help="The first admin's operator name.")],
    ttl_days: TtlDays = 90.0,
    api_listen: Annotated[str | None, typer.Option(
        "--api-listen", envvar="EDGEHERD_API_LISTEN", help="HOST:PORT `server run` serves the API on, for the "
        "login line printed (default: its own default, port 9443).")] = None,
    data_dir: DataDir = Path("data"),
) -> None:
    """Create operators.toml with its first admin and print the admin's API token (once) and how to log in.

    Run on the server host, once; refused when operators.toml exists (add more with `edgeherd operator add`)."""
    from server.api.serve import DEFAULT_API_PORT
    from server.governance import GovernanceError
    from server.operators import init_operators

    if api_listen is not None:
        try:
            from server.api.serve import parse_api_listen

            parse_api_listen(api_listen)
        except ValueError as exc:
            fail(exc)
    engine = open_engine(data_dir)
    try:
        token, row = init_operators(data_dir, engine, admin, actor=acting_operator(ctx),
                                    ttl=timedelta(days=ttl_days))
    except GovernanceError as exc:
        fail(exc)
    finally:
        engine.dispose()
    ca = (data_dir / "pki" / "ca-bundle.pem").resolve()
    url = _api_url(data_dir, api_listen)
    console.print(f"created {data_dir / 'operators.toml'} with admin [bold]{admin}[/]")
    console.print(f"{admin}'s API token ({row.id}, expires {row.expires_at:%Y-%m-%d}); it is shown only this once:")
    _plain(token)
    console.print("log in from the admin's machine with (paste the token when asked):")
    _plain(f"  edgeherd login {url} --ca {ca}")
    notes = []
    if api_listen is None and url.endswith(f":{DEFAULT_API_PORT}"):
        notes.append(f"port {DEFAULT_API_PORT} is `server run --api-listen`'s default")
    if url.endswith(":PORT"):
        notes.append(f"--api-listen {api_listen} picks a free port when `server run` starts; it is in "
                     f"{data_dir / 'api.json'} then")
    if not ca.exists():
        notes.append("the CA bundle is created when `edgeherd server run` first starts; copy it to that machine")
    if notes:
        console.print("(" + "; ".join(notes) + ")")


def _read_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            if token_file.stat().st_size > MAX_TOKEN_FILE:
                fail(f"{token_file} is larger than {MAX_TOKEN_FILE} bytes: it holds no single token")
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read the token file {token_file}: {exc.strerror or exc}")
        if not token:
            fail(f"{token_file} is empty: it should hold the token `edgeherd server init` or `operator add` printed")
        return token
    token = os.environ.get("EDGEHERD_TOKEN", "").strip()
    if token:
        return token
    # a pipe gives the token on stdin; a terminal gets a prompt that does not echo it
    token = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("token: ").strip()
    if not token:
        fail("no token: give --token-file FILE, set EDGEHERD_TOKEN, or paste it when asked")
    return token


def login_command(
    url: Annotated[str, typer.Argument(help="The API's address, https://HOST:PORT (`edgeherd server init` and "
                                       "`server run` print it).")],
    ca: Annotated[Path, typer.Option("--ca", help="The server's CA bundle (<data>/pki/ca-bundle.pem on the server "
                                     "host): the only CA trusted for this server.")],
    token_file: Annotated[Path | None, typer.Option("--token-file", help="A file holding the token (else "
                                                    "$EDGEHERD_TOKEN, else a hidden prompt).")] = None,
) -> None:
    """Check that the server answers with this CA and token, then store the login (0600) for later commands."""
    from server.api.client import ApiClient, Login, LoginError, check_url, save_login

    try:
        pem = ca.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the CA bundle {ca}: {getattr(exc, 'strerror', None) or exc}")
    token = _read_token(token_file)
    try:
        base = check_url(url)
        client = ApiClient(base, pem, token)
    except LoginError as exc:
        fail(exc)
    me = call(client, "GET", "/whoami")
    with api_errors():
        path = save_login(Login(base, pem, token))
    console.print(f"logged in to {base} as [bold]{me['operator']}[/] ({me['role']}, token {me['token']}, scope "
                  f"{me['scope']}); login stored in {path}")
    if os.environ.get("EDGEHERD_URL"):
        console.print("note: EDGEHERD_URL is set in this environment, and wins over the stored login")
    if me.get("public_key") is None and me["role"] in ("approver", "admin"):
        console.print("approvals are signed: run `edgeherd operator keygen` once to make your signing key")


def logout_command() -> None:
    """Forget the stored login (the token stays valid until it expires or `edgeherd operator revoke` ends it)."""
    from server.api.client import LOGIN_FILE, config_dir

    path = config_dir() / LOGIN_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        console.print(f"not logged in ({path} does not exist)")
        return
    except OSError as exc:
        fail(f"cannot remove {path}: {exc.strerror or exc}")
    console.print(f"logged out: removed {path}")


# -- operator … --------------------------------------------------------------------------------------------------


@operator_app.command("add")
def operator_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The new operator's name.")],
    role: Annotated[str, typer.Option("--role", help="viewer, operator, approver or admin (docs/governance.md).")],
    ttl_days: TtlDays = 90.0,
    data_dir: DataDir = Path("data"),
) -> None:
    """Add an operator with a role (admins only) and print their first API token, once.

    With a login this goes through the API. Without one it works on the server host's data directory, acting as
    the admin named by --as (else $EDGEHERD_OPERATOR, else your OS user name)."""
    from server.governance import GovernanceError, Role

    try:
        wanted = Role(role)
    except ValueError:
        fail(f"--role {role!r}: one of {', '.join(r.value for r in Role)}")
    client = remote(ctx)
    if client is not None:
        answer = call(client, "POST", "/operators", {"name": name, "role": wanted.value, "ttl_days": ttl_days})
        token, info = answer["token"], answer["token_info"]
    else:
        from server.governance import Governance, Permission
        from server.operators import add_operator

        try:
            actor = acting_operator(ctx)
            Governance.load(data_dir).require(actor, Permission.MANAGE_OPERATORS)
            engine = open_engine(data_dir)
            try:
                token, row = add_operator(data_dir, engine, name, wanted, actor=actor, ttl=timedelta(days=ttl_days))
            finally:
                engine.dispose()
        except GovernanceError as exc:
            fail(exc)
        info = {"id": row.id, "expires_at": row.expires_at.isoformat()}
    console.print(f"added [bold]{name}[/] ({wanted.value}); their API token ({info['id']}, expires "
                  f"{short_time(info['expires_at'], '%Y-%m-%d')}), shown only this once:")
    _plain(token)
    console.print("they log in with `edgeherd login URL --ca ca-bundle.pem` and this token")


@operator_app.command("tokens")
def operator_tokens(ctx: typer.Context) -> None:
    """API tokens: an admin sees everyone's, anyone else their own (never the tokens themselves)."""
    rows: list[dict[str, Any]] = call(require_remote(ctx), "GET", "/operators/tokens")
    table = Table("token", "operator", "scope", "label", "created", "by", "expires", "last used", "revoked")
    for t in rows:
        table.add_row(t["id"], t["operator"], t["scope"], t["label"] or "—", short_time(t["created_at"]),
                      t["created_by"], short_time(t["expires_at"]), short_time(t["last_used_at"]),
                      short_time(t["revoked_at"]))
    console.print(table)


@operator_app.command("token")
def operator_token(
    ctx: typer.Context,
    for_: Annotated[str | None, typer.Option("--for", metavar="NAME", help="Another operator's (admins only; "
                                             "default: yours).")] = None,
    scope: Annotated[str, typer.Option("--scope", help="full (what the role allows) or push (read, push models and "
                                       "features: for CI).")] = "full",
    ttl_days: TtlDays = 90.0,
    label: Annotated[str, typer.Option("--label", help="What it is for, e.g. 'ci: model repo'.")] = "",
) -> None:
    """Make a new API token and print it, once."""
    if scope not in ("full", "push"):
        fail(f"--scope {scope!r}: full or push")
    answer = call(require_remote(ctx), "POST", "/operators/tokens",
                  {"operator": for_, "scope": scope, "ttl_days": ttl_days, "label": label})
    info = answer["token_info"]
    console.print(f"new {info['scope']} token {info['id']} for {info['operator']} (expires "
                  f"{short_time(info['expires_at'], '%Y-%m-%d')}), shown only this once:")
    _plain(answer["token"])


@operator_app.command("revoke")
def operator_revoke(ctx: typer.Context,
                    token_id: Annotated[str, typer.Argument(help="tok_… (`edgeherd operator tokens` lists them).")]
                    ) -> None:
    """Revoke an API token: yours, or anyone's for an admin."""
    info = call(require_remote(ctx), "DELETE", f"/operators/tokens/{token_id}")
    console.print(f"revoked {info['id']} ({info['operator']}, {info['scope']})")


@operator_app.command("whoami")
def operator_whoami(ctx: typer.Context) -> None:
    """Who the stored login acts as: operator, role, token and signing key."""
    client = remote(ctx)
    if client is None:
        console.print(f"no login; on the server host you act as {acting_operator(ctx)} (--as, $EDGEHERD_OPERATOR "
                      "or your OS user name), with the role operators.toml gives")
        return
    me = whoami(client)
    console.print(f"{me['operator']} ({me['role']}) at {client.url}, token {me['token']} (scope {me['scope']}); "
                  f"signing key: {me['public_key'] or 'none (`edgeherd operator keygen`)'}")


@operator_app.command("keygen")
def operator_keygen(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key (decisions signed with the old "
                                        "one still verify: each approval keeps the key it was signed with).")
                     ] = False,
) -> None:
    """Make your Ed25519 key for signing approvals (kept beside the login, 0600) and register its public half with
    the server."""
    from hardware.files import atomic_write
    from protocol.signing import generate_signing_key, key_id, private_key_to_pem, public_key_to_text
    from server.api.client import key_path

    client = require_remote(ctx)
    path = key_path()
    if path.exists() and not force:
        fail(f"{path} already exists; --force replaces it with a new key")
    key = generate_signing_key()
    public = public_key_to_text(key.public_key())
    body: dict[str, str] = {"public_key": public}
    if path.exists():  # the key it replaces signs the replacement: a token alone cannot swap keys
        from protocol.errors import KeyFormatError
        from protocol.signing import load_private_key
        from server.signatures import sign_key_replacement

        try:
            body["previous_signature"] = sign_key_replacement(load_private_key(path.read_bytes()), public)
        except (OSError, KeyFormatError) as exc:
            fail(f"{path} cannot be read as the key it replaces ({exc}); an admin can register a new key for you "
                 f"(PUT /api/v1/operators/NAME/key)")
    call(client, "PUT", "/operators/me/key", body)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, private_key_to_pem(key), 0o600)
    except OSError as exc:
        fail(f"the server registered the new key, but {path} could not be written ({exc.strerror or exc}); run "
             f"`edgeherd operator keygen --force` again")
    console.print(f"signing key {key_id(key.public_key())} written to {path}; its public key {public} is registered "
                  "for your approvals")
