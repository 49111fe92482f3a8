"""Whether a device counts as online: one rule for the TUI, the CLI, /metrics and the rollout planner.

A device's stored ``status`` is the last thing it said, or the broker said for it by publishing its last
will. Nothing is left to correct it when the broker itself goes away with its devices (stopped, crashed, cut
off): the wills are never published and the row says ``online`` forever. So the stored word is not enough:
a device counts as online when its stored status is ``online`` **and** the server has heard from it
(``last_seen``, set on every message it ingests) within ``stale_after``.

A connected agent is never silent that long: it reports every window, and when it has sent nothing else for
``heartbeat_s`` (agent config, 60 s by default) it republishes its state (docs/protocol.md §4). The default
``stale_after`` (``EDGEHERD_STALE_AFTER_S``, server/settings.py) is three such silences, 180 s.

:func:`is_online` decides for one device; :func:`online_clause` is the same rule as a SQL condition, for
counts and lists over the whole fleet (a comparison on two columns: cheap at 10,000 devices);
:func:`shown_status` is what an operator is shown.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_
from sqlmodel import col

from server.db.models import Device
from server.settings import STALE_AFTER

__all__ = ["ONLINE", "is_online", "online_clause", "shown_status"]

ONLINE = "online"


def _now(now: datetime | None) -> datetime:
    return datetime.now(timezone.utc) if now is None else now


def _utc(at: datetime) -> datetime:
    """SQLite hands times back without their zone; the server stores UTC."""
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at


def is_online(status: str, last_seen: datetime | None, now: datetime | None = None,
              stale_after: timedelta | None = None) -> bool:
    """Whether a device whose stored status is ``status`` and that was last heard from at ``last_seen`` counts
    as online at ``now`` (default: the clock) when silence longer than ``stale_after`` (default: the
    ``EDGEHERD_STALE_AFTER_S`` setting) means gone."""
    if status != ONLINE or last_seen is None:
        return False
    stale = STALE_AFTER.read() if stale_after is None else stale_after
    return _now(now) - _utc(last_seen) <= stale


def online_clause(now: datetime | None = None, stale_after: timedelta | None = None) -> Any:
    """:func:`is_online` as a SQL condition on the ``devices`` table."""
    stale = STALE_AFTER.read() if stale_after is None else stale_after
    cutoff = (_now(now) - stale).astimezone(timezone.utc)  # SQLite compares the stored UTC text
    return and_(col(Device.status) == ONLINE, col(Device.last_seen).is_not(None), col(Device.last_seen) >= cutoff)


def shown_status(status: str, last_seen: datetime | None, *, revoked: bool = False, now: datetime | None = None,
                 stale_after: timedelta | None = None) -> str:
    """What an operator sees: ``revoked``, ``online``, ``offline`` for a device that said online but has been
    silent too long, else its stored status (``offline``, ``unknown``)."""
    if revoked:
        return "revoked"
    if status == ONLINE:
        return ONLINE if is_online(status, last_seen, now, stale_after) else "offline"
    return status
