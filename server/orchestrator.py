"""Runs rollouts: loads each from the database, observes the fleet, plans a step, applies it.

:func:`server.rollouts.plan` decides; this module is its I/O edge. Every
step of a rollout happens under its lease (server/leases.py), in one
transaction: the desired states it publishes (retained, before the commit,
so a crash in between re-publishes the same generation, which agents ignore
as seen), the rollout's new state, each device's progress, the gates'
numbers and the audit entries. Everything the planner needs is in the
database, so a restarted server (or another replica) carries on exactly
where the last step left off.

Operator commands (:func:`create_rollout`, :func:`command_rollout`) go
through the same lease and the same transaction shape.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func
from sqlmodel import Session, col, select

from protocol import SignedManifest, decode_model
from protocol.ids import is_device_id
from server import audit, leases
from server.assignment import Outcome, choose, runtimes_of
from server.bus import Bus
from server.db.models import Device, DriftReportRow, GateEvaluation, ModelVersion, Rollout, RolloutDevice, TelemetryRow
from server.errors import ServerError
from server.governance import Governance, Permission, Stage, check_rollout, find_version, mark_deployed
from server.groups import record_release
from server.presence import is_online
from server.registry import Registry, RegistryError, check_artifact
from server.rollouts import (
    ACTIVE,
    COMMANDS,
    MOVING,
    Assign,
    Assignment,
    AssignmentState,
    Baseline,
    DeviceView,
    Metrics,
    Observation,
    Plan,
    Revert,
    RolloutCommand,
    RolloutSpec,
    RolloutView,
    State,
    apply_command,
    plan,
    soak_start,
)

__all__ = ["Orchestrator", "RolloutError", "command_governed", "command_rollout", "create_rollout", "describe",
           "resolve_target", "rollout_view", "start_governed", "store_view", "target_devices"]

log = logging.getLogger(__name__)

#: Actor recorded in the audit log for what the orchestrator decides by itself.
ORCHESTRATOR = "orchestrator"
_LEASE_TTL = 60.0
#: A window's predictions count as departed from the training labels when their chi-square p is below this.
OUTPUT_ALPHA = 0.005


class RolloutError(ServerError):
    """A rollout cannot be created or commanded; the message says why."""


# -- database ⇄ planner -------------------------------------------------------------------------


def rollout_view(db: Session, row: Rollout) -> RolloutView:
    version = db.get(ModelVersion, row.version_id)
    if version is None:
        raise RolloutError(f"rollout {row.name}: its model version is gone")
    devices = db.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == row.id)).all()
    try:
        states = {d.device_id: AssignmentState(d.state) for d in devices}
    except ValueError as exc:
        raise RolloutError(f"rollout {row.name}: a device's state is not one the planner knows ({exc})") from None
    return RolloutView(
        name=row.name, state=State(row.state), wave=row.wave, wave_started_at=row.wave_started_at,
        spec=RolloutSpec.model_validate(row.spec), manifest=version.manifest_sha256, artifact=row.artifact,
        reason=row.reason,
        assignments={d.device_id: Assignment(d.device_id, d.wave, states[d.device_id], d.previous_manifest,
                                             d.previous_artifact, d.assigned_at, d.finished_at, d.error)
                     for d in devices})


def store_view(db: Session, row: Rollout, view: RolloutView) -> None:
    """Write the planner's view of a rollout back into its row and its device rows (the caller commits)."""
    row.state, row.wave, row.wave_started_at, row.reason = view.state.value, view.wave, view.wave_started_at, (
        view.reason[:1000] if view.reason else None)
    row.updated_at = datetime.now(timezone.utc)
    db.add(row)
    existing = {d.device_id: d for d in db.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == row.id))}
    for did, a in view.assignments.items():
        state = AssignmentState(a.state).value  # stored as the plain string
        rec = existing.get(did) or RolloutDevice(rollout_id=row.id, device_id=did, wave=a.wave, state=state,
                                                  assigned_at=a.assigned_at)
        rec.wave, rec.state, rec.previous_manifest, rec.previous_artifact = (a.wave, state, a.previous_manifest,
                                                                              a.previous_artifact)
        rec.assigned_at, rec.finished_at, rec.error = a.assigned_at, a.finished_at, (a.error or None) and a.error[:1000]
        db.add(rec)


