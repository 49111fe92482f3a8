"""``edgeherd agent``: the device agent itself as a signed release, rolled out in waves (docs/agent.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.cli._common import Broker, DataDir, console, fail, open_registry, require_actor

agent_app = typer.Typer(help="Update the device agent itself: push a release, roll it out in waves.",
                        no_args_is_help=True)


@agent_app.command("push")
def agent_push(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="A tar of wheelhouse/ + requirements.txt, or a directory holding "
                                                "them (an unpacked `edgeherd flash` bundle).")],
    python: Annotated[str, typer.Option("--python", help="The devices' Python, major.minor (e.g. 3.11).")],
    data_dir: DataDir = Path("data"),
    key: Annotated[Path | None, typer.Option("--key", help="Signing key (default: DATA_DIR/keys/signing.key).")
                   ] = None,
    notes: Annotated[str, typer.Option("--notes", help="What changed, shown by `agent list`.")] = "",
) -> None:
    """Sign an agent release with the server's key and put its tar in the content store."""
    from protocol import KeyFormatError, load_private_key
    from server.agent_releases import AgentReleaseError, push

    actor = require_actor(ctx, data_dir, "PUSH_MODEL")
    key_path = key or data_dir / "keys" / "signing.key"
    try:
        signing = load_private_key(key_path.read_bytes())
    except OSError as exc:
        fail(f"cannot read {key_path}: {exc.strerror}")
    except KeyFormatError as exc:
        fail(f"{key_path}: {exc}")
    try:
        row = push(open_registry(data_dir), source, signing, python, actor, notes)
    except AgentReleaseError as exc:
        fail(exc)
    console.print(f"pushed agent {row.version} (Python {row.python}, {row.size} bytes, sha256 {row.sha256[:12]}…)")


@agent_app.command("list")
def agent_list(data_dir: DataDir = Path("data")) -> None:
    """The agent releases pushed, and how many devices run each."""
    from rich.table import Table
    from sqlmodel import Session, col, select

    from server.db.models import AgentReleaseRow, Device

    reg = open_registry(data_dir)
    table = Table("version", "python", "size", "sha256", "pushed by", "devices running it")
    with Session(reg.engine) as db:
        running: dict[str, int] = {}
        for d in db.exec(select(Device).where(Device.revoked == False)).all():  # noqa: E712 - SQL comparison
            running[d.agent_version or "?"] = running.get(d.agent_version or "?", 0) + 1
        for r in db.exec(select(AgentReleaseRow).order_by(col(AgentReleaseRow.id))).all():
            table.add_row(r.version, r.python, str(r.size), r.sha256[:12], r.created_by, str(running.get(r.version, 0)))
    console.print(table)


@agent_app.command("rollout")
def agent_rollout(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="The agent release to roll out (see `edgeherd agent list`).")],
    group: Annotated[list[str] | None, typer.Option("--group", help="Target group (repeatable).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Target tag (repeatable).")] = None,
    device: Annotated[list[str] | None, typer.Option("--device", help="Target device (repeatable).")] = None,
    waves: Annotated[str, typer.Option("--waves", help="Cumulative wave sizes: counts or shares.")] = "1,10%,100%",
    deadline: Annotated[float, typer.Option("--deadline", help="Seconds a device of a wave has to report the new "
                                                               "version before the rollout fails.")] = 900.0,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Start rolling an agent release out; `edgeherd server run` moves it on from wave to wave."""
    from server.agent_releases import AgentReleaseError, start_rollout

    actor = require_actor(ctx, data_dir, "START_ROLLOUT")
    target = {"groups": group or [], "tags": tag or [], "devices": device or []}
    if not any(target.values()):
        fail("give a target: --group, --tag or --device")
    try:
        r = start_rollout(open_registry(data_dir, broker), version, target,
                          [w.strip() for w in waves.split(",") if w.strip()], deadline, actor)
    except AgentReleaseError as exc:
        fail(exc)
    console.print(f"agent rollout {r.name}: wave {r.wave + 1} of {','.join(r.waves)} assigned")


@agent_app.command("status")
def agent_status(data_dir: DataDir = Path("data")) -> None:
    """Agent rollouts, newest first, with each device's wave and state."""
    from server.agent_releases import status

    rows = status(open_registry(data_dir))
    if not rows:
        console.print("no agent rollouts")
    for r in rows:
        console.print(f"[bold]{r.name}[/]  agent {r.version}  {r.state}  wave {r.wave + 1}/{','.join(r.waves)}"
                      + (f"  reason: {r.reason}" if r.reason else ""))
        for device_id, wave, state, reason in r.devices:
            console.print(f"  {device_id:<24} wave {wave + 1}  {state}" + (f"  {reason}" if reason else ""))
