"""What the screens show, as values: data rows (server/tui/data.py) in, Rich text and plain strings out.

Pure functions, no widget and no I/O, so a screen's look is decided here and tested without an app; the
screens (server/tui/screens/) only put these values into their tables and labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from rich.text import Text

from hardware.profiles import label as profile_label
from server import audit
from server.db.models import AuditEntry
from server.features import FeatureDriftRow
from server.tui.data import AlertRow, DeviceRow, DriftRow, ModelRow, RolloutDetail, RolloutRow

__all__ = [
    "ALERT_STYLE", "FLEET_COLUMNS", "FLEET_WIDTHS", "HEALTH_STYLE", "STATE_STYLE", "alert_cells", "alerts_summary",
    "audit_cells", "audit_chain", "bar", "device_features", "device_head", "drift_cells", "drift_series_label",
    "feature_drift_cells", "fingerprint", "fleet_cells", "fleet_matches", "fleet_summary", "fmt",
    "gate_cells", "help_markdown", "model_cells", "plot_values", "profile", "rollout_cells", "rollout_head", "when",
]

HEALTH_STYLE = {"ok": "green", "warn": "yellow", "bad": "bold red", "off": "dim"}
STATE_STYLE = {"running": "cyan", "completed": "green", "rolled_back": "yellow", "rolling_back": "bold yellow",
               "paused": "magenta", "aborted": "dim", "pending": "", "pass": "green", "fail": "bold red",
               "insufficient": "yellow"}
ALERT_STYLE = {"raised": "bold red", "acknowledged": "yellow", "cleared": "green"}


def fmt(value: float | None, spec: str, dash: str = "—") -> str:
    return dash if value is None else format(value, spec)


def when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S") if at else "—"


#: A device's profile as shown: ``(custom)`` after a name that is no hardware profile's (one lookup per name).
profile = lru_cache(maxsize=256)(profile_label)


def plot_values(values: Sequence[float]) -> list[float]:
    """The data of a sparkline. Textual draws a single value as a full bar and scales a series between its own
    minimum and maximum, so one value is drawn twice: a flat line."""
    return list(values) * 2 if len(values) == 1 else list(values)


def bar(value: float, width: int = 24) -> Text:
    """A drift score (PSI / threshold) as a bar, full at 2.0: green, yellow from 0.5, red from 1."""
    filled = min(round(min(value, 2.0) / 2.0 * width), width)
    style = "red" if value >= 1 else "yellow" if value >= 0.5 else "green"
    return Text("█" * filled + "░" * (width - filled), style=style)


# -- Fleet --------------------------------------------------------------------------------------------

#: column key, header, the value the column sorts on.
FLEET_COLUMNS: list[tuple[str, str, Callable[[DeviceRow], Any]]] = [
    ("id", "device", lambda r: r.id),
    ("profile", "profile", lambda r: r.profile),
    ("groups", "group", lambda r: r.groups),
    ("status", "online", lambda r: r.status),
    ("running", "running", lambda r: r.running),
    ("desired", "desired", lambda r: r.desired),
    ("install", "install", lambda r: r.install),
    ("last_seen", "last seen", lambda r: r.last_seen),
    ("p95", "p95 ms", lambda r: r.p95_ms),
    ("errors", "error %", lambda r: r.error_rate),
    ("drift", "drift", lambda r: r.drift),
]

FLEET_WIDTHS = {"id": 14, "profile": 18, "groups": 10, "status": 8, "running": 14, "desired": 14, "install": 10,
                "last_seen": 19, "p95": 7, "errors": 7, "drift": 6}


def fleet_cells(r: DeviceRow) -> list[Text]:
    style = HEALTH_STYLE[r.health]
    values = [r.id, profile(r.profile), r.groups, r.status, r.running, r.desired, r.install, when(r.last_seen),
              fmt(r.p95_ms, ".1f"), fmt(None if r.error_rate is None else 100 * r.error_rate, ".2f"),
              fmt(r.drift, ".2f")]
    return [Text(v, style=style, justify="right" if i >= 8 else "left") for i, v in enumerate(values)]


def fleet_matches(row: DeviceRow, text: str) -> bool:
    """Words all match; ``group:G``, ``tag:T``, ``status:S``, ``profile:P``, ``health:H`` match that field."""
    fields = {"group": row.groups.split(","), "tag": row.tags.split(","), "status": [row.status],
              "profile": [row.profile], "health": [row.health], "version": [row.running]}
    for word in text.lower().split():
        key, sep, value = word.partition(":")
        if sep and key in fields:
            if value not in [f.lower() for f in fields[key]]:
                return False
        elif not row.matches(word):
            return False
    return True


def fleet_summary(total: int, online: int, unhealthy: int, filter_text: str, shown: int) -> str:
    """The Fleet screen's line above the table: counts over the whole fleet, and how many the filter shows."""
    summary = f"{total} devices · {online} online · {unhealthy} unhealthy"
    if filter_text:
        summary += f" · filter “{filter_text}”: {shown} shown"
    return summary


# -- Alerts ------------------------------------------------------------------------------------------------


