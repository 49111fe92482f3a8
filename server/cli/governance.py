"""``edgeherd model promote|approve|reject|retire`` and ``edgeherd audit list|verify``.

Who acts is ``edgeherd --as USER``, else ``$EDGEHERD_OPERATOR``, else the OS
user name; their role comes from ``<data dir>/operators.toml`` (docs/governance.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from server.cli._common import CliState, DataDir, acting_operator, console, err, fail, open_engine
from server.cli.remote import call, remote, short_time, sign_decision_remote, whoami

if TYPE_CHECKING:

    from server.governance import Permission, Transition

__all__ = ["CliState", "acting_operator", "audit_app", "model_approve", "model_promote", "model_reject",
           "model_retire"]

audit_app = typer.Typer(help="Read and verify the hash-chained audit log.", no_args_is_help=True)

Ref = Annotated[str, typer.Argument(help="NAME:VERSION")]
Reason = Annotated[str, typer.Option("--reason", help="Why (recorded with the decision and in the audit log).")]


def _lifecycle(ctx: typer.Context, ref: str, data_dir: Path, permission: Permission,
               move: Callable[..., Transition], *args: Any) -> None:
    """Check the role, make the move (it commits with its audit entry), advance the anchor, say what changed."""
    from sqlmodel import Session

    from server import audit
    from server.db.models import AuditEntry
    from server.governance import Governance, GovernanceError, find_version

    try:
        actor = acting_operator(ctx)
        Governance.load(data_dir).require(actor, permission)
        engine = open_engine(data_dir)
        try:
            with Session(engine) as db:
                moved = move(db, find_version(db, ref), actor, *args)
                entry = db.get(AuditEntry, moved.audit_seq) if moved.audit_seq is not None else None
                if entry is not None:
                    audit.write_anchor(data_dir, entry)
        finally:
            engine.dispose()
    except (GovernanceError, audit.AuditError) as exc:
        fail(exc)
    console.print(f"{moved.ref}: {moved.before.value} → [bold]{moved.after.value}[/] by {actor} "
                  f"(audit #{moved.audit_seq})")


def _moved(answer: dict[str, Any], actor: str) -> None:
    """What the API's answer to a lifecycle move says, as the local command says it."""
    console.print(f"{answer['model']}: {answer['from']} → [bold]{answer['to']}[/] by {actor} "
                  f"(audit #{answer['audit_seq']})")


def _remote_move(ctx: typer.Context, ref: str, move: str, reason: str | None = None) -> bool:
    """With a login: make the move through the API (approve and reject signed with the operator's key) and say
    so; False without one."""
    client = remote(ctx)
    if client is None:
        return False
    from server.governance import Permission, Role, allowed

    me = whoami(client)
    actor = str(me["operator"])
    if move in ("approve", "reject"):
        needed = Permission.APPROVE if move == "approve" else Permission.REJECT
        role = Role(me["role"])
        if not allowed(role, needed):  # said before asking for a signing key they need not have
            fail(f"{actor} is {role.with_article}; {needed.value} needs the {needed.min_role.value} role")
        _moved(sign_decision_remote(client, ref, move, reason or "", actor), actor)
    else:
        _moved(call(client, "POST", f"/models/{ref}/{move}"), actor)
    return True


def model_promote(ctx: typer.Context, ref: Ref, data_dir: DataDir = Path("data")) -> None:
    """Put a draft version up for approval (draft → candidate)."""
    from server.governance import Permission, promote

    if _remote_move(ctx, ref, "promote"):
        return
    _lifecycle(ctx, ref, data_dir, Permission.PROMOTE, promote)


def model_approve(ctx: typer.Context, ref: Ref, reason: Reason, data_dir: DataDir = Path("data")) -> None:
    """Approve a candidate for production (candidate → approved); the author cannot approve their own version.

    With a login, the decision is signed with your key (`edgeherd operator keygen`)."""
    from server.governance import Permission, approve

    if _remote_move(ctx, ref, "approve", reason):
        return
    _lifecycle(ctx, ref, data_dir, Permission.APPROVE, approve, reason)


def model_reject(ctx: typer.Context, ref: Ref, reason: Reason, data_dir: DataDir = Path("data")) -> None:
    """Send a candidate back to draft, saying why (with a login: signed, as approvals are)."""
    from server.governance import Permission, reject

    if _remote_move(ctx, ref, "reject", reason):
        return
    _lifecycle(ctx, ref, data_dir, Permission.REJECT, reject, reason)


def model_retire(ctx: typer.Context, ref: Ref, data_dir: DataDir = Path("data")) -> None:
    """Retire a version: no rollout may use it again (admin)."""
    from server.governance import Permission, retire

    if _remote_move(ctx, ref, "retire"):
        return
    _lifecycle(ctx, ref, data_dir, Permission.RETIRE, retire)


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    action: Annotated[str | None, typer.Option("--action", help="Only this action, e.g. model.approve.")] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="Only entries by this operator.")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="Only subjects containing this text.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help="At most this many, newest first.")
                     ] = 50,
    data_dir: DataDir = Path("data"),
) -> None:
    """Audit entries, newest first."""
    from sqlmodel import Session

    from server import audit

    client = remote(ctx)
    if client is not None:
        _audit_list_remote(client, action, actor, subject, limit)
        return
    engine = open_engine(data_dir)
    try:
        with Session(engine) as db:
            rows = audit.entries(db, action=action, actor=actor, subject_contains=subject, limit=limit)
    finally:
        engine.dispose()
    table = Table()
    for name in ("seq", "at (UTC)", "actor", "action", "subject", "detail"):
        table.add_column(name, overflow="fold")
    for e in rows:
        at = e.at if e.at.tzinfo is None else e.at.astimezone(timezone.utc)  # SQLite: naive, stored as UTC
        table.add_row(str(e.seq), f"{at:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.subject,
                      json.dumps(e.detail, sort_keys=True, ensure_ascii=False))
    console.print(table)
    if not rows:
        console.print("no audit entries match")


