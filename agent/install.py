"""The install state machine, as data.

::

    (VERIFY ─RETRY→ DOWNLOAD when the whole file fails its sha256, at most MAX_ATTEMPTS times)

    IDLE ─START→ PREFLIGHT ─OK→ DOWNLOAD ─OK→ VERIFY ─OK→ INSTALL ─OK→ LOAD ─OK→ SMOKE_TEST ─OK→ SWITCH ─OK→ DONE
                     │             │            │            │          │            │              │
                     └─────────────┴────FAIL────┴────────────┴──────────┴────────────┴──────────────┴──→ FAILED

The record of an install is persisted on entry to each step. After a crash
or power cut the agent reads it back and re-enters the recorded step: every
step is idempotent (the download resumes, the idle slot is rewritten, the
switch is one atomic rename), so the device ends on the new model or, on
failure, keeps serving the old one, which was never switched away from. A
loop guard stops an install that keeps crashing the agent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

from agent.errors import AgentError
from hardware.files import atomic_write
from protocol import InstallStep

__all__ = ["ACTIVE_STEPS", "MAX_ATTEMPTS", "TRANSITIONS", "WIRE_STEPS", "Event", "InstallRecord", "Step", "next_step",
           "wire_step"]

MAX_ATTEMPTS = 3


class Step(str, Enum):
    IDLE = "idle"
    PREFLIGHT = "preflight"
    DOWNLOAD = "download"
    VERIFY = "verify"
    INSTALL = "install"
    LOAD = "load"
    SMOKE_TEST = "smoke_test"
    SWITCH = "switch"
    DONE = "done"
    FAILED = "failed"


class Event(str, Enum):
    START = "start"
    OK = "ok"
    FAIL = "fail"
    RETRY = "retry"  # the downloaded artifact failed its sha256: fetch it again


_PIPELINE = [Step.PREFLIGHT, Step.DOWNLOAD, Step.VERIFY, Step.INSTALL, Step.LOAD, Step.SMOKE_TEST, Step.SWITCH]
ACTIVE_STEPS = frozenset(_PIPELINE)

TRANSITIONS: dict[tuple[Step, Event], Step] = {
    (Step.IDLE, Event.START): Step.PREFLIGHT,
    (Step.DONE, Event.START): Step.PREFLIGHT,
    (Step.FAILED, Event.START): Step.PREFLIGHT,
    **{(a, Event.OK): b for a, b in zip(_PIPELINE, [*_PIPELINE[1:], Step.DONE], strict=True)},
    **{(a, Event.FAIL): Step.FAILED for a in _PIPELINE},
    (Step.VERIFY, Event.RETRY): Step.DOWNLOAD,
}


#: The step the device reports (``DeviceState.install.step``) for each of its own; IDLE is not reported, and
#: FAILED depends on what the device serves (:func:`wire_step`).
WIRE_STEPS: dict[Step, InstallStep] = {
    Step.PREFLIGHT: InstallStep.PREFLIGHT,
    Step.DOWNLOAD: InstallStep.DOWNLOAD,
    Step.VERIFY: InstallStep.VERIFY,
    Step.INSTALL: InstallStep.INSTALL,
    Step.LOAD: InstallStep.LOAD,
    Step.SMOKE_TEST: InstallStep.SMOKE_TEST,
    Step.SWITCH: InstallStep.SWITCH,
    Step.DONE: InstallStep.DONE,
}


def wire_step(step: Step, *, serving: bool) -> InstallStep | None:
    """What the device reports for ``step``: a failed install is ``reverted`` while an older model still
    serves, ``failed`` when nothing does; None for IDLE (nothing to report)."""
    if step is Step.FAILED:
        return InstallStep.REVERTED if serving else InstallStep.FAILED
    return WIRE_STEPS.get(step)


class TransitionError(AgentError, RuntimeError):
    pass


def next_step(step: Step, event: Event) -> Step:
    try:
        return TRANSITIONS[(step, event)]
    except KeyError:
        raise TransitionError(f"no transition from {step.value} on {event.value}") from None


@dataclass(frozen=True)
class InstallRecord:
    """What is being installed and how far it got; persisted as JSON."""

    step: Step = Step.IDLE
    generation: int = -1
    manifest_sha256: str = ""
    model: str = ""
    version: str = ""
    artifact: str = ""
    slot: str = ""
    attempts: int = 0
    failed_step: str = ""
    error: str = ""

    def advance(self, event: Event, **changes: object) -> InstallRecord:
        return replace(self, step=next_step(self.step, event), **changes)  # type: ignore[arg-type]

    def save(self, path: Path) -> None:
        data = asdict(self)
        data["step"] = self.step.value
        atomic_write(path, json.dumps(data, sort_keys=True).encode())

    @classmethod
    def load(cls, path: Path) -> InstallRecord:
        try:
            data = json.loads(path.read_text())
            data["step"] = Step(data["step"])
            return cls(**data)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError, KeyError):
            # a record we cannot read must not brick the device: start from what the slots say
            return cls()
