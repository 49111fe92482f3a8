"""``edgeherd group list|show|release`` and ``edgeherd device set``: device groups and their releases
(server/groups.py). ``device set`` works with a login too (``POST /devices/{id}/set``); the ``group`` commands
work on the server host, and with a login say so, since the operator API does not offer them yet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from server.cli._common import Broker, DataDir, console, fail, open_registry, require_actor
from server.cli.remote import call, remote

group_app = typer.Typer(help="Device groups and the model version each tracks.", no_args_is_help=True)

_LOCAL_ONLY = "run it on the server host (without a login): the operator API does not offer it"


def _local(ctx: typer.Context, what: str) -> None:
    if remote(ctx) is not None:
        fail(ValueError(f"`{what}` works on the server host only; {_LOCAL_ONLY}"))


@group_app.command("list")
def group_list(ctx: typer.Context, data_dir: DataDir = Path("data")) -> None:
    """Every group devices are in, with its members and the version it tracks (— : none)."""
    from collections import Counter

    from sqlmodel import Session

    from server.groups import releases

    _local(ctx, "group list")
    registry = open_registry(data_dir)
    members = Counter(g for d in registry.devices() if not d.revoked for g in d.groups)
    with Session(registry.engine) as db:
        tracked = {r.group: r for r in releases(db)}
    table = Table()
    for col in ("group", "devices", "release", "set by", "via", "set at"):
        table.add_column(col)
    for name in sorted(set(members) | set(tracked)):
        r = tracked.get(name)
        table.add_row(name, str(members.get(name, 0)), f"{r.model}:{r.version}" if r else "—",
                      r.set_by if r else "—", r.via if r else "—", f"{r.set_at:%Y-%m-%d %H:%M}" if r else "—")
    console.print(table)


@group_app.command("show")
def group_show(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The group.")],
               data_dir: DataDir = Path("data")) -> None:
    """A group's release and its members, each with what it desires and runs."""
    from sqlmodel import Session

    from server.groups import group_members, releases

    _local(ctx, "group show")
    registry = open_registry(data_dir)
    with Session(registry.engine) as db:
        found = releases(db, [name])
        devices = group_members(db, name)
    if not found and not devices:
        fail(ValueError(f"no device is in group {name!r} and it has no release; see `edgeherd group list`"))
    if found:
        r = found[0]
        console.print(f"[bold]{name}[/] tracks {r.model}:{r.version} (set by {r.set_by} via {r.via}, "
                      f"{r.set_at:%Y-%m-%d %H:%M})")
    else:
        console.print(f"[bold]{name}[/] tracks no version (`edgeherd group release {name} NAME:VERSION`)")
    table = Table()
    for col in ("device", "desired", "running", "install"):
        table.add_column(col)
    for d in devices:
        table.add_row(d.id, (d.desired_manifest or "—")[:12], d.running_artifact or "—", d.install_step or "—")
    console.print(table)


@group_app.command("release")
def group_release(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The group.")],
    ref: Annotated[str, typer.Argument(help="NAME:VERSION the group tracks from now on.")],
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Make the group track NAME:VERSION (audited) and give it to every member that runs something else, unless
    an active rollout targets it. A production group takes approved versions only."""
    from sqlmodel import Session

    from server.governance import Governance, GovernanceError, check_rollout, find_version, is_production_target
    from server.groups import check_names, set_group_release
    from server.registry import RegistryError

    _local(ctx, "group release")
    actor = require_actor(ctx, data_dir, "DEPLOY")
    try:
        check_names("group", [name])
        registry = open_registry(data_dir, broker)
        with Session(registry.engine) as db:  # as a rollout to the group would be
            row = find_version(db, ref)
            check_rollout(db, row, production=is_production_target(Governance.load(data_dir).config, [name]))
            model, version = row.name, row.version
        given = set_group_release(registry, name, model, version, actor)
    except (RegistryError, GovernanceError) as exc:
        fail(exc)
    console.print(f"group {name} tracks {ref}; {len(given)} device(s) given it"
                  + (f": {', '.join(given[:10])}" + (" …" if len(given) > 10 else "") if given else ""))


def device_set(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="The device.")],
    group: Annotated[list[str] | None, typer.Option("--group", help="Its groups, replacing the ones it has "
                                                    "(repeat for several; --no-groups: none).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Its tags, replacing the ones it has (repeat "
                                                  "for several; --no-tags: none).")] = None,
    no_groups: Annotated[bool, typer.Option("--no-groups", help="Take it out of every group.")] = False,
    no_tags: Annotated[bool, typer.Option("--no-tags", help="Remove every tag.")] = False,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Replace a device's groups and/or tags (audited); moved into a group with a release, it converges to it."""
    from server.registry import RegistryError

    if (group and no_groups) or (tag and no_tags):
        fail(ValueError("give --group or --no-groups (and --tag or --no-tags), not both"))
    groups = [] if no_groups else group
    tags = [] if no_tags else tag
    client = remote(ctx)
    if client is not None:
        if groups is None and tags is None:
            fail(ValueError("nothing to change: give --group and/or --tag"))
        body = {k: v for k, v in (("groups", groups), ("tags", tags)) if v is not None}
        answer = call(client, "POST", f"/devices/{device}/set", body)["device"]
        console.print(f"{device}: groups {','.join(answer['groups']) or '—'}, tags {','.join(answer['tags']) or '—'}")
        return
    actor = require_actor(ctx, data_dir, "ENROLL_DEVICE")
    try:
        registry = open_registry(data_dir, broker)
        d = registry.set_device(device, groups=groups, tags=tags, actor=actor)
    except RegistryError as exc:
        fail(exc)
    running = f"; desires {d.desired_manifest[:12]}" if d.desired_manifest else ""
    console.print(f"{device}: groups {','.join(d.groups) or '—'}, tags {','.join(d.tags) or '—'}{running}")
