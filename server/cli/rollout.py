"""``edgeherd rollout start|list|show|pause|resume|abort|rollback``: canary rollouts gated on model health.

The running server (``edgeherd server run``) steps every active rollout; these
commands record a new one or act on one now, as the operator given by
``edgeherd --as USER`` (roles: docs/governance.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from server.cli._common import Broker, DataDir, acting_operator, console, fail
from server.cli.remote import call, remote
from server.rollouts import RolloutCommand

rollout_app = typer.Typer(help="Roll a model version out to a target in waves, gated on its health.",
                          no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="The rollout's name.")]
Reason = Annotated[str | None, typer.Option("--reason", help="Why (recorded in the audit log).")]


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@rollout_app.command("start")
def start(
    ctx: typer.Context,
    name: Name,
    model: Annotated[str, typer.Option("--model", help="NAME:VERSION to roll out.")],
    group: Annotated[list[str], typer.Option("--group", help="Target group (repeat or comma-separate).")] = [],  # noqa: B006
    tag: Annotated[list[str], typer.Option("--tag", help="Target tag (repeat or comma-separate).")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option("--device", help="Target device (repeat or comma-separate).")] = [],  # noqa: B006
    strategy: Annotated[str, typer.Option("--strategy", help="canary or all-at-once.")] = "canary",
    waves: Annotated[str, typer.Option("--waves", help="Cumulative wave sizes: counts or percentages.")
                     ] = "1,10%,50%,100%",
    soak: Annotated[float, typer.Option("--soak", help="Seconds each wave soaks before its gates.")] = 300.0,
    install_timeout: Annotated[float, typer.Option("--install-timeout", help="Seconds a device may take to "
                                                   "install before it counts as failed.")] = 900.0,
    failure_threshold: Annotated[float, typer.Option("--failure-threshold", help="Percent of a wave's devices "
                                                     "that may fail to install.")] = 0.0,
    on_failure: Annotated[str, typer.Option("--on-failure", help="rollback or pause.")] = "rollback",
    error_margin: Annotated[float, typer.Option("--error-margin", help="Error rate the new version may add to "
                                                "the baseline's (0.01 = 1 point).")] = 0.01,
    latency_margin: Annotated[float, typer.Option("--latency-margin", help="Fraction its p95 latency may "
                                                  "exceed the baseline's by.")] = 0.2,
    latency_budget: Annotated[float | None, typer.Option("--latency-budget-ms", help="p95 latency budget.")
                              ] = None,
    drift_margin: Annotated[float, typer.Option("--drift-margin", help="Share of drifting windows it may add "
                                                "to the baseline's.")] = 0.0,
    min_requests: Annotated[int, typer.Option("--min-requests", help="Requests needed over a soak to judge "
                                              "error rate and latency.")] = 50,
    min_drift_windows: Annotated[int, typer.Option("--min-drift-windows", help="Drift-scored windows needed to "
                                                   "judge drift; 0 turns the drift gate off.")] = 1,
    artifact: Annotated[str | None, typer.Option("--artifact", help="Artifact of the bundle to run (default: "
                                                 "the preferred one).")] = None,
    production: Annotated[bool, typer.Option("--production", help="Treat the target as production even if "
                                             "none of its groups is listed as such.")] = False,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Record a rollout; the running server starts it on its next step."""
    from pydantic import ValidationError

    from server.governance import Governance, GovernanceError
    from server.orchestrator import RolloutError, start_governed
    from server.registry import Registry, RegistryError
    from server.rollouts import Gates, RolloutSpec

    try:
        spec = RolloutSpec(strategy=strategy, waves=tuple(_split([waves])), soak_s=soak,
                           install_timeout_s=install_timeout, failure_threshold_pct=failure_threshold,
                           on_failure=on_failure,
                           gates=Gates(error_margin=error_margin, latency_margin=latency_margin,
                                       latency_budget_ms=latency_budget, drift_margin=drift_margin,
                                       min_requests=min_requests, min_drift_windows=min_drift_windows))
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))
    target = {"groups": _split(group), "tags": _split(tag), "devices": _split(device)}
    client = remote(ctx)
    if client is not None:
        answer = call(client, "POST", "/rollouts", {
            "name": name, "model": model, "target": target, "spec": spec.model_dump(mode="json"),
            "production": production, "artifact": artifact})
        console.print(f"rollout [bold]{answer['name']}[/] of {model} recorded ("
                      f"{'production, ' if answer.get('production') else ''}waves "
                      f"{', '.join(spec.effective_waves())}, soak {spec.soak_s:g} s); the server starts it")
        return
    try:
        row = start_governed(Registry(data_dir, broker_url=broker), Governance.load(data_dir), acting_operator(ctx),
                             name=name, model=model, target=target, spec=spec, production=production,
                             artifact=artifact)
    except (GovernanceError, RolloutError, RegistryError) as exc:
        fail(exc)
    console.print(f"rollout [bold]{row.name}[/] of {model} recorded ({'production, ' if row.production else ''}"
                  f"waves {', '.join(spec.effective_waves())}, soak {spec.soak_s:g} s); the server starts it")