def _audit_list_remote(client: Any, action: str | None, actor: str | None, subject: str | None, limit: int) -> None:
    """``audit list`` through GET /audit: its text search narrows, the exact filters are applied here."""
    filtered = any(f is not None for f in (action, actor, subject))
    text = " ".join(f for f in (action, actor, subject) if f)[:200]
    answer = call(client, "GET", "/audit", query={"text": text or None, "limit": 10_000 if filtered else limit})
    rows = [e for e in answer["entries"]
            if (action is None or e["action"] == action) and (actor is None or e["actor"] == actor)
            and (subject is None or subject in e["subject"])][:limit]
    table = Table()
    for name in ("seq", "at (UTC)", "actor", "action", "subject", "detail"):
        table.add_column(name, overflow="fold")
    for e in rows:
        table.add_row(str(e["seq"]), short_time(e["at"], "%Y-%m-%d %H:%M:%S"), e["actor"], e["action"],
                      e["subject"], json.dumps(e["detail"], sort_keys=True, ensure_ascii=False))
    console.print(table)
    if not rows:
        console.print("no audit entries match")


def _audit_verify_remote(client: Any, anchor: Path | None) -> None:
    """``audit verify`` through GET /audit/verify: the server checks its chain against its own anchor, and every
    approval's signature."""
    if anchor is not None:
        fail("--anchor checks the server host's database against a copy of its anchor; with a login the server "
              "verifies against its own anchor (run `edgeherd audit verify --anchor FILE` on the server host)")
    answer = call(client, "GET", "/audit/verify")
    chain, decisions = answer["chain"], answer["approvals"]
    if not chain["ok"]:
        err.print(f"[red]audit log FAILED verification:[/] {len(chain['problems'])} problem(s) in "
                  f"{chain['entries']} entries")
        for problem in chain["problems"]:
            err.print(f"  [red]✗[/] {problem}", markup=False)
    if not decisions["ok"]:
        err.print(f"[red]approvals FAILED verification:[/] {len(decisions['problems'])} problem(s); "
                  f"{decisions['signed']} signed and verified, {decisions['unsigned']} unsigned")
        for problem in decisions["problems"]:
            err.print(f"  [red]✗[/] {problem}", markup=False)
    if not chain["ok"] or not decisions["ok"]:
        raise typer.Exit(1)
    pinned = chain.get("anchor")
    anchored = (f"anchored entry #{pinned['seq']} matches" if pinned
                else "no anchor, so removal of the newest entries would not show")
    console.print(f"[green]audit log OK[/] (checked by {client.url}): {chain['entries']} entries, chain intact; "
                  f"{anchored}")
    if decisions["signed"] or decisions["unsigned"]:
        console.print(f"[green]approvals OK[/]: {decisions['signed']} signed and verified, {decisions['unsigned']} "
                      f"unsigned (decided on the server host)")


@audit_app.command("verify")
def audit_verify(
    anchor: Annotated[Path | None, typer.Option("--anchor", help="An anchor file (default: the data directory's "
                                                "audit-anchor.json; pass a copy kept off this host).")] = None,
    data_dir: DataDir = Path("data"),
) -> None:
    """Recompute the hash chain and re-check every approval and rejection against its audit entry and its
    signature; exit 1 and name every broken entry or decision if either does not hold."""
    from sqlmodel import Session

    from server import audit
    from server.signatures import verify_approvals

    client = remote()
    if client is not None:
        _audit_verify_remote(client, anchor)
        return
    try:
        pinned = audit.read_anchor(anchor if anchor is not None else data_dir)
    except audit.AuditError as exc:
        fail(exc)
    if anchor is not None and pinned is None:
        fail(f"anchor file {anchor} does not exist")
    engine = open_engine(data_dir)
    try:
        with Session(engine) as db:
            report = audit.verify(db, anchor=pinned)
            decisions = verify_approvals(db)
    finally:
        engine.dispose()
    if not report.ok:
        err.print(f"[red]audit log FAILED verification:[/] {len(report.problems)} problem(s) in "
                  f"{report.entries} entries")
        for problem in report.problems:
            err.print(f"  [red]✗[/] {problem}")
    if not decisions.ok:
        err.print(f"[red]approvals FAILED verification:[/] {len(decisions.problems)} problem(s); "
                  f"{decisions.signed} signed and verified, {decisions.unsigned} unsigned")
        for problem in decisions.problems:
            err.print(f"  [red]✗[/] {problem}")
    if not report.ok or not decisions.ok:
        raise typer.Exit(1)
    anchored = (f"anchored entry #{pinned.seq} matches" if pinned is not None
                else "no anchor, so removal of the newest entries would not show")
    console.print(f"[green]audit log OK[/]: {report.entries} entries, chain intact; {anchored}")
    if decisions.signed or decisions.unsigned:
        console.print(f"[green]approvals OK[/]: {decisions.signed} signed and verified, {decisions.unsigned} "
                      f"unsigned (decided on the server host)")
