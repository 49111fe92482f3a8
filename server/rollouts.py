"""The rollout planner: (rollout, observations, clock) → (new rollout state, actions). Pure.

A rollout moves a model version onto a target (groups, tags or devices,
resolved again on every step, so devices joining the target mid-rollout get
it) in waves. Each step the orchestrator (server/orchestrator.py) loads the
rollout and what the fleet reports, calls :func:`plan`, and applies the
result in one transaction; nothing here touches a clock, a socket or the
database, so every decision is a table-driven test.

States::

    pending → running ⇄ paused
    running → completed                  (every wave passed its gates)
    running/paused/completed → rolling_back → rolled_back
    pending/running/paused → aborted     (devices keep what they run)

A wave's devices get the new version; once every one of them has installed
it (or failed, or timed out), the wave soaks for ``soak_s`` and then the
gates compare the new version's devices with the devices still on the old
version over the soak (or with the manifest's numbers when there is no
baseline). Not enough data keeps the wave soaking, up to
``max_soak_factor`` × the soak, after which the gate fails. A failed gate
or more failed installs than ``failure_threshold_pct`` of the wave pauses
the rollout or rolls back every device it changed (``on_failure``). When
the last wave passes, the plan says the version is deployed
(:attr:`Plan.deployed`).

A device of the rollout (:class:`AssignmentState`)::

    assigned → installed                 (it runs the version)
    assigned → failed → installed        (it reported a failed install, or timed out; it may recover)
    assigned → left                      (it left the target before it installed)
    assigned/installed/failed → reverting → reverted | revert_failed
    assigned/installed/failed → superseded  (at the rollback: moved to another version since, or what it ran
                                             before is no longer registered; left where it is)

Operators act by :class:`RolloutCommand` (:func:`apply_command`); the
states each applies in and the permission it needs are one table,
:data:`COMMANDS`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.permissions import Permission
from server.rollout_gates import Baseline, GateResult, Gates, Metrics, judge

__all__ = [
    "ACTIVE",
    "COMMANDS",
    "TERMINAL",
    "Assign",
    "Assignment",
    "AssignmentState",
    "Baseline",
    "CommandRule",
    "DeviceView",
    "GateResult",
    "Gates",
    "Metrics",
    "Observation",
    "Plan",
    "Revert",
    "RolloutCommand",
    "RolloutSpec",
    "RolloutView",
    "State",
    "apply_command",
    "evaluate_gates",
    "plan",
    "soak_start",
    "wave_sizes",
]


class State(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


ACTIVE = frozenset({State.PENDING, State.RUNNING, State.PAUSED, State.ROLLING_BACK})
TERMINAL = frozenset({State.COMPLETED, State.ROLLED_BACK, State.ABORTED})


class AssignmentState(str, Enum):
    """Where a device of a rollout is (drawn above); the values are what the database and the API hold."""

    ASSIGNED = "assigned"
    INSTALLED = "installed"
    FAILED = "failed"
    LEFT = "left"
    REVERTING = "reverting"
    REVERTED = "reverted"
    REVERT_FAILED = "revert_failed"
    SUPERSEDED = "superseded"

    def __str__(self) -> str:  # as stored and shown, also in f-strings
        return self.value


#: Devices a rollout is still moving: another rollout leaves them alone.
MOVING = frozenset({AssignmentState.ASSIGNED, AssignmentState.INSTALLED, AssignmentState.FAILED,
                    AssignmentState.REVERTING})
#: Devices a rollback puts back on what they ran before.
_CHANGED = frozenset({AssignmentState.ASSIGNED, AssignmentState.INSTALLED, AssignmentState.FAILED})


class RolloutCommand(str, Enum):
    """What an operator may tell a rollout to do; the value is the CLI command and the API path segment."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"

    def __str__(self) -> str:  # as typed and shown, also in f-strings and URLs
        return self.value


@dataclass(frozen=True)
class CommandRule:
    """When an operator may give a command: the states of the rollout it applies in, and the permission it needs."""

    states: frozenset[State]
    permission: Permission