def target_devices(db: Session, target: dict[str, Any]) -> list[Device]:
    """Enrolled, unrevoked devices named by the target's devices, groups or tags, sorted by id."""
    names, groups, tags = set(target.get("devices", [])), set(target.get("groups", [])), set(target.get("tags", []))
    return sorted((d for d in db.exec(select(Device).where(Device.revoked == False))  # noqa: E712 - SQL comparison
                   if d.id in names or groups.intersection(d.groups) or tags.intersection(d.tags)),
                  key=lambda d: d.id)


def resolve_target(db: Session, target: dict[str, Any]) -> tuple[str, ...]:
    """Ids of :func:`target_devices`."""
    return tuple(d.id for d in target_devices(db, target))


def _metrics(db: Session, ids: list[str], since: float, *, manifest: str | None = None,
             other_than: str | None = None) -> Metrics:
    if not ids:
        return Metrics()
    since_dt = datetime.fromtimestamp(since, tz=timezone.utc)
    q = select(func.coalesce(func.sum(TelemetryRow.requests), 0), func.coalesce(func.sum(TelemetryRow.errors), 0),
               func.sum(col(TelemetryRow.p95_ms) * col(TelemetryRow.requests)),
               func.sum(TelemetryRow.requests).filter(col(TelemetryRow.p95_ms).is_not(None))).where(
        col(TelemetryRow.device_id).in_(ids), TelemetryRow.received_at >= since_dt)
    drifted_sum = func.coalesce(func.sum(case((col(DriftReportRow.drifted), 1), else_=0)), 0)
    d = select(func.count(), drifted_sum).where(  # decided windows only: one too small to decide is no evidence
        DriftReportRow.scope == "device", col(DriftReportRow.device_id).in_(ids),
        DriftReportRow.computed_at >= since_dt, col(DriftReportRow.insufficient).is_not(True))
    if manifest is not None:
        q = q.where(TelemetryRow.manifest_sha256 == manifest)
        d = d.where(DriftReportRow.manifest_sha256 == manifest)
    if other_than is not None:
        q = q.where(col(TelemetryRow.manifest_sha256).is_not(None), TelemetryRow.manifest_sha256 != other_than)
        d = d.where(DriftReportRow.manifest_sha256 != other_than)
    requests, errors, p95_weighted, p95_requests = db.exec(q).one()
    windows, drifted = db.exec(d).one()
    p95 = float(p95_weighted) / float(p95_requests) if p95_weighted is not None and p95_requests else None
    outputs = [report.get("output") for report in db.exec(select(DriftReportRow.report).where(d.whereclause))] \
        if windows and d.whereclause is not None else []
    scored = [o for o in outputs if isinstance(o, dict) and o.get("n")]
    return Metrics(requests=int(requests), errors=int(errors), p95_ms=p95, drift_windows=int(windows),
                   drifted_windows=int(drifted), output_windows=len(scored),
                   output_drifted=sum(1 for o in scored if o.get("p_value", 1.0) < OUTPUT_ALPHA))


def _busy_elsewhere(db: Session, row: Rollout) -> set[str]:
    """Devices another active rollout is moving (assigned, installed, failed or reverting there)."""
    active = [s.value for s in ACTIVE]
    return set(db.exec(select(RolloutDevice.device_id).where(
        RolloutDevice.rollout_id == Rollout.id, Rollout.id != row.id, col(Rollout.state).in_(active),
        col(RolloutDevice.state).in_(sorted(s.value for s in MOVING)))))


