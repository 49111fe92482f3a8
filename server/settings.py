"""Server settings read from the environment, so that every server process (``server run``, the TUI, the
CLI) reads the same ones, like ``EDGEHERD_DATABASE_URL``. Most are a number of seconds with a default and a
range, the alert webhook a URL; anything else is refused, naming the variable (docs/server.md, "Settings").

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
from urllib.parse import urlsplit

from server.errors import ServerError

__all__ = ["ALERT_WEBHOOK", "CLOCK_SKEW", "PRUNE_EVERY", "REPORT_HORIZON", "STALE_AFTER", "Seconds", "SettingError",
           "WebhookUrl"]


class SettingError(ServerError, ValueError):
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
#: Seconds between retention passes (server/retention.py), when ``server run`` is given ``--retain-days`` or
#: ``--retain`` and no ``--prune-every``.
PRUNE_EVERY = Seconds("EDGEHERD_PRUNE_EVERY_S", 600.0, 1.0, 86400.0)


@dataclass(frozen=True)
class WebhookUrl:
    """A URL setting: ``env`` holds an ``http://`` or ``https://`` URL with a host, or nothing (no webhook)."""

    env: str
    max_length: int = 2000

    def read(self, environ: Mapping[str, str] | None = None) -> str | None:
        raw = (os.environ if environ is None else environ).get(self.env, "").strip()
        if not raw:
            return None
        if len(raw) > self.max_length:
            raise SettingError(f"{self.env}: a URL of at most {self.max_length} characters, got {len(raw)}")
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise SettingError(f"{self.env}={raw[:200]!r}: not a URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingError(f"{self.env}={raw[:200]!r}: give an http:// or https:// URL with a host, e.g. "
                               f"https://hooks.example.com/edgeherd")
        return raw


#: Where alerts are POSTed when they fire and when they resolve, as Prometheus Alertmanager's webhook JSON
#: (version 4; server/alerts.py); unset: no webhook.
ALERT_WEBHOOK = WebhookUrl("EDGEHERD_ALERT_WEBHOOK")
