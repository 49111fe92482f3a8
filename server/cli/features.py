"""``edgeherd features push|list|show|drift``: the feature registry."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from server.cli._common import DataDir, console, fail, open_registry, require_actor
from server.cli.remote import call, remote, short_time

features_app = typer.Typer(help="Register feature definitions and follow them across models and the fleet.",
                           no_args_is_help=True)


@features_app.command("push")
def features_push(ctx: typer.Context,
                  path: Annotated[Path, typer.Argument(help="A TOML file of [[feature]] tables, or a directory "
                                                       "of them.")],
                  data_dir: DataDir = Path("data")) -> None:
    """Register feature definitions. A registered version is never edited: a changed definition needs a new
    version, and pushing it under an old one is refused."""
    from server.registry import RegistryError

    client = remote(ctx)
    if client is not None:
        for ref, what in _pairs(call(client, "POST", "/features", _definitions_body(path))):
            console.print(f"{what:>9}  {ref}")
        return
    actor = require_actor(ctx, data_dir, "PUSH_MODEL")
    try:
        result = open_registry(data_dir).push_features(path, actor=actor)
    except RegistryError as exc:
        fail(exc)
    for ref, what in result:
        console.print(f"{what:>9}  {ref}")


def _definitions_body(path: Path) -> dict[str, list[dict[str, object]]]:
    """The ``[[feature]]`` tables of a file (or of every ``*.toml`` of a directory), checked here first so a
    mistake is named with its file, as JSON for POST /features."""
    from protocol.tomlfile import read_toml
    from toolchain.errors import DataError
    from toolchain.features import load_definitions

    try:
        load_definitions(path)
        files = sorted(path.glob("*.toml")) if path.is_dir() else [path]
        tables: list[dict[str, object]] = []
        for file in files:
            tables += read_toml(file, "feature definitions file", DataError).get("feature", [])
    except DataError as exc:
        fail(exc)
    return {"feature": tables}


def _pairs(answer: object) -> list[tuple[str, str]]:
    """(ref, "added" | "unchanged") from POST /features's answer: a list of pairs or of objects."""
    items = answer.get("features", answer.get("result", [])) if isinstance(answer, dict) else answer
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            ref, what = item.get("ref", item.get("feature", "?")), item.get("result", item.get("status", ""))
            out.append((str(ref), str(what)))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append((str(item[0]), str(item[1])))
    return out


@features_app.command("list")
def features_list(ctx: typer.Context, data_dir: DataDir = Path("data")) -> None:
    """Every registered feature version, and the model versions that consume it."""
    from sqlmodel import Session

    from server import features

    client = remote(ctx)
    if client is not None:
        _table(call(client, "GET", "/features"))
        return
    reg = open_registry(data_dir)
    with Session(reg.engine) as db:
        rows = features.definitions(db)
        used: dict[str, list[str]] = {}
        for c in features.consumers(db):
            used.setdefault(c.feature, []).append(c.model)
    table = Table()
    for col in ("feature", "version", "unit", "transform", "owner", "digest", "consumed by", "registered"):
        table.add_column(col)
    for r in rows:
        ref = f"{r.name}@{r.version}"
        table.add_row(r.name, str(r.version), str(r.definition.get("unit", "")), _transform(r.definition),
                      r.owner, r.sha256[:12], ", ".join(used.get(ref, [])) or "—", f"{r.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


def _table(rows: list[dict[str, object]]) -> None:
    table = Table()
    for col in ("feature", "version", "unit", "transform", "owner", "digest", "consumed by", "registered"):
        table.add_column(col)
    for r in rows:
        d = r.get("definition") if isinstance(r.get("definition"), dict) else {}
        assert isinstance(d, dict)  # noqa: S101 - for mypy
        used = r.get("consumed_by") or r.get("consumers") or []
        table.add_row(str(r["name"]), str(r["version"]), str(d.get("unit", "")), _transform(d), str(r.get("owner", "")),
                      str(r.get("sha256", ""))[:12], ", ".join(str(u) for u in used) if isinstance(used, list) else "—",
                      short_time(r.get("registered_at")))
    console.print(table)


def _transform(d: dict[str, object]) -> str:
    t = d.get("transform")
    if not isinstance(t, dict):
        return "?"
    args = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("op", "names"))
    return f"{t.get('op')}({args})"