def _prior_baseline(db: Session, row: Rollout) -> Baseline | None:
    """The fleet baseline as last measured for a wave of this rollout (from its recorded gate numbers)."""
    rates: dict[str, Any] = {}
    wave = None
    for g in db.exec(select(GateEvaluation).where(GateEvaluation.rollout_id == row.id)
                     .order_by(col(GateEvaluation.id).desc())):
        if g.numbers.get("baseline") != "fleet" or g.gate in rates:
            continue
        wave = g.wave if wave is None else wave
        rates[g.gate] = g.numbers
    if "error_rate" not in rates:
        return None
    return Baseline(rates["error_rate"].get("baseline_error_rate"), rates.get("latency", {}).get("baseline_p95_ms"),
                    rates.get("drift", {}).get("baseline_share"), f"wave {(wave or 0) + 1}",
                    rates.get("predictions", {}).get("baseline_share"))


def _profile_budget(db: Session, ids: list[str]) -> float | None:
    """The strictest hardware-profile p95 budget among these devices (unknown profiles have none)."""
    from hardware.profiles import ProfileError, load

    budgets = []
    for profile in set(db.exec(select(Device.profile).where(col(Device.id).in_(ids)))) if ids else ():
        try:
            budgets.append(load(profile).latency_budget_ms)
        except ProfileError:
            continue
    return min(budgets) if budgets else None


def _unregistered(db: Session, view: RolloutView) -> frozenset[str]:
    """The versions the rollout's devices ran before that the registry no longer holds."""
    previous = {a.previous_manifest for a in view.assignments.values() if a.previous_manifest is not None}
    if not previous:
        return frozenset()
    known = set(db.exec(select(ModelVersion.manifest_sha256).where(col(ModelVersion.manifest_sha256).in_(previous))))
    return frozenset(previous - known)


def observe(db: Session, row: Rollout, view: RolloutView, production_groups: set[str] | None = None
            ) -> Observation:
    """What the planner may look at: the target now, its devices, and the health of both versions.

    The target leaves out devices another active rollout is moving, and, for a rollout not marked
    production, devices that joined a production group since it started.
    """
    busy = _busy_elsewhere(db, row)
    keep = [d for d in target_devices(db, row.target) if d.id not in busy or d.id in view.assignments]
    if not row.production and production_groups:
        keep = [d for d in keep if not production_groups.intersection(d.groups) or d.id in view.assignments]
    target = tuple(d.id for d in keep)
    ids = set(target) | set(view.assignments)
    rows = db.exec(select(Device).where(col(Device.id).in_(ids))).all()
    devices = {d.id: DeviceView(d.id, is_online(d.status, d.last_seen), d.running_manifest, d.running_artifact,
                                d.install_step, d.install_error, d.desired_manifest)
               for d in rows}
    unregistered = _unregistered(db, view)
    version = db.get(ModelVersion, row.version_id)
    signed = decode_model(SignedManifest, version.signed_manifest) if version is not None else None
    for d in rows:  # the artifact policy's verdict for each device still to be assigned
        if signed is not None and d.id not in view.assignments:
            choice = choose(signed.manifest, d.profile, runtimes_of(d.fingerprint), row.artifact)
            devices[d.id] = replace(devices[d.id], runtimes_known=choice.outcome is not Outcome.WAITING,
                                    unsuitable=choice.reason if choice.outcome is Outcome.UNSUITABLE else None)
    start = soak_start(view)
    if start is None:
        return Observation(target, devices, unregistered=unregistered)
    new_ids = [d for d, a in view.assignments.items() if a.state == AssignmentState.INSTALLED]
    base_ids = [d for d in target if d not in view.assignments]
    new = _metrics(db, new_ids, start, manifest=view.manifest)
    baseline = _metrics(db, base_ids, start, other_than=view.manifest) if base_ids else None
    return Observation(target, devices, new, baseline, _prior_baseline(db, row),
                       _profile_budget(db, new_ids), unregistered)


# -- applying a plan ------------------------------------------------------------------------------