def alert_cells(r: AlertRow) -> list[Text]:
    return [Text(str(r.id), justify="right"), Text(r.state, style=ALERT_STYLE.get(r.state, "")), Text(r.kind),
            Text(r.device), Text(r.reason[:60]), Text(when(r.raised_at)), Text(r.by)]


def alerts_summary(rows: Sequence[AlertRow], include_all: bool) -> str:
    raised = sum(r.state == "raised" for r in rows)
    acked = sum(r.state == "acknowledged" for r in rows)
    return (f"{raised} raised · {acked} acknowledged · "
            + ("every alert" if include_all else "active ones and those cleared in the last 24 hours"))


# -- Device ---------------------------------------------------------------------------------------------


def device_head(r: DeviceRow) -> Text:
    return Text.assemble((r.id, "bold"), f"  {profile(r.profile)} · ", (r.status, HEALTH_STYLE[r.health]),
                         f" · running {r.running} · desired {r.desired} · install {r.install} · "
                         f"last seen {when(r.last_seen)}")


def fingerprint(fp: dict[str, Any]) -> str:
    """The device's reported facts on one line (nested ones left out)."""
    return (" · ".join(f"{k} {v}" for k, v in sorted(fp.items()) if not isinstance(v, (dict, list))) or
            "no fingerprint reported yet")


def device_features(features: Sequence[tuple[str, float]]) -> Text | str:
    """One bar per feature: its drift score in the latest window."""
    lines = [Text.assemble(f"{name[:20]:<20} ", bar(score), f" {score:.2f}") for name, score in features]
    return Text("\n").join(lines) if lines else "no drift report yet"


# -- Rollouts ---------------------------------------------------------------------------------------------


def rollout_cells(r: RolloutRow) -> list[Text]:
    return [Text(r.name), Text(r.version), Text(r.state, style=STATE_STYLE.get(r.state, "")), Text(r.wave),
            Text(f"{r.done}/{r.total}"), Text(r.target + (" [production]" if r.production else "")),
            Text(r.reason[:60])]


def rollout_head(detail: RolloutDetail) -> Text:
    r = detail.row
    return Text.assemble((r.name, "bold"), f" · {r.version} · ", (r.state, STATE_STYLE.get(r.state, "")),
                         f" · wave {r.wave} · by {detail.created_by}")


def gate_cells(wave: int, gate: str, verdict: str, numbers: dict[str, Any]) -> tuple[str, str, Text, str]:
    """One gate's verdict in one wave, with the numbers it was decided on."""
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    return str(wave + 1), gate, Text(verdict, style=STATE_STYLE.get(verdict, "")), text[:120]


# -- Models -----------------------------------------------------------------------------------------------


def model_cells(r: ModelRow) -> tuple[str, str, str, str, str, str, str]:
    return r.ref, r.stage, r.author, str(r.artifacts), r.accuracy, r.int8_delta, r.approvals


# -- Drift ----------------------------------------------------------------------------------------------------


def drift_cells(r: DriftRow) -> list[Text]:
    style = "red" if r.score >= 1 else "yellow" if r.score >= 0.5 else "green"
    return [Text(r.version), Text(r.feature), Text(f"{r.score:.2f}", style=style, justify="right"),
            Text(str(r.windows), justify="right"), Text(r.worst_devices)]


def feature_drift_cells(r: FeatureDriftRow) -> list[Text]:
    d = r.drift
    ratio = d.psi / d.psi_threshold if d.psi_threshold else 0.0
    return [Text(r.feature), Text(r.model), Text(str(r.windows), justify="right"), Text(str(d.n), justify="right"),
            Text(f"{ratio:.2f}", style="red" if d.drifted else "green", justify="right"),
            Text(f"{d.nan_rate:.1%}", justify="right"), Text("yes" if d.drifted else "no")]


def drift_series_label(key: tuple[str, str] | None, points: int) -> str:
    if key is None:
        return "no drift evaluated yet"
    if not points:
        return f"{key[0]} · {key[1]}: no fleet-wide evaluation of it yet"
    return f"{key[0]} · {key[1]} over the last {points} evaluations (1.0 = threshold)"


# -- Audit ------------------------------------------------------------------------------------------------------


def audit_chain(report: audit.AuditReport) -> Text:
    if report.ok:
        return Text(f"✔ audit chain verified: {report.entries} entries", style="green")
    return Text(f"✘ audit chain BROKEN: {'; '.join(report.problems[:3])}", style="bold red")


def audit_cells(e: AuditEntry) -> tuple[str, str, str, str, str, str]:
    detail = ", ".join(f"{k}={v}" for k, v in e.detail.items() if k != "gates")
    return str(e.seq), when(e.at), e.actor, e.action, e.subject, detail[:100]


# -- Help --------------------------------------------------------------------------------------------------------


def help_markdown(sections: Iterable[tuple[str, list[tuple[str, str]]]]) -> str:
    """Every key, by screen, as a Markdown table per section."""
    lines = ["# edgeherd — keys", ""]
    for title, keys in sections:
        lines += [f"## {title}", "", "| key | does |", "|---|---|"]
        lines += [f"| `{k}` | {d} |" for k, d in keys] + [""]
    lines += ["Destructive actions ask first and name their target; rolling back a rollout makes you type "
              "its name. Actions your role may not take are greyed out in the footer.", ""]
    return "\n".join(lines)
