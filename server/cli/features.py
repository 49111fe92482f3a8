"""``edgeherd features push|list|show|drift``: the feature registry."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from server.cli.fleet import DataDir, _actor, _fail, _registry, console

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

    actor = _actor(ctx, data_dir, "PUSH_MODEL")
    try:
        result = _registry(data_dir).push_features(path, actor=actor)
    except RegistryError as exc:
        _fail(exc)
    for ref, what in result:
        console.print(f"{what:>9}  {ref}")


@features_app.command("list")
def features_list(data_dir: DataDir = Path("data")) -> None:
    """Every registered feature version, and the model versions that consume it."""
    from sqlmodel import Session

    from server import features

    reg = _registry(data_dir)
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


def _transform(d: dict[str, object]) -> str:
    t = d.get("transform")
    if not isinstance(t, dict):
        return "?"
    args = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("op", "names"))
    return f"{t.get('op')}({args})"


@features_app.command("show")
def features_show(name: Annotated[str, typer.Argument(help="Feature name.")],
                  data_dir: DataDir = Path("data")) -> None:
    """Every version of one feature: its definition and its consumers."""
    from sqlmodel import Session

    from server import features

    reg = _registry(data_dir)
    with Session(reg.engine) as db:
        rows = features.definitions(db, name)
        consumers = features.consumers(db, name)
    if not rows:
        _fail(ValueError(f"no feature named {name!r} is registered; see `edgeherd features list`"))
    for r in rows:
        ref = f"{r.name}@{r.version}"
        models = [c.model for c in consumers if c.feature == ref]
        console.print(f"[bold]{ref}[/]  digest {r.sha256[:12]}…  owner {r.owner or '—'}  registered "
                      f"{r.created_at:%Y-%m-%d %H:%M} by {r.pushed_by or '—'}")
        console.print(f"  consumed by: {', '.join(models) or '—'}")
        console.print("  " + json.dumps(r.definition, sort_keys=True))


@features_app.command("drift")
def features_drift(name: Annotated[str, typer.Argument(help="Feature name.")],
                   version: Annotated[int | None, typer.Option("--version", help="Only this version of it.")] = None,
                   hours: Annotated[float, typer.Option("--hours", min=0.0, help="Statistics of the last this many "
                                                        "hours (0: all of them).")] = 24.0,
                   as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
                   data_dir: DataDir = Path("data")) -> None:
    """One feature's drift across the fleet: per model version consuming it, and over all of them."""
    from sqlmodel import Session

    from server import features

    since = datetime.now(timezone.utc) - timedelta(hours=hours) if hours > 0 else None
    reg = _registry(data_dir)
    with Session(reg.engine) as db:
        rows = features.drift(db, name, version, since)
    if as_json:
        console.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    if not rows:
        _fail(ValueError(f"no model version consumes feature {name!r}" + (f"@{version}" if version else "")))
    table = Table(title=f"drift of {name}")
    for col in ("feature", "model", "windows", "values", "PSI", "PSI limit", "p-value", "missing", "drifted"):
        table.add_column(col, justify="right" if col not in ("feature", "model", "drifted") else "left")
    for r in rows:
        d = r.drift
        table.add_row(r.feature, r.model, str(r.windows), str(d.n), f"{d.psi:.4f}", f"{d.psi_threshold:.4f}",
                      f"{d.p_value:.3g}", f"{d.nan_rate:.1%}", "[red]yes[/]" if d.drifted else "no")
    console.print(table)