def _apply(db: Session, registry: Registry, bus: Bus | None, row: Rollout, result: Plan,
           actor: str) -> None:
    view = result.rollout
    version = db.get(ModelVersion, row.version_id)
    assert version is not None  # noqa: S101 - checked by rollout_view
    signed = registry.signed_manifest(db, version.manifest_sha256)
    with db.no_autoflush:  # no row is written (and locked) while the broker is being waited on
        for action in result.actions:
            device = db.get(Device, action.device_id)
            if device is None or bus is None:
                continue
            if isinstance(action, Assign) and signed is not None:
                registry.assign(db, bus, device, signed, row.artifact, rollout=row.name)
            elif isinstance(action, Revert) and action.manifest is not None:
                previous = registry.signed_manifest(db, action.manifest)
                if previous is None:  # unregistered since it was observed: left as it is, revert_failed in time
                    log.warning("rollout %s: %s ran %s before, which is no longer registered; left as it is",
                                row.name, device.id, action.manifest[:12])
                elif action.artifact in {a.name for a in previous.manifest.artifacts}:  # what it ran: it loads
                    registry.set_desired(db, bus, device, previous, action.artifact, rollout=row.name)
                else:
                    registry.assign(db, bus, device, previous, rollout=row.name)
    store_view(db, row, view)
    for g in result.gates:
        last = db.exec(select(GateEvaluation).where(GateEvaluation.rollout_id == row.id, GateEvaluation.wave == g.wave,
                                                    GateEvaluation.gate == g.gate)
                       .order_by(col(GateEvaluation.id).desc())).first()
        decided = any(e[0] in ("rollout.wave_passed", "rollout.wave_failed") for e in result.events)
        if last is not None and last.verdict == g.verdict and not decided:  # still waiting: refresh, don't pile up
            last.numbers, last.at = _jsonable(g.numbers), datetime.now(timezone.utc)
            db.add(last)
        else:
            db.add(GateEvaluation(rollout_id=row.id, wave=g.wave, gate=g.gate, verdict=g.verdict,
                                  numbers=_jsonable(g.numbers)))
    for action_name, detail in result.events:
        audit.append(db, actor, action_name, f"rollout:{row.name}", _jsonable(detail))
    if result.deployed:  # completed: the groups it targeted track its version from now on (server/groups.py)
        for group in sorted(set(row.target.get("groups", []))):
            record_release(db, group, version, actor, f"rollout:{row.name}")
    if result.deployed and version.stage == Stage.APPROVED.value:  # a draft tried out in the lab stays a draft
        mark_deployed(db, version, actor, rollout=row.name, commit=False)  # committed with the step, under its lease


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


class _LeaseBusy(Exception):
    pass


def _under_lease(registry: Registry, rollout_name: str, holder: str, wait: float,
                 fn: Callable[[Session, Rollout], None]) -> None:
    lease = f"rollout:{rollout_name}"
    deadline = time.monotonic() + wait
    while not leases.acquire(registry.engine, lease, holder, _LEASE_TTL):
        if time.monotonic() >= deadline:
            raise _LeaseBusy(f"rollout {rollout_name} is being changed by {leases.holder_of(registry.engine, lease)}")
        time.sleep(0.1)
    try:
        with Session(registry.engine) as db, audit.unit_of_work(db, registry.data):
            row = db.exec(select(Rollout).where(Rollout.name == rollout_name)).first()
            if row is None:
                raise RolloutError(f"no rollout named {rollout_name}")
            fn(db, row)
            if not leases.still_held(db.connection(), lease, holder, _LEASE_TTL):
                # it expired mid-step and someone else may have acted: rolled back, this step never happened
                raise _LeaseBusy(f"rollout {rollout_name}: the lease expired during the step; it was not applied")
    finally:
        leases.release(registry.engine, lease, holder)


# -- operator entry points --------------------------------------------------------------------------