#: Every operator command, what it applies to and who may give it: the one table the CLI, the API and the TUIs use.
COMMANDS: dict[RolloutCommand, CommandRule] = {
    RolloutCommand.PAUSE: CommandRule(frozenset({State.PENDING, State.RUNNING}), Permission.PAUSE_ROLLOUT),
    RolloutCommand.RESUME: CommandRule(frozenset({State.PAUSED}), Permission.RESUME_ROLLOUT),
    RolloutCommand.ABORT: CommandRule(frozenset({State.PENDING, State.RUNNING, State.PAUSED}),
                                      Permission.ABORT_ROLLOUT),
    RolloutCommand.ROLLBACK: CommandRule(frozenset({State.PENDING, State.RUNNING, State.PAUSED, State.COMPLETED}),
                                         Permission.ROLLBACK_ROLLOUT),
}

#: However short the soak, a wave short of data waits at least this long for it before its gates fail.
MIN_DATA_WAIT_S = 60.0
_WAVE_RE = re.compile(r"^(?:[1-9][0-9]{0,6}|(?:100|[1-9]?[0-9](?:\.[0-9]+)?)%)$")


class RolloutSpec(BaseModel):
    """How a rollout proceeds; stored with it as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["canary", "all-at-once"] = "canary"
    #: Cumulative wave sizes: device counts ("1") or shares of the target ("10%"); the last is always 100 %.
    waves: tuple[str, ...] = ("1", "10%", "50%", "100%")
    soak_s: float = Field(300.0, ge=0, le=30 * 86400)
    install_timeout_s: float = Field(900.0, gt=0, le=7 * 86400)
    #: Share of a wave's devices (percent) that may fail to install before the rollout stops.
    failure_threshold_pct: float = Field(0.0, ge=0, le=100)
    on_failure: Literal["pause", "rollback"] = "rollback"
    #: A gate with not enough data waits up to this many soaks, then fails.
    max_soak_factor: float = Field(3.0, ge=1, le=100)
    gates: Gates = Gates()

    @field_validator("waves")
    @classmethod
    def _waves(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not 1 <= len(v) <= 20:
            raise ValueError("give 1 to 20 waves")
        for w in v:
            if not _WAVE_RE.match(w):
                raise ValueError(f"wave {w!r}: a device count (e.g. 5) or a percentage (e.g. 10%)")
        return v

    def effective_waves(self) -> tuple[str, ...]:
        return ("100%",) if self.strategy == "all-at-once" else self.waves


def wave_sizes(waves: tuple[str, ...], n: int) -> list[int]:
    """Cumulative device counts per wave for a target of ``n`` devices.

    Percentages round up, every wave adds at least one device while any are
    left (so 10 % of a 7-device fleet after a 1-device canary is 2), waves
    after the whole target is reached are dropped, and the last wave always
    takes the whole target.
    """
    if n <= 0:
        return [0]
    out: list[int] = []
    for w in waves:
        size = math.ceil(n * float(w[:-1]) / 100 - 1e-9) if w.endswith("%") else int(w)
        size = min(max(size, (out[-1] + 1) if out else 1), n)
        if not out or size > out[-1]:
            out.append(size)
    if out[-1] < n:
        out.append(n)
    return out


@dataclass(frozen=True)
class DeviceView:
    """What the server knows about a device right now."""

    id: str
    online: bool
    running_manifest: str | None
    running_artifact: str | None = None
    install_step: str | None = None
    install_error: str | None = None
    desired_manifest: str | None = None
    #: Whether the device has reported its runtimes (its hello): until then no artifact can be chosen for it,
    #: and it is assigned only when no device that has reported is left to take its place.
    runtimes_known: bool = True
    #: Why no artifact of the rollout's bundle suits the device (server/assignment.py), or None.
    unsuitable: str | None = None


@dataclass(frozen=True)
class Assignment:
    """A device of the rollout."""

    device_id: str
    wave: int
    state: AssignmentState
    previous_manifest: str | None
    previous_artifact: str | None
    assigned_at: float
    finished_at: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Observation:
    """Everything the planner may look at besides the rollout itself."""

    #: Device ids in the target now (revoked devices excluded), in a stable order.
    target: tuple[str, ...]
    devices: dict[str, DeviceView]
    #: The new version's devices over the current soak, and the devices on other versions (None: no baseline).
    new: Metrics = field(default_factory=Metrics)
    baseline: Metrics | None = None
    #: The baseline as measured for an earlier wave of this rollout: used once no device is left on the old
    #: version (the last wave), so that wave is judged against the same fleet as the others.
    prior: Baseline | None = None
    #: The strictest p95 budget of the new version's devices' hardware profiles (when the rollout sets none).
    profile_budget_ms: float | None = None
    #: Of the versions the rollout's devices ran before it, those no longer registered: a rollback cannot put a
    #: device back on one.
    unregistered: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RolloutView:
    name: str
    state: State
    wave: int
    wave_started_at: float | None
    spec: RolloutSpec
    manifest: str
    artifact: str | None
    assignments: dict[str, Assignment] = field(default_factory=dict)
    reason: str | None = None


@dataclass(frozen=True)
class Assign:
    """Set the device's desired state to the rollout's version; remember what it ran."""

    device_id: str
    wave: int


@dataclass(frozen=True)
class Revert:
    """Set the device's desired state back to what it ran before the rollout."""

    device_id: str
    manifest: str | None
    artifact: str | None