@rollout_app.command("list")
def list_rollouts(ctx: typer.Context, data_dir: DataDir = Path("data"), broker: Broker = None) -> None:
    """Every rollout, newest first."""
    from sqlmodel import Session, col, select

    from server.db.models import ModelVersion, Rollout
    from server.registry import Registry

    client = remote(ctx)
    if client is not None:
        rows = Table("rollout", "version", "state", "wave", "installed", "target", "production")
        for r in call(client, "GET", "/rollouts"):
            rows.add_row(r["name"], r["version"], r["state"], r["wave"], f"{r['done']}/{r['total']}", r["target"],
                         "yes" if r["production"] else "no")
        console.print(rows)
        return
    registry = Registry(data_dir, broker_url=broker)
    table = Table("rollout", "version", "state", "wave", "target", "by", "created")
    with Session(registry.engine) as db:
        for r in db.exec(select(Rollout).order_by(col(Rollout.id).desc())):
            v = db.get(ModelVersion, r.version_id)
            table.add_row(r.name, f"{v.name}:{v.version}" if v else "?", r.state, str(r.wave),
                          _target(r.target), r.created_by, f"{r.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


def _target(target: dict[str, Any]) -> str:
    return " ".join(f"{k}={','.join(v)}" for k, v in sorted(target.items()) if v)


@rollout_app.command("show")
def show(ctx: typer.Context, name: Name, data_dir: DataDir = Path("data"), broker: Broker = None) -> None:
    """A rollout's waves, devices and the latest numbers of each gate."""
    from sqlmodel import Session, col, select

    from server.db.models import GateEvaluation, Rollout
    from server.orchestrator import RolloutError, describe, rollout_view
    from server.registry import Registry
    from server.rollouts import wave_sizes

    client = remote(ctx)
    if client is not None:
        _show_remote(call(client, "GET", f"/rollouts/{name}"))
        return
    registry = Registry(data_dir, broker_url=broker)
    with Session(registry.engine) as db:
        row = db.exec(select(Rollout).where(Rollout.name == name)).first()
        if row is None:
            fail(f"no rollout named {name}; see `edgeherd rollout list`")
        try:
            summary = describe(rollout_view(db, row))
        except RolloutError as exc:
            fail(exc)
        gates = db.exec(select(GateEvaluation).where(GateEvaluation.rollout_id == row.id)
                        .order_by(col(GateEvaluation.id))).all()
        from server.orchestrator import resolve_target

        sizes = wave_sizes(tuple(summary["spec"]["waves"]) if summary["spec"]["strategy"] == "canary" else ("100%",),
                           len(resolve_target(db, row.target)))
    console.print(f"[bold]{name}[/]: {summary['state']}, wave {summary['wave'] + 1} of {len(sizes)} "
                  f"(cumulative sizes {sizes}); target {_target(row.target)}"
                  + (f"\n[yellow]{summary['reason']}[/]" if summary["reason"] else ""))
    waves = Table("wave", "devices by state")
    for wave, counts in summary["waves"].items():
        waves.add_row(str(wave + 1), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    console.print(waves)
    latest: dict[tuple[int, str], GateEvaluation] = {(g.wave, g.gate): g for g in gates}
    table = Table("wave", "gate", "verdict", "numbers", "at")
    for (wave, gate), g in sorted(latest.items()):
        colour = {"pass": "green", "fail": "red"}.get(g.verdict, "yellow")
        numbers = _numbers(g.numbers)
        table.add_row(str(wave + 1), gate, f"[{colour}]{g.verdict}[/]", numbers, f"{g.at:%H:%M:%S}")
    console.print(table)


def _numbers(numbers: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())


def _show_remote(detail: dict[str, Any]) -> None:
    """``rollout show`` from GET /rollouts/{name}."""
    row = detail["row"]
    console.print(f"[bold]{row['name']}[/] of {row['version']}: {row['state']}, wave {row['wave']}, "
                  f"{row['done']} of {row['total']} device(s) installed; target {row['target']}; started by "
                  f"{detail['created_by']}" + (f"\n[yellow]{row['reason']}[/]" if row["reason"] else ""))
    waves = Table("wave", "installed", "size")
    for wave, done, size in detail["waves"]:
        waves.add_row(str(wave + 1), str(done), str(size))
    console.print(waves)
    table = Table("wave", "gate", "verdict", "numbers")
    for wave, gate, verdict, numbers in detail["gates"]:
        colour = {"pass": "green", "fail": "red"}.get(verdict, "yellow")
        table.add_row(str(wave + 1), gate, f"[{colour}]{verdict}[/]", _numbers(numbers))
    console.print(table)


def _command(ctx: typer.Context, name: str, command: RolloutCommand, reason: str | None, data_dir: Path,
             broker: str | None) -> None:
    client = remote(ctx)
    if client is not None:
        answer = call(client, "POST", f"/rollouts/{name}/{command.value}", {"reason": reason})
        console.print(f"rollout [bold]{name}[/] is now {answer['state']}")
        return
    from server.governance import Governance, GovernanceError
    from server.orchestrator import RolloutError, command_governed
    from server.registry import Registry, RegistryError

    try:
        view = command_governed(Registry(data_dir, broker_url=broker), Governance.load(data_dir),
                                acting_operator(ctx), name, command, reason)
    except (GovernanceError, RolloutError, RegistryError) as exc:
        fail(exc)
    console.print(f"rollout [bold]{name}[/] is now {view.state.value}")


@rollout_app.command(RolloutCommand.PAUSE.value)
def pause(ctx: typer.Context, name: Name, reason: Reason = None, data_dir: DataDir = Path("data"),
          broker: Broker = None) -> None:
    """Stop assigning devices and judging gates until resumed."""
    _command(ctx, name, RolloutCommand.PAUSE, reason, data_dir, broker)


@rollout_app.command(RolloutCommand.RESUME.value)
def resume(ctx: typer.Context, name: Name, reason: Reason = None, data_dir: DataDir = Path("data"),
           broker: Broker = None) -> None:
    """Carry on; the current wave soaks again from now."""
    _command(ctx, name, RolloutCommand.RESUME, reason, data_dir, broker)


@rollout_app.command(RolloutCommand.ABORT.value)
def abort(ctx: typer.Context, name: Name, reason: Reason = None, data_dir: DataDir = Path("data"),
          broker: Broker = None) -> None:
    """End the rollout; devices keep what they run now."""
    _command(ctx, name, RolloutCommand.ABORT, reason, data_dir, broker)


@rollout_app.command(RolloutCommand.ROLLBACK.value)
def rollback(ctx: typer.Context, name: Name, reason: Reason = None, data_dir: DataDir = Path("data"),
             broker: Broker = None) -> None:
    """Put every device the rollout changed back on the version it ran before (tracked to completion)."""
    _command(ctx, name, RolloutCommand.ROLLBACK, reason, data_dir, broker)
