"""``edgeherd``: the operator command line.

Sub-commands live in their own modules and are imported lazily, so
``edgeherd --help`` stays fast and does not import torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from agent.cli import version_option
from server.cli.build import build_command, bundle_app
from server.cli.fleet import deploy_command, device_app, fleet_app, model_app, server_app
from server.cli.keys import keys_app

app = typer.Typer(
    name="edgeherd",
    help="edgeherd: train, quantize, sign and roll out models to a fleet of edge devices.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(bundle_app, name="bundle")
app.add_typer(server_app, name="server")
app.add_typer(device_app, name="device")
app.add_typer(model_app, name="model")
app.add_typer(fleet_app, name="fleet")
app.command("build")(build_command)
app.command("deploy")(deploy_command)


@app.callback()
def _root(version: Annotated[bool, version_option("edgeherd")] = False) -> None:
    """edgeherd operator CLI."""


def main() -> None:
    app()