@dataclass(frozen=True)
class Plan:
    rollout: RolloutView
    actions: list[Assign | Revert] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)
    #: Audit-worthy happenings: (action, detail).
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: The rollout has just completed: its version is now deployed (server/governance.py ``mark_deployed``, for a
    #: version that was approved).
    deployed: bool = False


# -- gates ------------------------------------------------------------------------------------------


def evaluate_gates(spec: RolloutSpec, obs: Observation) -> list[GateResult]:
    """The gates of server/rollout_gates.py for the new version's devices against the baseline: the target's
    devices still on other versions when they sent enough requests; else the baseline measured for an earlier wave;
    else none (error rate and drift compared with zero, latency with the budget only)."""
    return judge(spec.gates, obs.new, obs.baseline, obs.prior, obs.profile_budget_ms)


# -- planning ---------------------------------------------------------------------------------------


def soak_start(view: RolloutView) -> float | None:
    """When the current wave's soak began: its last device finished installing (None: not yet)."""
    wave = [a for a in view.assignments.values() if a.wave == view.wave and a.state != AssignmentState.LEFT]
    if not wave or any(a.state == AssignmentState.ASSIGNED for a in wave):
        return None
    return max([a.finished_at or 0.0 for a in wave] + [view.wave_started_at or 0.0])


Events = list[tuple[str, dict[str, Any]]]


#: Install steps (agent/install.py) after which a device reverting to its previous version has settled there.
_SETTLED = (None, "done", "failed", "reverted")


def _refresh(view: RolloutView, obs: Observation, now: float) -> tuple[dict[str, Assignment], Events]:
    """Move each device on by what it reports."""
    out = dict(view.assignments)
    events: Events = []
    timeout = view.spec.install_timeout_s
    target = set(obs.target)
    for did, a in view.assignments.items():
        d = obs.devices.get(did)
        runs_it = d is not None and d.running_manifest == view.manifest and d.install_step in (None, "done")
        match a.state:
            case AssignmentState.ASSIGNED:
                if runs_it:
                    out[did] = replace(a, state=AssignmentState.INSTALLED, finished_at=now)
                elif did not in target:  # revoked, or moved out of the target before it installed: not a failure
                    out[did] = replace(a, state=AssignmentState.LEFT, finished_at=now)
                    events.append(("rollout.device_left", {"device": did}))
                elif (d is not None and d.desired_manifest == view.manifest
                      and d.install_step in ("failed", "reverted") and d.running_manifest != view.manifest):
                    out[did] = replace(a, state=AssignmentState.FAILED, finished_at=now,
                                       error=d.install_error or d.install_step)
                    events.append(("rollout.device_failed", {"device": did, "error": out[did].error}))
                elif now - a.assigned_at > timeout:
                    why = "install timed out" + ("" if d is not None and d.online else " (device offline)")
                    out[did] = replace(a, state=AssignmentState.FAILED, finished_at=now, error=why)
                    events.append(("rollout.device_failed", {"device": did, "error": why}))
            case AssignmentState.FAILED if runs_it:  # it came back and installed after all
                out[did] = replace(a, state=AssignmentState.INSTALLED, finished_at=now, error=None)
                events.append(("rollout.device_recovered", {"device": did}))
            case AssignmentState.REVERTING:
                back = d is not None and d.running_manifest == a.previous_manifest and d.install_step in _SETTLED
                if a.previous_manifest is None or back:
                    out[did] = replace(a, state=AssignmentState.REVERTED, finished_at=now)
                elif now - (a.finished_at or a.assigned_at) > timeout:
                    out[did] = replace(a, state=AssignmentState.REVERT_FAILED, finished_at=now,
                                       error="rollback timed out")
                    events.append(("rollout.device_revert_failed", {"device": did}))
    return out, events


def _superseded(view: RolloutView, a: Assignment, obs: Observation | None) -> bool:
    """Whether a rollback leaves the device where it is: since the rollout moved it, another deploy or rollout
    has set it to a third version (one set back to what it ran before is on its way there: reverted as the
    others), or the version it ran before is no longer registered."""
    if obs is None or a.previous_manifest is None:
        return False
    d = obs.devices.get(a.device_id)
    if d is None:
        return False
    moved_on = d.desired_manifest not in (None, view.manifest, a.previous_manifest)
    return moved_on or a.previous_manifest in obs.unregistered


def _start_rollback(view: RolloutView, assignments: dict[str, Assignment], now: float, reason: str,
                    events: Events, obs: Observation | None) -> Plan:
    actions: list[Assign | Revert] = []
    out = dict(assignments)
    skipped: list[str] = []
    for did, a in sorted(assignments.items()):
        if a.state not in _CHANGED:
            continue
        if _superseded(view, a, obs):
            out[did] = replace(a, state=AssignmentState.SUPERSEDED, finished_at=now,
                               error="moved to another version since")
            skipped.append(did)
            continue
        actions.append(Revert(did, a.previous_manifest, a.previous_artifact))
        out[did] = replace(a, state=AssignmentState.REVERTING, finished_at=now)
    events.append(("rollout.rollback_started", {"reason": reason, "devices": len(actions) + len(skipped)}))
    if skipped:
        events.append(("rollout.revert_skipped", {"devices": skipped,
                                                  "why": "desired state changed since this rollout"}))
    view = replace(view, state=State.ROLLING_BACK, assignments=out, reason=reason)
    return Plan(view, actions, [], events)


def _fail(view: RolloutView, obs: Observation, assignments: dict[str, Assignment], now: float, reason: str,
          events: Events, gates: list[GateResult]) -> Plan:
    events.append(("rollout.wave_failed", {"wave": view.wave, "reason": reason,
                                           "gates": [{"gate": g.gate, "verdict": g.verdict, **g.numbers}
                                                     for g in gates]}))
    if view.spec.on_failure == "rollback":
        p = _start_rollback(view, assignments, now, reason, events, obs)
        return Plan(p.rollout, p.actions, gates, p.events)
    events.append(("rollout.paused", {"reason": reason, "by": "gate"}))
    return Plan(replace(view, state=State.PAUSED, assignments=assignments, reason=reason), [], gates, events)


def _assign(view: RolloutView, obs: Observation, assignments: dict[str, Assignment], now: float,
            wave: int) -> tuple[dict[str, Assignment], list[Assign | Revert], Events]:
    """Assign target devices until the wave's cumulative size is reached.

    Devices an artifact can be chosen for come first (online before offline), then devices that have not
    reported their runtimes yet (they get the bundle when they do), last those no artifact of the bundle
    suits: such a device fails at once, with the reason, and nothing is sent to it.
    """
    sizes = wave_sizes(view.spec.effective_waves(), len(obs.target))
    want = sizes[min(wave, len(sizes) - 1)]
    have = sum(1 for did in obs.target if did in assignments)
    fresh = [did for did in obs.target if did not in assignments]

    def rank(did: str) -> tuple[bool, bool, bool, str]:
        d = obs.devices.get(did)
        if d is None:
            return True, True, True, did
        return d.unsuitable is not None, not d.runtimes_known, not d.online, did

    fresh.sort(key=rank)
    out = dict(assignments)
    actions: list[Assign | Revert] = []
    events: Events = []
    for did in fresh[: max(want - have, 0)]:
        d = obs.devices.get(did)
        a = Assignment(did, wave, AssignmentState.ASSIGNED, d.running_manifest if d else None,
                       d.running_artifact if d else None, now)
        if d is not None and d.unsuitable is not None:
            out[did] = replace(a, state=AssignmentState.FAILED, finished_at=now, error=d.unsuitable)
            events.append(("rollout.device_failed", {"device": did, "error": d.unsuitable}))
            continue
        out[did] = a
        actions.append(Assign(did, wave))
    return out, actions, events


def plan(view: RolloutView, obs: Observation, now: float) -> Plan:
    """One step of the rollout at time ``now`` (epoch seconds)."""
    if view.state in TERMINAL:
        return Plan(view)
    assignments, events = _refresh(view, obs, now)
    if view.state is State.ROLLING_BACK:
        if any(a.state == AssignmentState.REVERTING for a in assignments.values()):
            return Plan(replace(view, assignments=assignments), [], [], events)
        stuck = sorted(d for d, a in assignments.items() if a.state == AssignmentState.REVERT_FAILED)
        events.append(("rollout.rolled_back", {"revert_failed": stuck}))
        return Plan(replace(view, state=State.ROLLED_BACK, assignments=assignments), [], [], events)
    if view.state is State.PAUSED:
        return Plan(replace(view, assignments=assignments), [], [], events)
    if view.state is State.PENDING:
        view = replace(view, state=State.RUNNING, wave=0, wave_started_at=now)
        assignments, actions, failed_now = _assign(view, obs, assignments, now, 0)
        events.append(("rollout.started", {"waves": wave_sizes(view.spec.effective_waves(), len(obs.target)),
                                           "target": len(obs.target)}))
        events.append(("rollout.wave_started", {"wave": 0, "devices": [a.device_id for a in actions
                                                                        if isinstance(a, Assign)]}))
        events += failed_now
    else:  # keep the current wave filled: devices joining the target mid-rollout get the version too
        assignments, actions, failed_now = _assign(view, obs, assignments, now, view.wave)
        if actions:
            events.append(("rollout.devices_joined", {"wave": view.wave, "devices": [
                a.device_id for a in actions if isinstance(a, Assign)]}))
        events += failed_now
    current = replace(view, assignments=assignments)
    wave = [a for a in assignments.values() if a.wave == view.wave and a.state != AssignmentState.LEFT]
    if not wave:
        if obs.target:  # the target shrank: earlier waves already cover this one's size
            return _advance(current, obs, now, actions, events, [])
        return Plan(current, actions, [], events)
    failed = [a for a in wave if a.state == AssignmentState.FAILED]
    installed = [a for a in wave if a.state == AssignmentState.INSTALLED]
    install_gate = GateResult("installed", "pass", {
        "wave_devices": len(wave), "installed": len(installed), "failed": len(failed),
        "threshold_pct": view.spec.failure_threshold_pct}, view.wave)
    if len(failed) * 100 > view.spec.failure_threshold_pct * len(wave):
        # more failures than the threshold allows: more successes cannot undo that, so stop now
        reason = (f"wave {view.wave}: {len(failed)} of {len(wave)} devices failed to install "
                  f"(threshold {view.spec.failure_threshold_pct:g} %)")
        return _fail(current, obs, assignments, now, reason, events, [replace(install_gate, verdict="fail")])
    start = soak_start(current)
    if start is None or now - start < view.spec.soak_s:
        return Plan(current, actions, [], events)
    gates = [install_gate, *(replace(g, wave=view.wave) for g in evaluate_gates(view.spec, obs))]
    bad = [g for g in gates if g.verdict == "fail"]
    if bad:
        reason = f"wave {view.wave}: gate {', '.join(g.gate for g in bad)} failed"
        return _fail(current, obs, assignments, now, reason, events, gates)
    if any(g.verdict == "insufficient" for g in gates):
        if now - start < max(view.spec.soak_s * view.spec.max_soak_factor, view.spec.soak_s + MIN_DATA_WAIT_S):
            return Plan(current, actions, gates, events)
        short = [g for g in gates if g.verdict == "insufficient"]
        reason = f"wave {view.wave}: not enough data for {', '.join(g.gate for g in short)} after the longest soak"
        return _fail(current, obs, assignments, now, reason,
                     events, [replace(g, verdict="fail") if g.verdict == "insufficient" else g for g in gates])
    return _advance(current, obs, now, actions, events, gates)


def _advance(view: RolloutView, obs: Observation, now: float, actions: list[Assign | Revert],
             events: Events, gates: list[GateResult]) -> Plan:
    sizes = wave_sizes(view.spec.effective_waves(), len(obs.target))
    events.append(("rollout.wave_passed", {"wave": view.wave,
                                           "gates": [{"gate": g.gate, "verdict": g.verdict, **g.numbers}
                                                     for g in gates]}))
    if view.wave + 1 >= len(sizes):
        events.append(("rollout.completed", {"devices": len(view.assignments)}))
        return Plan(replace(view, state=State.COMPLETED, reason=None), actions, gates, events, deployed=True)
    nxt = replace(view, wave=view.wave + 1, wave_started_at=now)
    assignments, more, failed_now = _assign(nxt, obs, dict(view.assignments), now, nxt.wave)
    events.append(("rollout.wave_started", {"wave": nxt.wave, "devices": [
        a.device_id for a in more if isinstance(a, Assign)]}))
    events += failed_now
    return Plan(replace(nxt, assignments=assignments), actions + more, gates, events)


# -- operator commands ------------------------------------------------------------------------------


def apply_command(view: RolloutView, command: RolloutCommand | str, now: float, reason: str | None = None,
                  obs: Observation | None = None) -> Plan:
    """An operator's pause, resume, abort or rollback; ValueError when the state does not allow it.

    ``obs``: what the fleet reports now; a rollback leaves alone the devices it shows moved on since
    (:class:`AssignmentState` ``superseded``). Without it, a rollback reverts every device the rollout changed.
    """
    try:
        cmd = RolloutCommand(command)
    except ValueError:
        raise ValueError(f"unknown command {command!r} ({', '.join(c.value for c in RolloutCommand)})") from None
    allowed = COMMANDS[cmd].states
    if view.state not in allowed:
        raise ValueError(f"cannot {cmd.value} a rollout that is {view.state.value} "
                         f"(only when {', '.join(sorted(s.value for s in allowed))})")
    why = reason or f"{cmd.value} by an operator"
    match cmd:
        case RolloutCommand.PAUSE:
            return Plan(replace(view, state=State.PAUSED, reason=why), events=[("rollout.paused", {"reason": why})])
        case RolloutCommand.RESUME:
            return _resume(view, now)
        case RolloutCommand.ABORT:
            return Plan(replace(view, state=State.ABORTED, reason=why), events=[("rollout.aborted", {"reason": why})])
        case RolloutCommand.ROLLBACK:
            return _start_rollback(view, dict(view.assignments), now, why, [], obs)


def _resume(view: RolloutView, now: float) -> Plan:
    """The soak starts again (what happened while paused does not count towards it), and the wave's failed devices
    get another try: a fresh desired state and a fresh install timeout."""
    out: dict[str, Assignment] = {}
    retry: list[Assign | Revert] = []
    for d, a in view.assignments.items():
        if a.wave == view.wave and a.state == AssignmentState.FAILED:
            out[d] = replace(a, state=AssignmentState.ASSIGNED, assigned_at=now, finished_at=None, error=None)
            retry.append(Assign(d, a.wave))
        elif a.wave == view.wave and a.state == AssignmentState.INSTALLED:
            out[d] = replace(a, finished_at=now)
        else:
            out[d] = a
    return Plan(replace(view, state=State.RUNNING, reason=None, wave_started_at=now, assignments=out), retry,
                events=[("rollout.resumed", {"wave": view.wave, "retried": [a.device_id for a in retry]})])
