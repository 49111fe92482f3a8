"""``edgeherd demo``: the whole system, end to end, on this machine (server/demo.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo_command(
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Where to run it (reusing a build there); "
                                                  "default: a temporary directory, removed afterwards.")] = None,
    no_tui: Annotated[bool, typer.Option("--no-tui", help="Print the summary and exit instead of opening the "
                                         "TUI at the end.")] = False,
) -> None:
    """Build, sign, roll out to six real agents, catch a broken v2 and a drifting device; then the TUI."""
    from server.demo import main

    raise typer.Exit(main(data_dir, tui=not no_tui))
