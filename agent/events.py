"""What the agent's threads hand each other: one frozen dataclass per event, matched with ``match``.

The MQTT network thread puts :data:`WorkerEvent` values on the worker's queue and :data:`ReporterEvent`
values on the reporter's; neither thread ever blocks the network thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = [
    "CloseWindow", "Confirmed", "Connected", "Disconnected", "Drain", "Message", "PubAck", "Refused",
    "ReporterEvent", "Resume", "Stop", "Stopping", "Tick", "WorkerEvent",
]


class Stopping(Exception):
    """Raised out of a wait for the next event once the agent is stopping, through any step in progress."""


@dataclass(frozen=True)
class Stop:
    """The agent is stopping: every loop returns."""


@dataclass(frozen=True)
class Connected:
    """A connection to the broker is up, under this session number."""

    session: int


@dataclass(frozen=True)
class Disconnected:
    """The connection to the broker is gone (requests and publications in flight with it)."""


@dataclass(frozen=True)
class Resume:
    """At start: an install was under way when the agent last stopped; carry on from its recorded step."""


@dataclass(frozen=True)
class Message:
    """An MQTT message for the worker: desired state, a command, a chunk, an error reply."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Tick:
    """No event came within the wait: time to check timers."""


@dataclass(frozen=True)
class PubAck:
    """The broker acknowledged (``ok``) or refused the publication ``mid``."""

    mid: int
    ok: bool


@dataclass(frozen=True)
class Confirmed:
    """The server's receipt: it stored the reports with these outbox keys."""

    keys: list[str]


@dataclass(frozen=True)
class Refused:
    """The server refused the report with this outbox key, for ``reason`` (its times: a clock that is off)."""

    key: str
    reason: str


@dataclass(frozen=True)
class CloseWindow:
    """Close the statistics window now (``report_now``); ``done`` is set once it is queued."""

    done: threading.Event | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Drain:
    """Reports were queued: send what the outbox holds."""


WorkerEvent = Stop | Connected | Disconnected | Resume | Message
ReporterEvent = Stop | Connected | Disconnected | PubAck | Confirmed | Refused | CloseWindow | Drain | Tick
