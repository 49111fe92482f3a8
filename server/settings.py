"""Server settings read from the environment, so that every server process (``server run``, the TUI, the
CLI) reads the same ones, like ``EDGEHERD_DATABASE_URL``. Each is a number of seconds with a default and a
range; anything else is refused, naming the variable (docs/server.md, "Settings").

Exceptions::

    ValueError
     └── SettingError    an EDGEHERD_* variable holds a value its setting does not take
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["CLOCK_SKEW", "REPORT_HORIZON", "STALE_AFTER", "Seconds", "SettingError"]


class SettingError(ValueError):
    """A setting's environment variable holds something it does not take; the message names the variable."""


@dataclass(frozen=True)
class Seconds:
    """A duration setting: ``env`` (seconds), else ``default``; refused outside ``[low, high]``."""

    env: str
    default: float
    low: float
    high: float

    def read(self, environ: Mapping[str, str] | None = None) -> timedelta:
        raw = (os.environ if environ is None else environ).get(self.env, "").strip()
        if not raw:
            return timedelta(seconds=self.default)
        try:
            value = float(raw)
        except ValueError:
            raise SettingError(f"{self.env}={raw!r}: give a number of seconds, e.g. {self.default:g}") from None
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise SettingError(f"{self.env}={raw!r}: give between {self.low:g} and {self.high:g} seconds "
                               f"(default {self.default:g})")
        return timedelta(seconds=value)


#: A device whose last state said online, but from which the server has heard nothing for this long, counts as
#: offline (server/presence.py). Agents speak at least every ``heartbeat_s`` (60 s by default): three of those.
STALE_AFTER = Seconds("EDGEHERD_STALE_AFTER_S", 180.0, 1.0, 7 * 86400.0)
#: How far ahead of the server's clock a time a device sends may be (clocks drift; NTP keeps them to seconds).
CLOCK_SKEW = Seconds("EDGEHERD_CLOCK_SKEW_S", 300.0, 0.0, 86400.0)
#: How far behind the server's clock a time a device sends may be: an agent's outbox holds 10,000 windows, about
#: a week of one-minute windows of a device that was offline.
REPORT_HORIZON = Seconds("EDGEHERD_REPORT_HORIZON_S", 7 * 86400.0, 3600.0, 366 * 86400.0)
