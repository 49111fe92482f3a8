"""What the long-running commands of both sides share, the device agent's ``edgeherd-agent run`` and the server's
``edgeherd server run``: a ``--version`` option, log set-up, and waiting for SIGTERM or SIGINT. Standard library
at import; typer only inside :func:`version_option`, which only a command line calls."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from protocol.version import __version__

__all__ = ["configure_logging", "version_option", "wait_for_termination"]


def version_option(prog: str) -> Any:
    """A ``--version`` option for a Typer callback that prints ``prog <version>`` and exits."""
    import typer

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {__version__}")
            raise typer.Exit()

    return typer.Option("--version", help="Print the version and exit.", callback=show, is_eager=True)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def wait_for_termination() -> None:
    """Block until SIGTERM or SIGINT (for long-running commands)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
