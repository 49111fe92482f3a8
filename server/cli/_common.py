"""What every ``edgeherd`` command module shares: the consoles, the data-directory and broker options, how a
command fails, who is acting, and the registry and database of a data directory. A leaf: it imports no other
command module, so the command modules never import each other for these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["Broker", "CliState", "DataDir", "acting_operator", "console", "err", "fail", "open_engine", "open_registry",
           "require_actor"]

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="EDGEHERD_DATA_DIR",
                                       help="Server data directory (database, store, keys, broker files).")]
Broker = Annotated[str | None, typer.Option("--broker", envvar="EDGEHERD_BROKER_URL",
                                            help="Broker URL; default: the managed Mosquitto of the data dir.")]


@dataclass
class CliState:
    """What the root ``edgeherd`` callback parsed, for the sub-commands (``ctx.obj``)."""

    as_user: str | None = None


def fail(message: Exception | str) -> NoReturn:
    """``error: …`` on stderr, exit status 1."""
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


def acting_operator(ctx: typer.Context) -> str:
    """The operator a command acts as: ``--as``, ``$EDGEHERD_OPERATOR`` or the OS user."""
    from server.governance import current_operator

    state = ctx.find_object(CliState)
    return current_operator(state.as_user if state is not None else None)


def require_actor(ctx: typer.Context, data_dir: Path, permission: str) -> str:
    """The operator acting (``--as``), once their role allows ``permission`` (a Permission name)."""
    from server.governance import Governance, GovernanceError, Permission

    try:
        who = acting_operator(ctx)
        Governance.load(data_dir).require(who, Permission[permission])
    except GovernanceError as exc:
        fail(exc)
    return who


def open_registry(data_dir: Path, broker: str | None = None) -> Any:
    from server.registry import Registry

    return Registry(data_dir, broker_url=broker)


def open_engine(data_dir: Path) -> Engine:
    """The registry database of ``data_dir`` (``EDGEHERD_DATABASE_URL`` if set), migrated to the current schema."""
    from server.db import database_url, make_engine, migrate

    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(database_url(data_dir))
    migrate(engine)
    return engine
