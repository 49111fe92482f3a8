"""The operator API's routes, one router per area; each route states the permission it needs (server/api/app.py).

Reads return what the TUI shows (server/tui/data.py), as JSON; actions go through the same governed functions the
CLI uses, as the token's operator.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from pydantic import Field
from sqlmodel import Session, col, select

from server import audit
from server.api.auth import Operator, permit
from server.api.routes_alerts import alerts
from server.api.routes_audit import audit_checks
from server.api.routes_base import DEVICE, NAME, REF, Body, Ref, invalid
from server.api.routes_base import as_object as _object
from server.api.routes_base import plain as _plain
from server.api.routes_base import refused as _refused
from server.api.routes_fleet import devices as enrolment
from server.api.routes_fleet import feature_registry
from server.api.routes_upload import upload
from server.api.tokens import TokenError, issue, revoke, tokens_of
from server.db.models import ModelVersion, OperatorKey, OperatorToken, Rollout
from server.governance import NAME_PATTERN as OPERATOR_NAME
from server.governance import GovernanceError, Permission, Role, find_version, promote, retire
from server.orchestrator import RolloutError, command_governed, start_governed
from server.registry import RegistryError
from server.rollouts import COMMANDS, RolloutCommand, RolloutSpec
from server.signatures import SignatureCheckError, verify_decision
from server.tui.data import FLEET_SORTS, ActionError, FleetQuery

__all__ = ["ROUTERS"]


def _version(op: Operator, ref: str) -> ModelVersion:
    with Session(op.registry.engine) as db:
        try:
            return find_version(db, ref)
        except GovernanceError as exc:
            raise HTTPException(404, str(exc)) from None


# -- who am I ------------------------------------------------------------------------------------

meta = APIRouter(tags=["session"])


@meta.get("/health", summary="Liveness; no token needed")
def health() -> dict[str, str]:
    return {"status": "ok"}


@meta.get("/whoami", summary="The token's operator, role and scope")
def whoami(op: Annotated[Operator, Depends(permit(Permission.READ))]) -> dict[str, Any]:
    with Session(op.registry.engine) as db:
        key = db.get(OperatorKey, op.name)
    return {"operator": op.name, "role": op.governance.role(op.name).value, "scope": op.caller.scope,
            "token": op.caller.token_id, "public_key": key.public_key if key is not None else None}


# -- devices -----------------------------------------------------------------------------------

devices = APIRouter(prefix="/devices", tags=["devices"])


#: Largest page of ``GET /devices?limit=``.
MAX_FLEET_PAGE = 1000


@devices.get("", summary="Every device, with its health; with limit, one page of the Fleet table and its counts")
def list_devices(op: Annotated[Operator, Depends(permit(Permission.READ))],
                 limit: Annotated[int | None, Query(ge=0, le=MAX_FLEET_PAGE, description=(
                     "Page size: answer {rows, offset, matched, total, online, unhealthy, focus} instead of the "
                     "list of every device"))] = None,
                 offset: Annotated[int, Query(ge=0, description="The page's first position")] = 0,
                 filter: Annotated[str, Query(max_length=200, description=(
                     "Words, or group:G tag:T status:S health:H profile:P version:NAME:VER (docs/tui.md)"))] = "",
                 sort: Annotated[str, Query(pattern=f"^({'|'.join(FLEET_SORTS)})$",
                                            description="The column sorted on")] = "id",
                 reverse: Annotated[bool, Query(description="Highest first, missing values first")] = False,
                 focus: Annotated[str | None, Query(pattern=DEVICE, description=(
                     "A device to keep in view: the page moves to hold it, and focus says where it is"))] = None,
                 ) -> list[dict[str, Any]] | dict[str, Any]:
    if limit is None:
        return [_plain(r) | {"health": r.health} for r in op.fleet().devices()]
    page = op.fleet().fleet(FleetQuery(text=filter, sort=sort, reverse=reverse, offset=offset, limit=limit,
                                       focus=focus))
    answer: dict[str, Any] = _plain(page)
    return answer | {"rows": [_plain(r) | {"health": r.health} for r in page.rows]}


@devices.get("/{device_id}", summary="One device: its row, fingerprint, history, latency, features and alerts")
def show_device(device_id: Annotated[str, Path(pattern=DEVICE)],
                op: Annotated[Operator, Depends(permit(Permission.READ))]) -> dict[str, Any]:
    try:
        detail = op.fleet().device(device_id)
    except ActionError as exc:
        raise HTTPException(404, str(exc)) from None
    return _object(detail) | {"health": detail.row.health}


@devices.post("/{device_id}/revoke", summary="Revoke the device: its credentials stop working, its session drops")
def revoke_device(device_id: Annotated[str, Path(pattern=DEVICE)],
                  op: Annotated[Operator, Depends(permit(Permission.REVOKE_DEVICE))]) -> dict[str, Any]:
    try:
        op.fleet().revoke(device_id)
    except ActionError as exc:
        raise (HTTPException(404, str(exc)) if "no device" in str(exc) else _refused(exc)) from None
    return {"device": device_id, "revoked": True}


# -- models ------------------------------------------------------------------------------------

models = APIRouter(prefix="/models", tags=["models"])


@models.get("", summary="Every model version, newest first")
def list_models(op: Annotated[Operator, Depends(permit(Permission.READ))]) -> list[dict[str, Any]]:
    return [_plain(r) for r in op.fleet().models()]


@models.get("/{ref}", summary="One version: lineage, stage, approvals, devices, history, model card")
def show_model(ref: Annotated[str, Path(pattern=REF)],
               op: Annotated[Operator, Depends(permit(Permission.READ))]) -> dict[str, Any]:
    from server.governance import version_card

    v = _version(op, ref)
    with Session(op.registry.engine) as db:
        card = version_card(db, v)
    return _object(card) | {"card": op.fleet().card(ref)}


class Decision(Body):
    reason: Annotated[str, Field(min_length=1, max_length=1000, description="Why (recorded)")]
    #: base64 Ed25519 signature of the decision (server/signatures.py), by the key registered for the operator.
    signature: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9+/=]+$")]


def _decide(op: Operator, ref: str, decision: Literal["approve", "reject"], body: Decision) -> dict[str, Any]:
    from server.governance import approve, reject

    v = _version(op, ref)
    if body.reason != body.reason.strip():  # the decision records it stripped: the signature would not verify then
        raise invalid("reason", "no leading or trailing whitespace: the reason is recorded, and signed, as given")
    with Session(op.registry.engine) as db:
        key = db.get(OperatorKey, op.name)
    if key is None:
        raise HTTPException(409, f"{op.name} has no signing key registered; run `edgeherd operator keygen`, which "
                                 f"registers its public key, then sign the decision with it")
    try:
        verify_decision(key.public_key, body.signature, manifest_sha256=v.manifest_sha256,
                        model=f"{v.name}:{v.version}", decision=decision, operator=op.name, reason=body.reason)
    except SignatureCheckError as exc:
        raise invalid("signature", str(exc), "signature") from None
    try:
        with Session(op.registry.engine) as db:
            moved = (approve if decision == "approve" else reject)(
                db, find_version(db, ref), op.name, body.reason, signature=body.signature,
                public_key=key.public_key)
            last = audit.head(db)
        if last is not None:
            op.registry.anchor_audit(last)
    except GovernanceError as exc:
        raise _refused(exc) from None
    return {"model": moved.ref, "from": moved.before.value, "to": moved.after.value, "audit_seq": moved.audit_seq}


@models.post("/{ref}/approve", summary="Approve a candidate (signed; four-eyes)")
def approve_model(ref: Annotated[str, Path(pattern=REF)], body: Decision,
                  op: Annotated[Operator, Depends(permit(Permission.APPROVE))]) -> dict[str, Any]:
    return _decide(op, ref, "approve", body)


@models.post("/{ref}/reject", summary="Send a candidate back to draft (signed)")
def reject_model(ref: Annotated[str, Path(pattern=REF)], body: Decision,
                 op: Annotated[Operator, Depends(permit(Permission.REJECT))]) -> dict[str, Any]:
    return _decide(op, ref, "reject", body)


def _move(op: Operator, ref: str, move: Any) -> dict[str, Any]:
    _version(op, ref)
    try:
        with Session(op.registry.engine) as db:
            moved = move(db, find_version(db, ref), op.name)
            last = audit.head(db)
        if last is not None:
            op.registry.anchor_audit(last)
    except GovernanceError as exc:
        raise _refused(exc) from None
    return {"model": moved.ref, "from": moved.before.value, "to": moved.after.value, "audit_seq": moved.audit_seq}


@models.post("/{ref}/promote", summary="Put a draft up for approval (draft → candidate)")
def promote_model(ref: Annotated[str, Path(pattern=REF)],
                  op: Annotated[Operator, Depends(permit(Permission.PROMOTE))]) -> dict[str, Any]:
    return _move(op, ref, promote)


@models.post("/{ref}/retire", summary="Retire a version: no rollout may use it again")
def retire_model(ref: Annotated[str, Path(pattern=REF)],
                 op: Annotated[Operator, Depends(permit(Permission.RETIRE))]) -> dict[str, Any]:
    return _move(op, ref, retire)


class Deploy(Body):
    device: Annotated[str, Field(pattern=DEVICE)]


@models.post("/{ref}/deploy", summary="Deploy a version to one device (production devices take approved versions)")
def deploy_model(ref: Annotated[str, Path(pattern=REF)], body: Deploy,
                 op: Annotated[Operator, Depends(permit(Permission.DEPLOY))]) -> dict[str, Any]:
    _version(op, ref)
    try:
        said = op.fleet().deploy(body.device, ref)
    except ActionError as exc:
        raise _refused(exc) from None
    return {"model": ref, "device": body.device, "result": said}


# -- rollouts ----------------------------------------------------------------------------------

rollouts = APIRouter(prefix="/rollouts", tags=["rollouts"])


@rollouts.get("", summary="Every rollout, newest first")
def list_rollouts(op: Annotated[Operator, Depends(permit(Permission.READ))]) -> list[dict[str, Any]]:
    return [_plain(r) for r in op.fleet().rollouts()]


@rollouts.get("/{name}", summary="One rollout: waves, gate verdicts, who started it")
def show_rollout(name: Annotated[str, Path(pattern=NAME)],
                 op: Annotated[Operator, Depends(permit(Permission.READ))]) -> dict[str, Any]:
    try:
        return _object(op.fleet().rollout(name))
    except ActionError as exc:
        raise HTTPException(404, str(exc)) from None


class Target(Body):
    groups: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=100)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=100)
    devices: list[Annotated[str, Field(pattern=DEVICE)]] = Field(default_factory=list, max_length=10_000)


class StartRollout(Body):
    name: Annotated[str, Field(pattern=NAME)]
    model: Ref
    target: Target
    spec: RolloutSpec = Field(default_factory=RolloutSpec)
    production: bool = False
    artifact: Annotated[str | None, Field(default=None, pattern=NAME)] = None


@rollouts.post("", status_code=201, summary="Record a rollout; the running server starts it on its next step")
def start_rollout(body: StartRollout,
                  op: Annotated[Operator, Depends(permit(Permission.START_ROLLOUT))]) -> dict[str, Any]:
    try:
        row = start_governed(op.registry, op.governance, op.name, name=body.name, model=body.model,
                             target=body.target.model_dump(), spec=body.spec, production=body.production,
                             artifact=body.artifact)
    except GovernanceError as exc:
        raise (HTTPException(404, str(exc)) if "not in the registry" in str(exc) or "no version" in str(exc)
               else _refused(exc)) from None
    except (RolloutError, RegistryError) as exc:
        raise _refused(exc) from None
    return {"name": row.name, "model": body.model, "production": row.production, "state": row.state}


class Command(Body):
    reason: Annotated[str | None, Field(default=None, max_length=1000)] = None


def _may(command: RolloutCommand) -> Callable[..., Operator]:
    """The dependency that lets an operator give ``command``: the permission server/rollouts.py ``COMMANDS`` names."""
    return permit(COMMANDS[command].permission)


def _command(op: Operator, name: str, command: RolloutCommand, body: Command) -> dict[str, Any]:
    with Session(op.registry.engine) as db:
        if db.exec(select(Rollout.id).where(Rollout.name == name)).first() is None:
            raise HTTPException(404, f"no rollout {name}")
    try:
        view = command_governed(op.registry, op.governance, op.name, name, command, body.reason)
    except (GovernanceError, RolloutError, RegistryError) as exc:
        raise _refused(exc) from None
    return {"name": name, "state": view.state.value}


@rollouts.post("/{name}/pause", summary="Pause: no new wave starts")
def pause_rollout(name: Annotated[str, Path(pattern=NAME)], body: Command,
                  op: Annotated[Operator, Depends(_may(RolloutCommand.PAUSE))]) -> dict[str, Any]:
    return _command(op, name, RolloutCommand.PAUSE, body)


@rollouts.post("/{name}/resume", summary="Resume a paused rollout")
def resume_rollout(name: Annotated[str, Path(pattern=NAME)], body: Command,
                   op: Annotated[Operator, Depends(_may(RolloutCommand.RESUME))]) -> dict[str, Any]:
    return _command(op, name, RolloutCommand.RESUME, body)


@rollouts.post("/{name}/abort", summary="Abort: devices keep what they run")
def abort_rollout(name: Annotated[str, Path(pattern=NAME)], body: Command,
                  op: Annotated[Operator, Depends(_may(RolloutCommand.ABORT))]) -> dict[str, Any]:
    return _command(op, name, RolloutCommand.ABORT, body)


@rollouts.post("/{name}/rollback", summary="Roll back: devices go back to what they ran before")
def rollback_rollout(name: Annotated[str, Path(pattern=NAME)], body: Command,
                     op: Annotated[Operator, Depends(_may(RolloutCommand.ROLLBACK))]) -> dict[str, Any]:
    return _command(op, name, RolloutCommand.ROLLBACK, body)


# -- drift, features and the audit log --------------------------------------------------------------

insight = APIRouter(tags=["drift and audit"])


@insight.get("/drift", summary="Fleet drift per version and feature, worst first")
def drift(op: Annotated[Operator, Depends(permit(Permission.READ))],
          hours: Annotated[float, Query(gt=0, le=24 * 90)] = 24.0) -> list[dict[str, Any]]:
    return [_plain(r) for r in op.fleet().drift(hours)]


@insight.get("/audit", summary="Audit entries, newest first, and whether the chain verifies")
def audit_log(op: Annotated[Operator, Depends(permit(Permission.READ))],
              text: Annotated[str, Query(max_length=200)] = "",
              limit: Annotated[int, Query(ge=1, le=10_000)] = 500) -> dict[str, Any]:
    entries, report = op.fleet().audit_log(text, limit)
    return {"entries": [{"seq": e.seq, "at": e.at.isoformat(), "actor": e.actor, "action": e.action,
                         "subject": e.subject, "detail": e.detail} for e in entries],
            "verified": {"ok": report.ok, "entries": report.entries, "problems": list(report.problems)}}


# -- operators ---------------------------------------------------------------------------------

operators = APIRouter(prefix="/operators", tags=["operators"])

_KEY = re.compile(r"^ed25519:[A-Za-z0-9+/]{43}=$")


class PublicKey(Body):
    public_key: Annotated[str, Field(pattern=_KEY.pattern, description="ed25519:<base64 of 32 bytes>")]
    #: To replace a registered key: the current key's signature (base64) of
    #: ``server.signatures.key_replacement_payload(public_key)``.
    previous_signature: Annotated[str | None, Field(default=None, max_length=128,
                                                     pattern=r"^[A-Za-z0-9+/=]+$")] = None


def _full_scope(op: Operator, what: str) -> None:
    if op.caller.scope != "full":
        raise HTTPException(403, f"token {op.caller.token_id} is scoped to pushing; {what} needs a full-scope token")


def _checked_key(public_key: str) -> str:
    from protocol.errors import KeyFormatError
    from protocol.signing import load_public_key

    try:
        load_public_key(public_key)
    except KeyFormatError as exc:
        raise invalid("public_key", str(exc), "key") from None
    return public_key


@operators.put("/me/key", summary="Register the caller's Ed25519 public key for signing decisions; replacing one "
                                  "needs a signature by the current key")
def register_key(body: PublicKey, op: Annotated[Operator, Depends(permit(Permission.READ))]) -> dict[str, Any]:
    from server.signatures import SignatureCheckError, verify_key_replacement

    _full_scope(op, "registering a signing key")
    public_key = _checked_key(body.public_key)
    with Session(op.registry.engine) as db:
        current = db.get(OperatorKey, op.name)
    if current is not None and current.public_key != public_key:
        if body.previous_signature is None:
            raise HTTPException(403, f"{op.name} has a signing key registered; replacing it needs a signature by it "
                                     f"(`edgeherd operator keygen --force` makes one from the key file it replaces), "
                                     f"or an admin (PUT /operators/{op.name}/key)")
        try:
            verify_key_replacement(current.public_key, body.previous_signature, public_key)
        except SignatureCheckError as exc:
            raise invalid("previous_signature", str(exc), "signature") from None
    _set_key(op, op.name, public_key)
    return {"operator": op.name, "public_key": public_key}


@operators.put("/{name}/key", summary="Register or replace an operator's public key (admin), e.g. after a lost key")
def register_key_for(name: Annotated[str, Path(pattern=OPERATOR_NAME)], body: PublicKey,
                     op: Annotated[Operator, Depends(permit(Permission.MANAGE_OPERATORS))]) -> dict[str, Any]:
    _full_scope(op, "registering a signing key")
    try:
        who = next(e.name for e in op.governance.config.operator if e.name.casefold() == name.casefold())
    except StopIteration:
        raise HTTPException(404, f"{name} is not an operator") from None
    public_key = _checked_key(body.public_key)
    _set_key(op, who, public_key)
    return {"operator": who, "public_key": public_key}


def _set_key(op: Operator, operator: str, public_key: str) -> None:
    with Session(op.registry.engine) as db:
        audit.lock(db)
        row = db.get(OperatorKey, operator)
        before = row.public_key if row is not None else None
        if before == public_key:
            db.rollback()
            return
        if row is None:
            row = OperatorKey(operator=operator, public_key=public_key)
        else:
            row.public_key = public_key
        db.add(row)
        audit.append(db, op.name, "operator.key_register", f"operator:{operator}",
                     {"public_key": public_key, "replaces": before, "token": op.caller.token_id})
        db.commit()


@operators.get("/keys", summary="Every operator's registered public key")
def list_keys(op: Annotated[Operator, Depends(permit(Permission.READ))]) -> list[dict[str, Any]]:
    with Session(op.registry.engine) as db:
        return [{"operator": k.operator, "public_key": k.public_key, "registered_at": k.created_at.isoformat()}
                for k in db.exec(select(OperatorKey).order_by(col(OperatorKey.operator)))]


TtlDays = Annotated[float, Field(ge=1 / 1440, le=366, description="Days the token lives: 1 minute to 366 days")]


class NewOperator(Body):
    name: Annotated[str, Field(pattern=OPERATOR_NAME)]
    role: Role
    ttl_days: TtlDays = 90.0


def _token_json(row: OperatorToken) -> dict[str, Any]:
    return {"id": row.id, "operator": row.operator, "scope": row.scope, "label": row.label,
            "created_by": row.created_by, "created_at": row.created_at.isoformat(),
            "expires_at": row.expires_at.isoformat(),
            "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
            "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None}


@operators.post("", status_code=201, summary="Add an operator with a role (admin); their first token, shown once")
def add_operator(body: NewOperator,
                 op: Annotated[Operator, Depends(permit(Permission.MANAGE_OPERATORS))]) -> dict[str, Any]:
    from server.operators import add_operator as add

    try:
        token, row = add(op.registry.data, op.registry.engine, body.name, body.role, actor=op.name,
                         ttl=timedelta(days=body.ttl_days))
    except GovernanceError as exc:
        raise _refused(exc) from None
    return {"operator": body.name, "role": body.role.value, "token": token, "token_info": _token_json(row)}


class NewToken(Body):
    operator: Annotated[str | None, Field(default=None, pattern=OPERATOR_NAME,
                                          description="Whose (admins only; default: the caller)")] = None
    scope: Literal["full", "push"] = "full"
    ttl_days: TtlDays = 90.0
    label: Annotated[str, Field(max_length=128)] = ""


@operators.post("/tokens", status_code=201, summary="A new token (for another operator: admins only), shown once")
def new_token(body: NewToken, op: Annotated[Operator, Depends(permit(Permission.READ))]) -> dict[str, Any]:
    _full_scope(op, "making a token")
    who = body.operator or op.name
    if who.casefold() != op.name.casefold():
        _admin(op)
    try:
        op.governance.role(who)
    except GovernanceError as exc:
        raise HTTPException(404, str(exc)) from None
    if op.caller.scope != "full" and body.scope == "full":
        raise HTTPException(403, f"token {op.caller.token_id} is scoped to pushing; it cannot make a full-scope one")
    with Session(op.registry.engine) as db:
        try:
            token, row = issue(db, who, created_by=op.name, scope=body.scope, ttl=timedelta(days=body.ttl_days),
                               label=body.label)
        except TokenError as exc:
            raise invalid("", str(exc), "token") from None
    return {"token": token, "token_info": _token_json(row)}


def _admin(op: Operator) -> None:
    try:
        op.governance.require(op.name, Permission.MANAGE_OPERATORS)
    except GovernanceError as exc:
        raise HTTPException(403, str(exc)) from None
    if op.caller.scope != "full":
        raise HTTPException(403, f"token {op.caller.token_id} is scoped to pushing; managing operators needs a "
                                 f"full-scope token")


@operators.get("/tokens", summary="Tokens: an admin's view lists everyone's, anyone else's their own")
def list_tokens(op: Annotated[Operator, Depends(permit(Permission.READ))]) -> list[dict[str, Any]]:
    mine = not op.governance.allows(op.name, Permission.MANAGE_OPERATORS)
    with Session(op.registry.engine) as db:
        return [_token_json(t) for t in tokens_of(db, op.name if mine else None)]


@operators.delete("/tokens/{token_id}", summary="Revoke a token (your own, or anyone's for an admin)")
def revoke_token(token_id: Annotated[str, Path(pattern=r"^tok_[a-z0-9]{12}$")],
                 op: Annotated[Operator, Depends(permit(Permission.READ))]) -> dict[str, Any]:
    if token_id != op.caller.token_id:  # a push-scoped token may revoke itself, nothing else
        _full_scope(op, "revoking another token")
    with Session(op.registry.engine) as db:
        row = db.get(OperatorToken, token_id)
        if row is None:
            raise HTTPException(404, f"no token {token_id}")
        if row.operator.casefold() != op.name.casefold():
            _admin(op)
        return _token_json(revoke(db, token_id, actor=op.name))


ROUTERS = [meta, devices, enrolment, models, upload, rollouts, insight, audit_checks, feature_registry, alerts,
           operators]