def create_rollout(registry: Registry, *, name: str, model: str, version: str, target: dict[str, list[str]],
                   spec: RolloutSpec, actor: str, production: bool = False, artifact: str | None = None) -> Rollout:
    """Record a new rollout (state pending); the orchestrator starts it on its next step.

    The caller has checked the actor's role and the governance rules (server/governance.py).
    """
    if not is_device_id(name):
        raise RolloutError(f"rollout name {name!r}: a-z, 0-9 and '-', at most 63 characters")
    if not any(target.get(k) for k in ("devices", "groups", "tags")):
        raise RolloutError("give a target: --group, --tag or --device")
    try:
        row_version, signed = registry.model(model, version)
        check_artifact(signed, artifact)
    except RegistryError as exc:
        raise RolloutError(str(exc)) from None
    if row_version.stage == "retired":
        raise RolloutError(f"{model}:{version} is retired")
    with Session(registry.engine) as db:
        with audit.unit_of_work(db, registry.data):
            if db.exec(select(Rollout).where(Rollout.name == name)).first() is not None:
                raise RolloutError(f"a rollout named {name} exists; choose another name")
            clash = [r.name for r in db.exec(select(Rollout).where(col(Rollout.state).in_([s.value for s in ACTIVE])))
                     if set(resolve_target(db, r.target)) & set(resolve_target(db, target))]
            if clash:
                raise RolloutError(f"rollout {', '.join(clash)} is still active on some of these devices; "
                                   "let it finish, or abort it first")
            row = Rollout(name=name, version_id=row_version.id, artifact=artifact,
                          target={k: sorted(set(v)) for k, v in target.items() if v}, production=production,
                          spec=spec.model_dump(mode="json"), created_by=actor)
            db.add(row)
            db.flush()
            audit.append(db, actor, "rollout.create", f"rollout:{name}", {
                "model": model, "version": version, "target": row.target, "production": production,
                "spec": row.spec, "devices_now": len(resolve_target(db, target))})
        db.refresh(row)
        return row


def command_rollout(registry: Registry, name: str, command: RolloutCommand | str, actor: str, reason: str | None = None,
                    clock: Callable[[], float] = time.time) -> RolloutView:
    """Pause, resume, abort or roll back a rollout now (under its lease); RolloutError when not allowed."""
    out: list[RolloutView] = []

    def act(db: Session, row: Rollout) -> None:
        view = rollout_view(db, row)
        # a rollback leaves alone the devices moved on since: the planner needs to see where each one is now
        obs = observe(db, row, view) if command == RolloutCommand.ROLLBACK else None
        try:
            result = apply_command(view, command, clock(), reason, obs)
        except ValueError as exc:
            raise RolloutError(f"rollout {name}: {exc}") from None
        bus = registry.client() if result.actions else None
        try:
            _apply(db, registry, bus, row, result, actor)
        finally:
            if bus is not None:
                bus.close()
        out.append(result.rollout)

    try:
        _under_lease(registry, name, f"cli-{uuid.uuid4().hex[:8]}", 30.0, act)
    except _LeaseBusy as exc:
        raise RolloutError(str(exc)) from None
    return out[0]


def start_governed(registry: Registry, governance: Governance, actor: str, *, name: str, model: str,
                   target: dict[str, list[str]], spec: RolloutSpec, production: bool = False,
                   artifact: str | None = None) -> Rollout:
    """:func:`create_rollout` as an operator asks for it (CLI and TUI): their role must allow it, and the version
    must be fit for the target, which is production when ``production`` says so, when it names a production
    group, or when it reaches a device in one (by tag or name). GovernanceError or RolloutError otherwise."""
    governance.require(actor, Permission.START_ROLLOUT)
    with Session(registry.engine) as db:
        version = find_version(db, model)  # GovernanceError unless NAME:VERSION of a registered version
        model_name, version_name = version.name, version.version
        reached = {g for d in target_devices(db, target) for g in d.groups}
        production = production or governance.is_production(sorted(reached | set(target.get("groups", []))))
        check_rollout(db, version, production=production)
    return create_rollout(registry, name=name, model=model_name, version=version_name, target=target, spec=spec,
                          actor=actor, production=production, artifact=artifact)


def command_governed(registry: Registry, governance: Governance, actor: str, name: str,
                     command: RolloutCommand | str, reason: str | None = None) -> RolloutView:
    """:func:`command_rollout` as an operator asks for it: their role must allow that command."""
    try:
        known = RolloutCommand(command)
    except ValueError:
        raise RolloutError(f"unknown command {command!r} ({', '.join(c.value for c in RolloutCommand)})") from None
    governance.require(actor, COMMANDS[known].permission)
    return command_rollout(registry, name, known, actor, reason)