@features_app.command("show")
def features_show(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Feature name.")],
                  data_dir: DataDir = Path("data")) -> None:
    """Every version of one feature: its definition and its consumers."""
    from sqlmodel import Session

    from server import features

    client = remote(ctx)
    if client is not None:
        answer = call(client, "GET", f"/features/{name}")
        for r in answer.get("versions", []) if isinstance(answer, dict) else answer:
            used = r.get("consumed_by") or r.get("consumers") or []
            console.print(f"[bold]{r['name']}@{r['version']}[/]  digest {str(r.get('sha256', ''))[:12]}…  owner "
                          f"{r.get('owner') or '—'}  registered {short_time(r.get('registered_at'))} by "
                          f"{r.get('pushed_by') or '—'}")
            console.print(f"  consumed by: {', '.join(str(u) for u in used) or '—'}")
            console.print("  " + json.dumps(r.get("definition"), sort_keys=True), markup=False)
        return
    reg = open_registry(data_dir)
    with Session(reg.engine) as db:
        rows = features.definitions(db, name)
        consumers = features.consumers(db, name)
    if not rows:
        fail(ValueError(f"no feature named {name!r} is registered; see `edgeherd features list`"))
    for r in rows:
        ref = f"{r.name}@{r.version}"
        models = [c.model for c in consumers if c.feature == ref]
        console.print(f"[bold]{ref}[/]  digest {r.sha256[:12]}…  owner {r.owner or '—'}  registered "
                      f"{r.created_at:%Y-%m-%d %H:%M} by {r.pushed_by or '—'}")
        console.print(f"  consumed by: {', '.join(models) or '—'}")
        console.print("  " + json.dumps(r.definition, sort_keys=True))


@features_app.command("drift")
def features_drift(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Feature name.")],
                   version: Annotated[int | None, typer.Option("--version", help="Only this version of it.")] = None,
                   hours: Annotated[float, typer.Option("--hours", min=0.0, help="Statistics of the last this many "
                                                        "hours (0: all of them).")] = 24.0,
                   as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
                   data_dir: DataDir = Path("data")) -> None:
    """One feature's drift across the fleet: per model version consuming it, and over all of them."""
    from sqlmodel import Session

    from server import features

    client = remote(ctx)
    if client is not None:
        dicts: list[dict[str, Any]] = call(client, "GET", f"/features/{name}/drift",
                                           query={"version": version, "hours": hours})
    else:
        since = datetime.now(timezone.utc) - timedelta(hours=hours) if hours > 0 else None
        reg = open_registry(data_dir)
        with Session(reg.engine) as db:
            dicts = [r.to_dict() for r in features.drift(db, name, version, since)]
    if as_json:
        console.print_json(json.dumps(dicts))
        return
    if not dicts:
        fail(ValueError(f"no model version consumes feature {name!r}" + (f"@{version}" if version else "")))
    table = Table(title=f"drift of {name}")
    for col in ("feature", "model", "windows", "values", "PSI", "PSI limit", "p-value", "missing", "drifted"):
        table.add_column(col, justify="right" if col not in ("feature", "model", "drifted") else "left")
    for d in dicts:
        table.add_row(d["feature"], d["model"], str(d["windows"]), str(d["n"]), f"{d['psi']:.4f}",
                      f"{d['psi_threshold']:.4f}", f"{d['p_value']:.3g}", f"{d['nan_rate']:.1%}",
                      "[red]yes[/]" if d["drifted"] else "no")
    console.print(table)
