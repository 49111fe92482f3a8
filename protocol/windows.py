"""Naming a device's reporting window in an :class:`~protocol.ErrorReply`.

A telemetry or statistics window has no request id of its own: ``(kind,
session, window_seq)`` is its key. When the server refuses one (``bad_time``,
docs/protocol.md §7) it names the window in the reply's ``request_id``, so
the device can give up exactly that window instead of sending it again:
32 hex digits, ``000``, then ``1`` (telemetry) or ``2`` (feature statistics),
then ``session`` and ``window_seq`` as 14 hex digits each (both are below
2**53 < 16**14).
"""

from __future__ import annotations

import re

__all__ = ["window_from_request_id", "window_request_id"]

_KINDS = {"telemetry": "1", "stats": "2"}
_NAMES = {digit: name for name, digit in _KINDS.items()}
_PATTERN = re.compile(r"^000([12])([0-9a-f]{14})([0-9a-f]{14})$")
_MAX = 2**53


def window_request_id(kind: str, session: int, window_seq: int) -> str:
    """The ``request_id`` naming window ``(kind, session, window_seq)``; ``kind`` is "telemetry" or "stats"."""
    if kind not in _KINDS:
        raise ValueError(f"window kind must be telemetry or stats, not {kind!r}")
    if not (0 <= session <= _MAX and 0 <= window_seq <= _MAX):
        raise ValueError("session and window_seq must be between 0 and 2**53")
    return f"000{_KINDS[kind]}{session:014x}{window_seq:014x}"


def window_from_request_id(request_id: str) -> tuple[str, int, int] | None:
    """``(kind, session, window_seq)`` named by ``request_id``, or None when it names no window."""
    m = _PATTERN.match(request_id)
    if m is None:
        return None
    session, window_seq = int(m.group(2), 16), int(m.group(3), 16)
    if session > _MAX or window_seq > _MAX:
        return None
    return _NAMES[m.group(1)], session, window_seq
