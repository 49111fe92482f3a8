"""``edgeherd tui``: the operator's terminal UI, in the terminal or (``--web``) in a browser.

With a login (``edgeherd login``, or ``EDGEHERD_URL``/``EDGEHERD_CA``/``EDGEHERD_TOKEN``) the TUI reads and acts
through the operator API as the token's operator, from anywhere; without one it opens the server host's database,
as the operator ``--as`` names.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from server.cli._common import Broker, CliState, DataDir, acting_operator
from server.net import is_loopback

#: The address ``--web`` listens on unless ``--host`` says otherwise.
LOOPBACK = "127.0.0.1"


def tui_command(
    ctx: typer.Context,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
    web: Annotated[bool, typer.Option("--web", help="Serve the TUI to a browser instead (textual-serve), to the "
                                      "browser that opens the one-time URL it prints.")] = False,
    host: Annotated[str | None, typer.Option("--host", help="Address --web listens on (default: loopback only).")
                    ] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port --web listens on.")] = 8471,
    refresh: Annotated[float, typer.Option("--refresh", min=0.2, help="Seconds between refreshes.")] = 2.0,
) -> None:
    """Fleet, rollouts, models, drift and audit, live. With a login, through the operator API as your token's
    operator; on the server host without one, who you act as: edgeherd --as USER tui."""
    from server.api.client import LoginError, load_login
    from server.cli.remote import AS_WITH_LOGIN, api_errors, fail
    from server.governance import GovernanceError
    from server.settings import SettingError
    from server.tui.app import EdgeherdApp, make_app, make_remote_app
    from server.tui.data import ActionError

    with api_errors():
        login = load_login()
    app: EdgeherdApp | None = None
    if login is not None:
        state = ctx.find_object(CliState)
        if state is not None and state.as_user is not None:
            fail(AS_WITH_LOGIN)
        try:  # asks the server who the token's operator is: a wrong login fails here, not in the first screen
            app = make_remote_app(login.url, login.ca_pem, login.token, refresh_s=refresh)
        except (ActionError, LoginError) as exc:
            fail(f"{login.url}: {exc}")
        actor = app.data.actor
        where = login.url
    else:
        try:
            actor = acting_operator(ctx)
        except GovernanceError as exc:
            fail(exc)
        where = str(data_dir.resolve())
    if web:
        from server.tui.web import WebTui

        listen = host if host is not None else LOOPBACK
        argv = [sys.executable, "-m", "server.cli"]
        if login is None:  # the login (environment or file) carries over to the served process as it is
            argv += ["--as", actor]
        argv += ["tui", "--refresh", str(refresh)]
        if login is None:
            argv += ["--data-dir", where] + (["--broker", broker] if broker else [])
        server = WebTui(shlex.join(argv), host=listen, port=port, title="edgeherd")
        typer.echo(f"serving the edgeherd TUI as {actor} ({where}); open, once, in your browser (Ctrl-C stops):")
        typer.echo(f"  {server.url}")
        typer.echo("the URL's token works once: it becomes this browser's session cookie; whoever has the page "
                   f"acts as {actor}", err=True)
        if not is_loopback(listen):
            typer.echo(f"warning: --host {listen} is not loopback: other machines can reach it, over plain HTTP "
                       f"(the token and the session cookie travel in clear)", err=True)
        server.serve()
        return
    if app is None:
        try:
            app = make_app(data_dir, actor, broker_url=broker, refresh_s=refresh)
        except (GovernanceError, SettingError) as exc:  # a broken operators.toml or EDGEHERD_* setting, or bootstrap
            fail(exc)  # mode refused: say so, without a traceback
    app.run()
