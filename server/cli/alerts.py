"""``edgeherd alerts list|show|ack|resolve``: the alerts drift evaluation raised, and who is on them.

With a login the commands go through the operator API; without one they open the server host's database, as the
operator ``edgeherd --as USER`` names. Acknowledging and resolving need the operator role and are audited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from server.cli._common import DataDir, acting_operator, console, err, fail, open_engine
from server.cli.remote import call, remote, short_time

__all__ = ["alerts_app"]

alerts_app = typer.Typer(help="Alerts: list them, show one, acknowledge or resolve it.", no_args_is_help=True)

AlertId = Annotated[int, typer.Argument(help="The alert's id (`edgeherd alerts list`).", min=1, max=2**62)]
NoteOption = Annotated[str | None, typer.Option("--note", help="What you are doing about it (recorded, and in "
                                                              "the audit log).")]
STATE_STYLE = {"raised": "bold red", "acknowledged": "yellow", "cleared": "green"}


def _local(data_dir: Path, fn: Any) -> Any:
    """Run ``fn(db)`` on the host's database (migrated)."""
    from sqlmodel import Session

    engine = open_engine(data_dir)
    try:
        with Session(engine) as db:
            return fn(db)
    finally:
        engine.dispose()


def _print_list(rows: list[dict[str, Any]]) -> None:
    table = Table("id", "state", "kind", "device", "reason", "raised", "by / cleared")
    for a in rows:
        who = (f"cleared {short_time(a['cleared_at'])} ({a['cleared_by']})" if a["state"] == "cleared" else
               f"ack {a['acknowledged_by']}" if a["state"] == "acknowledged" else "—")
        table.add_row(str(a["id"]), f"[{STATE_STYLE.get(a['state'], '')}]{a['state']}[/]", a["kind"],
                      a["device_id"] or "—", str(a["reason"] or "")[:60], short_time(a["raised_at"]), who)
    console.print(table if rows else "no alerts")


@alerts_app.command("list")
def list_command(ctx: typer.Context,
                 all_: Annotated[bool, typer.Option("--all", help="Every alert, cleared ones of any age too "
                                                                 "(default: active ones and those cleared in the last "
                                                                 "24 hours).")] = False,
                 data_dir: DataDir = Path("data")) -> None:
    """Alerts, newest first."""
    client = remote(ctx)
    if client is not None:
        _print_list(call(client, "GET", "/alerts", query={"all": "true" if all_ else "false"}))
        return
    from server import alerts

    _print_list(_local(data_dir, lambda db: [alerts.alert_json(a) for a in alerts.list_alerts(db, include_all=all_)]))


@alerts_app.command("show")
def show_command(ctx: typer.Context, alert_id: AlertId, data_dir: DataDir = Path("data")) -> None:
    """One alert: what, why, who acknowledged it, and its webhook deliveries."""
    client = remote(ctx)
    if client is not None:
        detail = call(client, "GET", f"/alerts/{alert_id}")
    else:
        from server import alerts
        from server.db.models import Alert

        def read(db: Any) -> dict[str, Any] | None:
            alert = db.get(Alert, alert_id)
            if alert is None:
                return None
            return alerts.alert_json(alert) | {"deliveries": [alerts.delivery_json(d)
                                                              for d in alerts.deliveries(db, alert_id)]}

        detail = _local(data_dir, read)
        if detail is None:
            fail(f"no alert {alert_id}; `edgeherd alerts list --all` lists them")
    state = detail["state"]
    console.print(f"[bold]alert {detail['id']}[/]: [{STATE_STYLE.get(state, '')}]{state}[/] · {detail['kind']} on "
                  f"{detail['device_id'] or '—'} · severity {detail['severity']}")
    console.print(f"reason: {detail['reason'] or '—'}")
    console.print(f"raised {short_time(detail['raised_at'], '%Y-%m-%d %H:%M:%S')}"
                  + (f" · acknowledged {short_time(detail['acknowledged_at'], '%Y-%m-%d %H:%M:%S')} by "
                     f"{detail['acknowledged_by']}" + (f" ({detail['ack_note']})" if detail["ack_note"] else "")
                     if detail["acknowledged_at"] else "")
                  + (f" · cleared {short_time(detail['cleared_at'], '%Y-%m-%d %H:%M:%S')} by {detail['cleared_by']}"
                     if detail["cleared_at"] else ""))
    if detail.get("manifest_sha256"):
        console.print(f"model digest {detail['manifest_sha256'][:16]}…")
    if detail["deliveries"]:
        table = Table("attempt", "event", "status", "http", "error", "next try")
        for d in detail["deliveries"]:
            table.add_row(str(d["attempt"]), d["event"], d["status"], str(d["http_status"] or "—"),
                          (d["error"] or "")[:60], short_time(d["next_try_at"], "%H:%M:%S"))
        console.print(table)


def _act(ctx: typer.Context, alert_id: int, action: str, note: str | None, data_dir: Path) -> None:
    client = remote(ctx)
    if client is not None:
        answer = call(client, "POST", f"/alerts/{alert_id}/{action}", {"note": note})
    else:
        from server import alerts
        from server.audit import write_anchor
        from server.governance import Governance, GovernanceError, Permission

        try:
            actor = acting_operator(ctx)
            Governance.load(data_dir).require(actor, Permission.ACK_ALERT)
        except GovernanceError as exc:
            fail(exc)
        engine = open_engine(data_dir)
        try:
            fn = alerts.acknowledge if action == "ack" else alerts.resolve
            alert, entry = fn(engine, alert_id, actor, note)
        except alerts.AlertError as exc:
            fail(exc)
        finally:
            engine.dispose()
        try:
            write_anchor(data_dir, entry)
        except OSError as exc:
            err.print(f"[yellow]warning:[/] could not write the audit anchor: {exc}")
        answer = alerts.alert_json(alert)
    done = "acknowledged" if action == "ack" else "resolved"
    console.print(f"alert [bold]{answer['id']}[/] ({answer['kind']} on {answer['device_id'] or '—'}) {done}; "
                  f"now {answer['state']}")


@alerts_app.command("ack")
def ack_command(ctx: typer.Context, alert_id: AlertId, note: NoteOption = None,
                data_dir: DataDir = Path("data")) -> None:
    """Acknowledge a raised alert: someone is on it (audited)."""
    _act(ctx, alert_id, "ack", note, data_dir)


@alerts_app.command("resolve")
def resolve_command(ctx: typer.Context, alert_id: AlertId, note: NoteOption = None,
                    data_dir: DataDir = Path("data")) -> None:
    """Clear an alert by hand (audited); a shift that lasts raises a new one."""
    _act(ctx, alert_id, "resolve", note, data_dir)
