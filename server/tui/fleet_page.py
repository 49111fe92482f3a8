"""A page of the Fleet table cut from rows already in memory: what server/tui/_fleet_sql.py does in the database,
written plainly. The remote TUI uses it against a server whose ``GET /devices`` has no paging yet; the tests hold
the SQL to its answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.tui.data import DeviceRow, FleetPage, FleetQuery
from server.tui.render import FLEET_COLUMNS, fleet_matches

__all__ = ["page_of"]


def page_of(rows: Sequence[DeviceRow], query: FleetQuery) -> FleetPage:
    """``query``'s page of ``rows`` (every device), with the fleet's counts."""
    getter = next(g for key, _, g in FLEET_COLUMNS if key == query.sort)

    def key(r: DeviceRow) -> tuple[bool, Any]:
        v = getter(r)
        return (True, "") if v is None else (False, v.lower() if isinstance(v, str) else v)

    matched = sorted(sorted((r for r in rows if fleet_matches(r, query.text)), key=lambda r: r.id), key=key,
                     reverse=query.reverse)  # a stable sort: ties stay in id order, reversed or not
    focus = next((i for i, r in enumerate(matched) if r.id == query.focus), None)
    offset = query.offset
    if focus is not None and query.limit is not None and not offset <= focus < offset + query.limit:
        offset = max(0, focus - query.limit // 2)
    end = None if query.limit is None else offset + query.limit
    return FleetPage(matched[offset:end], offset, len(matched), len(rows), sum(r.status == "online" for r in rows),
                     sum(r.health == "bad" for r in rows), focus)
