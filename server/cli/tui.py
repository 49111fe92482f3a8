"""``edgeherd tui``: the operator's terminal UI, in the terminal or (``--web``) in a browser."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from server.cli.fleet import Broker, DataDir, _fail
from server.cli.governance import acting_operator


def tui_command(
    ctx: typer.Context,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
    web: Annotated[bool, typer.Option("--web", help="Serve the TUI to a browser instead (textual-serve).")] = False,
    host: Annotated[str, typer.Option("--host", help="Address --web listens on (loopback by default).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port --web listens on.")] = 8471,
    refresh: Annotated[float, typer.Option("--refresh", min=0.2, help="Seconds between refreshes.")] = 2.0,
) -> None:
    """Fleet, rollouts, models, drift and audit, live. Who you act as: edgeherd --as USER tui."""
    from server.governance import GovernanceError

    try:
        actor = acting_operator(ctx)
    except GovernanceError as exc:
        _fail(exc)
    if web:
        from textual_serve.server import Server

        command = shlex.join([sys.executable, "-m", "server.cli", "--as", actor, "tui", "--data-dir",
                              str(data_dir.resolve()), "--refresh", str(refresh)]
                             + (["--broker", broker] if broker else []))
        typer.echo(f"serving the edgeherd TUI as {actor} on http://{host}:{port} (Ctrl-C stops)")
        Server(command, host=host, port=port, title="edgeherd").serve()
        return
    from server.settings import SettingError
    from server.tui.app import make_app

    try:
        app = make_app(data_dir, actor, broker_url=broker, refresh_s=refresh)
    except (GovernanceError, SettingError) as exc:  # a broken operators.toml or EDGEHERD_* setting, or bootstrap
        _fail(exc)  # mode refused: say so, without a traceback
    app.run()
