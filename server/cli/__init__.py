"""``edgeherd``: the operator command line.

Sub-commands live in their own modules and are imported lazily, so
``edgeherd --help`` stays fast and does not import torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from protocol.version import __version__
from server.cli.build import build_command, bundle_app
from server.cli.keys import keys_app

app = typer.Typer(
    name="edgeherd",
    help="edgeherd: train, quantize, sign and roll out models to a fleet of edge devices.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(bundle_app, name="bundle")
app.command("build")(build_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgeherd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """edgeherd operator CLI."""


def main() -> None:
    app()