# -- the loop -----------------------------------------------------------------------------------------


class Orchestrator:
    """Steps every active rollout, each under its lease, every ``interval`` seconds; and with ``agent_rollouts``
    (``server.agent_releases.advance``, which ServerApp passes in: that module builds on this one), the agent
    rollouts too, under one lease."""

    def __init__(self, registry: Registry, *, holder: str | None = None, interval: float = 2.0,
                 clock: Callable[[], float] = time.time,
                 agent_rollouts: Callable[[Registry], int] | None = None) -> None:
        self.registry, self.interval, self.clock = registry, interval, clock
        self.agent_rollouts = agent_rollouts
        self.holder = holder or f"server-{uuid.uuid4().hex[:8]}"
        self.steps = 0
        self._bus: Bus | None = None

    def _mqtt(self) -> Bus:
        if self._bus is None or not self._bus.is_connected():
            self.close()
            self._bus = self.registry.client(client_id=f"edgeherd-orchestrator-{uuid.uuid4().hex[:8]}")
        return self._bus

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def _production_groups(self) -> set[str]:
        from server.governance import GovernanceError

        try:
            return set(Governance.load(self.registry.data, self.registry.engine).config.production_groups)
        except GovernanceError as exc:  # a broken operators.toml: nothing is production-guarded; say so
            log.error("operators.toml: %s", exc)
            return set()

    def step(self) -> int:
        """One pass over the active rollouts; how many this replica stepped."""
        with Session(self.registry.engine) as db:
            names = list(db.exec(select(Rollout.name).where(col(Rollout.state).in_([s.value for s in ACTIVE]))
                                 .order_by(col(Rollout.id))))
        done = 0
        for name in names:
            try:
                _under_lease(self.registry, name, self.holder, 0.0, self._step_one)
                done += 1
            except _LeaseBusy:
                log.debug("rollout %s is held by another replica", name)
            except Exception:
                log.exception("rollout %s: step failed; it is retried on the next pass", name)
        done += self._step_agent_rollouts()
        self.steps += 1
        return done

    def _step_agent_rollouts(self) -> int:
        """Move agent-release rollouts on (server/agent_releases.py), one replica at a time: the one holding the
        "agent-rollouts" lease for this pass."""
        if self.agent_rollouts is None:
            return 0
        if not leases.acquire(self.registry.engine, "agent-rollouts", self.holder, max(30.0, 3 * self.interval)):
            return 0
        try:
            return self.agent_rollouts(self.registry)
        except Exception:
            log.exception("agent rollouts: step failed; retried on the next pass")
            return 0

    def _step_one(self, db: Session, row: Rollout) -> None:
        view = rollout_view(db, row)
        if view.state not in ACTIVE:
            return
        result = plan(view, observe(db, row, view, self._production_groups()), self.clock())
        _apply(db, self.registry, self._mqtt() if result.actions else None, row, result, ORCHESTRATOR)
        for action, detail in result.events:
            log.info("rollout %s: %s %s", row.name, action, {k: v for k, v in detail.items() if k != "gates"})

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.step()
        self.close()


def describe(view: RolloutView) -> dict[str, Any]:
    """A plain summary of a rollout's state, for the CLI and the TUI."""
    waves: dict[int, dict[str, int]] = {}
    for a in view.assignments.values():
        w, state = waves.setdefault(a.wave, {}), AssignmentState(a.state).value
        w[state] = w.get(state, 0) + 1
    return {"name": view.name, "state": view.state.value, "wave": view.wave, "reason": view.reason,
            "waves": {k: waves[k] for k in sorted(waves)}, "spec": view.spec.model_dump(mode="json"),
            "devices": {d: asdict(a) | {"state": AssignmentState(a.state).value}
                        for d, a in sorted(view.assignments.items())}}
