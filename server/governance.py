"""Who may do what, and the life of a model version: roles, approvals, four-eyes.

Operators and their roles come from ``<data_dir>/operators.toml``:

.. code-block:: toml

    production_groups = ["prod"]     # rollouts to these device groups need an approved version

    [[operator]]
    name = "alice"
    role = "admin"                   # viewer, operator, approver or admin

    [[operator]]
    name = "bob"
    role = "approver"

Without that file, edgeherd runs in *bootstrap mode*: the OS user running the
command is an admin and nobody else is known. That is for a fresh install; as
a version's author cannot approve it and nobody else exists, four-eyes cannot
be satisfied until ``operators.toml`` names a second person. A server whose
audit log shows that ``operators.toml`` was in force (an approval, or actions
by two or more people: :func:`governed_history`) refuses bootstrap mode
(:func:`check_bootstrap`), so losing the file, e.g. in a restore, does not
silently drop governance.

Identity is claimed, not proven: ``--as``, ``EDGEHERD_OPERATOR`` or the OS user
name (:func:`current_operator`). Role checks stop mistakes and record who said
they acted; whoever can write the database can bypass them. What they cannot
do unseen is rewrite the audit log (server/audit.py).

A version's stage moves draft → candidate → approved → deployed, and any stage
but retired → retired; a rejected candidate goes back to draft. Each move is
one function here that checks the move is legal, appends its audit entry and
commits both together. Role checks are the caller's, before the call:
``gov.require(actor, Permission.APPROVE)``.

Errors: :class:`GovernanceError` (an operators.toml that does not validate,
an unknown operator, a missing role, an illegal move, a four-eyes violation).
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import func, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from protocol.tomlfile import read_toml
from server import audit
from server.db import database_url, make_engine
from server.db.models import Approval, AuditEntry, Device, ModelVersion
from server.errors import ServerError
from server.permissions import Permission, Role, allowed
from server.rollouts import COMMANDS

__all__ = ["OPERATORS_FILE", "ROLLOUT_COMMANDS", "SERVICE_ACTORS", "Decision", "Governance", "GovernanceError",
           "OperatorEntry", "OperatorsConfig", "Permission", "Role", "Stage", "Transition", "allowed", "approve",
           "check_bootstrap", "check_deploy", "check_rollout", "current_operator", "find_version",
           "governed_history", "is_production_target", "load_operators", "mark_deployed", "promote", "promoted_by",
           "reject", "retire", "subject", "version_card"]

OPERATORS_FILE = "operators.toml"
#: Environment variable naming the operator when ``--as`` is not given.
OPERATOR_ENV = "EDGEHERD_OPERATOR"
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$"
MAX_REASON = 1000
#: Actors the server records for itself, never a person: the registry's default (``server.registry.SYSTEM``)
#: and the rollout orchestrator (``server.orchestrator.ORCHESTRATOR``).
SERVICE_ACTORS = frozenset({"system", "orchestrator"})


class GovernanceError(ServerError):
    """Not allowed, or not possible; the message names who, what and what is needed."""


# -- roles and permissions (pure: server/permissions.py) ----------------------------------------------

#: The permission each rollout command needs, as server/rollouts.py ``COMMANDS`` says; keyed by the commands
#: (``server.rollouts.RolloutCommand``, a ``str``) so the UIs look their action names ("pause", ...) up in it.
ROLLOUT_COMMANDS: dict[str, Permission] = {c: rule.permission for c, rule in COMMANDS.items()}


# -- operators.toml ------------------------------------------------------------------------------


class OperatorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The name operators act under (``--as``, ``EDGEHERD_OPERATOR`` or the OS user name).
    name: str
    #: viewer, operator, approver or admin.
    role: Role

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError("must be 1 to 64 characters: letters, digits, '_', '.', '@' and '-', "
                             "not starting with '.', '@' or '-'")
        return value


class OperatorsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Device groups whose rollouts are production: they need an approved version (approver ≠ author).
    production_groups: list[str] = Field(default_factory=list)
    #: One ``[[operator]]`` table per person.
    operator: list[OperatorEntry] = Field(default_factory=list)

    @field_validator("production_groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        if any(not g.strip() for g in value):
            raise ValueError("group names must not be empty")
        return value


def load_operators(path: Path) -> OperatorsConfig:
    """Read and validate ``path``; every problem names the file and the key."""
    raw = read_toml(path, "operators file", GovernanceError)
    try:
        config = OperatorsConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            loc = err["loc"]
            if len(loc) >= 2 and loc[0] == "operator" and isinstance(loc[1], int):
                key = f"operator[{loc[1] + 1}]" + "".join(f".{p}" for p in loc[2:])
            else:
                key = ".".join(str(p) for p in loc) or "(file)"
            problems.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
        raise GovernanceError(f"{path}: " + "; ".join(problems)) from None
    seen: dict[str, int] = {}
    for i, entry in enumerate(config.operator, start=1):
        if entry.name.casefold() in seen:
            raise GovernanceError(f"{path}: operator[{i}].name: {entry.name!r} is already operator"
                                  f"[{seen[entry.name.casefold()]}]; each person is listed once")
        seen[entry.name.casefold()] = i
    return config


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no LOGNAME/USER and no passwd entry (some containers)
        raise GovernanceError(f"cannot tell who you are: this process has no user name; set {OPERATOR_ENV} "
                              f"or pass --as") from None


def current_operator(as_user: str | None = None) -> str:
    """Who is acting: ``as_user``, else ``$EDGEHERD_OPERATOR``, else the OS user name."""
    return as_user or os.environ.get(OPERATOR_ENV) or _os_user()


def is_production_target(config: OperatorsConfig, groups: list[str]) -> bool:
    """True when any of ``groups`` is a production group."""
    return bool(set(groups) & set(config.production_groups))


class Governance:
    """Roles of the known operators; :meth:`require` before acting."""

    def __init__(self, config: OperatorsConfig, *, source: str = OPERATORS_FILE, bootstrap: bool = False) -> None:
        self.config = config
        self.source = source
        #: True when there is no operators.toml and the OS user is the only (admin) operator.
        self.bootstrap = bootstrap
        self._roles = {e.name.casefold(): e.role for e in config.operator}

    @classmethod
    def load(cls, data_dir: Path, engine: Engine | None = None) -> Governance:
        """From ``<data_dir>/operators.toml``, or bootstrap mode when that file does not exist and the database
        (``engine``, else the data directory's) does not show it was in force (:func:`check_bootstrap`)."""
        path = data_dir / OPERATORS_FILE
        if not path.exists():
            check_bootstrap(data_dir, engine)
            me = _os_user()
            return cls(OperatorsConfig(operator=[OperatorEntry(name=me, role=Role.ADMIN)]), source=str(path),
                       bootstrap=True)
        return cls(load_operators(path), source=str(path))

    def role(self, name: str) -> Role:
        found = self._roles.get(name.casefold())
        if found is not None:
            return found
        if self.bootstrap:
            known = ", ".join(e.name for e in self.config.operator)
            raise GovernanceError(f"{name} is not a known operator: {self.source} does not exist, so only the "
                                  f"bootstrap admin ({known}) is; create it to add others (docs/governance.md)")
        raise GovernanceError(f"{name} is not an operator in {self.source}; add an [[operator]] entry with a role")

    def allows(self, name: str, permission: Permission) -> bool:
        """Whether ``name`` may; False for an unknown operator (for greying out what cannot be done)."""
        try:
            return allowed(self.role(name), permission)
        except GovernanceError:
            return False

    def require(self, name: str, permission: Permission) -> Role:
        """``name``'s role if it allows ``permission``, else :class:`GovernanceError` saying what is needed."""
        role = self.role(name)
        if not allowed(role, permission):
            raise GovernanceError(f"{name} is {role.with_article}; {permission.value} needs the "
                                  f"{permission.min_role.value} role")
        return role

    def is_production(self, groups: list[str]) -> bool:
        return is_production_target(self.config, groups)


# -- bootstrap mode and the audit log ---------------------------------------------------------------


def governed_history(db: Session) -> str | None:
    """What in the audit log shows that an ``operators.toml`` was in force, in words; None when nothing does.

    Bootstrap mode knows one person, the OS user, and no production groups. So an approval on record (four-eyes
    needs a second person) or actions by two or more people (actors other than :data:`SERVICE_ACTORS`, names
    compared regardless of case) can only come from operators that a file named.
    """
    approval = db.exec(select(AuditEntry).where(AuditEntry.action == "model.approve")
                       .order_by(col(AuditEntry.seq)).limit(1)).first()
    if approval is not None:
        return f"audit #{approval.seq}: {approval.actor} approved {approval.subject.removeprefix('model:')}"
    first_seq = func.min(AuditEntry.seq)
    people: dict[str, tuple[str, int]] = {}
    people_first = (select(AuditEntry.actor, first_seq).where(col(AuditEntry.actor).not_in(sorted(SERVICE_ACTORS)))
                    .group_by(col(AuditEntry.actor)).order_by(first_seq).limit(1000))
    for actor, seq in db.exec(people_first):
        people.setdefault(actor.casefold(), (actor, seq))
        if len(people) == 2:
            (a, a_seq), (b, b_seq) = people.values()
            return f"audit #{a_seq} and #{b_seq}: actions by {a} and by {b}"
    return None


def check_bootstrap(data_dir: Path, engine: Engine | None = None) -> None:
    """:class:`GovernanceError` when ``data_dir`` has no ``operators.toml`` (bootstrap mode) but the audit log of
    its database (``engine``, else the data directory's) shows one was in force (:func:`governed_history`):
    a restore that left the file out, or a file deleted by mistake, must not silently drop roles, production
    groups and four-eyes. Nothing to check when the file exists or there is no database yet."""
    path = data_dir / OPERATORS_FILE
    if path.exists():
        return
    own = engine is None
    if engine is None:
        url = database_url(data_dir)
        if url.startswith("sqlite") and not Path(url.split("///", 1)[1]).exists():
            return  # a fresh install: no database, no history
        engine = make_engine(url)
    try:
        if not inspect(engine).has_table(AuditEntry.__tablename__):
            return
        with Session(engine) as db:
            evidence = governed_history(db)
    except SQLAlchemyError as exc:
        raise GovernanceError(f"{path} does not exist and the audit log, which says whether it must, cannot be "
                              f"read: {exc}") from None
    finally:
        if own:
            engine.dispose()
    if evidence is not None:
        raise GovernanceError(
            f"{path} does not exist, so edgeherd would run in bootstrap mode (the OS user the only operator, an "
            f"admin; no production groups), but the audit log shows operators were governed by one ({evidence}). "
            f"Restore operators.toml from the backup (`edgeherd server backup` keeps it) or recreate it "
            f"(docs/governance.md)")


# -- the version lifecycle -----------------------------------------------------------------------


class Stage(str, Enum):
    DRAFT = "draft"
    CANDIDATE = "candidate"
    APPROVED = "approved"
    DEPLOYED = "deployed"
    RETIRED = "retired"


@dataclass(frozen=True)
class Transition:
    """What a lifecycle call did."""

    ref: str
    before: Stage
    after: Stage
    #: The audit entry recording it; None when nothing changed.
    audit_seq: int | None

    @property
    def changed(self) -> bool:
        return self.audit_seq is not None


def subject(version: ModelVersion) -> str:
    """How the audit log names a version: ``model:NAME:VERSION``."""
    return f"model:{version.name}:{version.version}"


def _ref(version: ModelVersion) -> str:
    return f"{version.name}:{version.version}"


def _stage(version: ModelVersion) -> Stage:
    try:
        return Stage(version.stage)
    except ValueError:
        raise GovernanceError(f"{_ref(version)} has an unknown stage {version.stage!r}; "
                              f"expected one of {', '.join(s.value for s in Stage)}") from None


def find_version(db: Session, ref: str) -> ModelVersion:
    """The version named ``NAME:VERSION``."""
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise GovernanceError(f"{ref!r} is not NAME:VERSION (e.g. digits:1.0.0)")
    row: ModelVersion | None = db.exec(select(ModelVersion).where(ModelVersion.name == name,
                                                              ModelVersion.version == version)).first()
    if row is None:
        raise GovernanceError(f"no model {ref}; see `edgeherd model list`")
    return row


def _same_person(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.casefold() == b.casefold()


def _reason(reason: str, what: str) -> str:
    text = reason.strip()
    if not text:
        raise GovernanceError(f"{what} needs a reason (--reason TEXT)")
    if len(text) > MAX_REASON:
        raise GovernanceError(f"the reason is {len(text)} characters; at most {MAX_REASON}")
    return text


def _move(db: Session, version: ModelVersion, actor: str, *, action: str, verb: str, sources: set[Stage],
          to: Stage, detail: dict[str, Any] | None = None, approval: Decision | None = None,
          check: Callable[[ModelVersion], None] | None = None, commit: bool = True) -> Transition:
    """Lock, re-read, check, change, audit and commit; nothing is written when a check fails. ``commit=False``: in
    the caller's transaction, which commits the move with the rest of its work or rolls it all back."""
    version_id = version.id
    if version_id is None:
        raise GovernanceError(f"{_ref(version)} is not in the registry (push it first)")
    if version not in db:
        db.add(version)
    # the caller anchors the entry (Transition.audit_seq) where it keeps one
    with audit.unit_of_work(db, None) if commit else nullcontext(db):
        audit.lock(db)  # no other audited writer until this commits
        db.refresh(version)
        before = _stage(version)
        if before not in sources:
            names = [s.value for s in Stage if s in sources]
            needed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            raise GovernanceError(f"{_ref(version)} is {before.value}; {verb} needs it to be {needed}")
        if check is not None:
            check(version)
        version.stage = to.value
        db.add(version)
        signed = approval.signed() if approval is not None else {}
        entry = audit.append(db, actor, action, subject(version),
                             {"from": before.value, "to": to.value, "manifest_sha256": version.manifest_sha256}
                             | (detail or {}) | signed)
        if approval is not None:
            db.add(Approval(version_id=version_id, actor=actor, decision=approval.decision, reason=approval.reason,
                            signature=approval.signature, public_key=approval.public_key, audit_seq=entry.seq))
    if commit:
        db.refresh(version)
    return Transition(_ref(version), before, to, entry.seq)


@dataclass(frozen=True)
class Decision:
    """An approval or a rejection as recorded: with the approver's signature and public key when signed
    (server/signatures.py; the caller has verified it)."""

    decision: str
    reason: str
    signature: str | None = None
    public_key: str | None = None

    def signed(self) -> dict[str, str]:
        """What the audit entry adds: the signature and key, when there are."""
        if self.signature is None or self.public_key is None:
            return {}
        return {"signature": self.signature, "public_key": self.public_key}


def promoted_by(db: Session, version: ModelVersion) -> str | None:
    """Who last put ``version`` up for approval (draft → candidate), from the audit log."""
    row: str | None = db.exec(select(AuditEntry.actor).where(AuditEntry.action == "model.promote",
                                                             AuditEntry.subject == subject(version))
                              .order_by(col(AuditEntry.seq).desc()).limit(1)).first()
    return row


def promote(db: Session, version: ModelVersion, actor: str) -> Transition:
    """draft → candidate: put the version up for approval."""
    return _move(db, version, actor, action="model.promote", verb="promoting", sources={Stage.DRAFT},
                 to=Stage.CANDIDATE)


def four_eyes_refusal(actor: str, ref: str, *, author: str | None, pushed_by: str | None,
                      promoted_by: str | None) -> str | None:
    """Why ``actor`` may not approve version ``ref`` (four-eyes), or None when they may: the approver is not its
    author, not who pushed it, not who promoted it; and a version without a recorded author is never approved. The
    one rule :func:`approve` enforces and the TUIs grey their buttons by."""
    if author is None:
        return (f"{ref} has no recorded author, so approver ≠ author cannot be checked and it cannot be approved; "
                f"push a build that records its author, as a new version")
    if _same_person(actor, author):
        return f"{actor} is the author of {ref} and cannot approve it: another approver must (four-eyes)"
    if _same_person(actor, pushed_by):  # the author field is the build's word; the pusher is on record
        return f"{actor} pushed {ref} and cannot approve it: another approver must (four-eyes)"
    if _same_person(actor, promoted_by):
        return f"{actor} promoted {ref} to candidate and cannot approve it: another approver must (four-eyes)"
    return None


def approve(db: Session, version: ModelVersion, actor: str, reason: str, *, signature: str | None = None,
            public_key: str | None = None) -> Transition:
    """candidate → approved, recording an approval; the approver must not be the author, the operator who pushed
    it or the one who promoted it (four-eyes). ``signature``/``public_key``: the approver's verified signature of
    the decision (server/signatures.py), recorded with it.

    A version with no recorded author cannot be approved: nobody could tell
    whether its approver wrote it.
    """
    why = _reason(reason, "approving")

    def four_eyes(v: ModelVersion) -> None:
        refusal = four_eyes_refusal(actor, _ref(v), author=v.author, pushed_by=v.pushed_by,
                                    promoted_by=promoted_by(db, v))
        if refusal is not None:
            raise GovernanceError(refusal)

    return _move(db, version, actor, action="model.approve", verb="approving", sources={Stage.CANDIDATE},
                 to=Stage.APPROVED, detail={"reason": why},
                 approval=Decision("approve", why, signature, public_key), check=four_eyes)


def reject(db: Session, version: ModelVersion, actor: str, reason: str, *, signature: str | None = None,
           public_key: str | None = None) -> Transition:
    """candidate → draft, recording the rejection and why (signed as :func:`approve` is, when signed)."""
    why = _reason(reason, "rejecting")
    return _move(db, version, actor, action="model.reject", verb="rejecting", sources={Stage.CANDIDATE},
                 to=Stage.DRAFT, detail={"reason": why}, approval=Decision("reject", why, signature, public_key))


def mark_deployed(db: Session, version: ModelVersion, actor: str, *, rollout: str | None = None,
                  commit: bool = True) -> Transition:
    """approved → deployed, once a rollout has put it on devices; nothing happens if already deployed.

    ``rollout``: the rollout that did, recorded in the audit entry. ``commit=False``: in the caller's transaction
    (the orchestrator's step, committed under the rollout's lease with everything else the step changed)."""
    if version not in db:
        db.add(version)
    db.refresh(version)
    if _stage(version) is Stage.DEPLOYED:
        return Transition(_ref(version), Stage.DEPLOYED, Stage.DEPLOYED, None)
    return _move(db, version, actor, action="model.deployed", verb="marking it deployed",
                 sources={Stage.APPROVED}, to=Stage.DEPLOYED,
                 detail={"rollout": rollout} if rollout is not None else None, commit=commit)


def retire(db: Session, version: ModelVersion, actor: str) -> Transition:
    """Any stage but retired → retired: no new rollout may use it (admin)."""
    return _move(db, version, actor, action="model.retire", verb="retiring",
                 sources=set(Stage) - {Stage.RETIRED}, to=Stage.RETIRED)


def _latest_approval(db: Session, version: ModelVersion) -> Approval | None:
    row: Approval | None = db.exec(select(Approval).where(Approval.version_id == version.id)
                                   .order_by(col(Approval.id).desc()).limit(1)).first()
    return row


def check_rollout(db: Session, version: ModelVersion, *, production: bool) -> None:
    """Raise :class:`GovernanceError` unless ``version`` may be rolled out (to production, if ``production``).

    Never a retired version. Production: approved or deployed, with the latest
    decision on record an approval by someone other than the author.
    """
    stage = _stage(version)
    ref = _ref(version)
    if stage is Stage.RETIRED:
        raise GovernanceError(f"{ref} is retired and cannot be rolled out")
    if not production:
        return
    if stage not in (Stage.APPROVED, Stage.DEPLOYED):
        raise GovernanceError(f"{ref} is {stage.value}; a production rollout needs an approved version "
                              f"(edgeherd model promote, then approve by someone other than the author)")
    if version.author is None:
        raise GovernanceError(f"{ref} has no recorded author, so its approval cannot be checked against four-eyes")
    latest = _latest_approval(db, version)
    if latest is None or latest.decision != "approve":
        raise GovernanceError(f"{ref} is {stage.value} but has no approval on record; it cannot go to production")
    # the approval on record, checked again by the one rule (who promoted it is the audit log's, not rechecked)
    if four_eyes_refusal(latest.actor, ref, author=version.author, pushed_by=version.pushed_by,
                         promoted_by=None) is not None:
        raise GovernanceError(f"{ref} was approved by its own author {latest.actor}; production needs an approval "
                              f"by someone else (four-eyes)")


def check_deploy(db: Session, ref: str, device_id: str, config: OperatorsConfig) -> None:
    """A direct deploy of ``ref`` (NAME:VERSION) to one device obeys the rollout rules: a device in a production
    group takes approved versions only."""
    device = db.get(Device, device_id)
    check_rollout(db, find_version(db, ref), production=is_production_target(config, device.groups if device else []))


# -- the lineage view ----------------------------------------------------------------------------


def version_card(db: Session, version: ModelVersion, *, history: int = 20) -> dict[str, Any]:
    """Everything an operator asks about a version: lineage, stage, approvals, who runs it, recent history."""
    approvals = db.exec(select(Approval).where(Approval.version_id == version.id).order_by(col(Approval.id))).all()
    running = db.exec(select(Device.id).where(Device.running_manifest == version.manifest_sha256)
                      .order_by(col(Device.id))).all()
    desired = db.exec(select(Device.id).where(Device.desired_manifest == version.manifest_sha256)
                      .order_by(col(Device.id))).all()
    return {
        "name": version.name,
        "version": version.version,
        "manifest_sha256": version.manifest_sha256,
        "stage": version.stage,
        "author": version.author,
        "created_at": version.created_at,
        #: As recorded in the signed manifest: dataset hash, seed, recipe, code revision, parent version, …
        "lineage": dict(version.lineage),
        "approvals": [{"actor": a.actor, "decision": a.decision, "reason": a.reason, "at": a.at} for a in approvals],
        "devices": list(running),
        "desired_by": list(desired),
        "history": [{"seq": e.seq, "at": e.at, "actor": e.actor, "action": e.action, "detail": e.detail}
                    for e in audit.entries(db, subject=subject(version), limit=history)],
    }
