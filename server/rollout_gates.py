"""A wave's gates: what the new version's devices must show over a soak, as one table of small pure judges.

Each gate compares the new version's devices with a :class:`Baseline`: the
target's devices still on other versions when they sent enough requests,
else the baseline measured for an earlier wave of the rollout, else none
(error rate and drift compared with zero, latency with the budget only).
A gate says ``pass``, ``fail`` or ``insufficient`` (not enough data yet) and
keeps the numbers it judged by, for the audit log and the operator.

- ``error_rate``: the new error rate at most the baseline's (or zero) plus
  ``error_margin``; judged once ``min_requests`` requests came in.
- ``latency``: the new p95 within the budget (the rollout's, else the
  hardware profile's) and at most the baseline's × (1 + ``latency_margin``);
  judged once ``min_requests`` requests came in with latency data.
- ``drift``: the share of windows whose inputs drifted at most the
  baseline's (or zero) plus ``drift_margin``; judged once
  ``min_drift_windows`` windows were scored.
- ``predictions``: the same for windows whose outputs departed from the
  reference's, with the same margin.

``min_drift_windows = 0`` turns the drift and predictions gates off.
server/rollouts.py plans with them; nothing here touches a clock or the database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GATES", "Baseline", "Evidence", "GateResult", "Gates", "Metrics", "Verdict", "choose_baseline", "judge"]

Verdict = Literal["pass", "fail", "insufficient"]


class Gates(BaseModel):
    """What a wave must show, over its soak, before the next one starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The new version's error rate may exceed the baseline's by at most this (absolute, 0.01 = 1 point).
    error_margin: float = Field(0.01, ge=0, le=1)
    #: Its p95 latency may exceed the baseline's by at most this fraction (0.2 = 20 %)...
    latency_margin: float = Field(0.2, ge=0, le=100)
    #: ...and must stay within this budget (ms), the hardware profile's unless set here.
    latency_budget_ms: float | None = Field(None, gt=0)
    #: The share of its statistics windows flagged as drifting may exceed the baseline's by at most this.
    drift_margin: float = Field(0.0, ge=0, le=1)
    #: Fewer requests than this over the soak is not enough data to judge error rate and latency.
    min_requests: int = Field(50, ge=1)
    #: Fewer drift-scored windows than this is not enough data to judge drift (0: no drift gate).
    min_drift_windows: int = Field(1, ge=0)


@dataclass(frozen=True)
class Metrics:
    """Health of a set of devices over a period: from telemetry windows and drift reports."""

    requests: int = 0
    errors: int = 0
    #: Requests-weighted mean of the windows' p95 latency; None without latency data.
    p95_ms: float | None = None
    drift_windows: int = 0
    drifted_windows: int = 0
    #: Windows whose outputs (a classifier's predicted classes, a regression model's values on its output bins)
    #: were compared with the reference's distribution, and how many differed from it (output drift: what a
    #: model broken in a way that raises no error shows).
    output_windows: int = 0
    output_drifted: int = 0

    @property
    def output_share(self) -> float | None:
        return self.output_drifted / self.output_windows if self.output_windows else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def drift_share(self) -> float | None:
        return self.drifted_windows / self.drift_windows if self.drift_windows else None


@dataclass(frozen=True)
class Baseline:
    """What the new version is compared with: rates, and where they come from."""

    error_rate: float | None
    p95_ms: float | None
    drift_share: float | None
    #: "fleet" (the target's devices on other versions, now), "wave N" (as measured for an earlier wave), "none".
    source: str
    output_share: float | None = None


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    numbers: dict[str, Any]
    #: The wave it judged.
    wave: int = 0


@dataclass(frozen=True)
class Evidence:
    """Everything a gate judges by: the rollout's thresholds, the new version's numbers, what they are compared
    with, and the strictest p95 budget of the new version's devices' hardware profiles."""

    gates: Gates
    new: Metrics
    base: Baseline
    profile_budget_ms: float | None = None


def choose_baseline(g: Gates, fleet: Metrics | None, prior: Baseline | None) -> Baseline:
    """The fleet on other versions when it sent enough requests (its drift shares only over enough windows), else
    the baseline of an earlier wave, else none."""
    if fleet is not None and fleet.requests >= g.min_requests:
        enough_windows = max(g.min_drift_windows, 1)
        return Baseline(fleet.error_rate, fleet.p95_ms,
                        fleet.drift_share if fleet.drift_windows >= enough_windows else None, "fleet",
                        fleet.output_share if fleet.output_windows >= enough_windows else None)
    if prior is not None:
        return prior
    return Baseline(None, None, None, "none")


Judged = tuple[Verdict, dict[str, Any]]


def _error_rate(e: Evidence) -> Judged:
    """Not worse than the baseline (or than zero errors without one) by more than the margin."""
    g, new, b = e.gates, e.new, e.base
    numbers: dict[str, Any] = {"new_requests": new.requests, "new_errors": new.errors,
                               "new_error_rate": new.error_rate, "baseline_error_rate": b.error_rate,
                               "baseline": b.source, "margin": g.error_margin, "min_requests": g.min_requests}
    if new.requests < g.min_requests:
        return "insufficient", numbers
    limit = (b.error_rate or 0.0) + g.error_margin
    numbers["limit"] = limit
    return ("pass" if (new.error_rate or 0.0) <= limit + 1e-12 else "fail"), numbers


def _latency(e: Evidence) -> Judged:
    """Within the budget (the rollout's, else the hardware profile's), and not worse than the baseline by more than
    the margin."""
    g, new, b = e.gates, e.new, e.base
    budget = g.latency_budget_ms if g.latency_budget_ms is not None else e.profile_budget_ms
    numbers: dict[str, Any] = {"new_p95_ms": new.p95_ms, "baseline_p95_ms": b.p95_ms, "baseline": b.source,
                               "budget_ms": budget,
                               "budget_from": "rollout" if g.latency_budget_ms is not None else "profile",
                               "margin": g.latency_margin}
    if new.requests < g.min_requests or new.p95_ms is None:
        return "insufficient", numbers
    limits = [lim for lim in (budget, b.p95_ms * (1 + g.latency_margin) if b.p95_ms is not None else None)
              if lim is not None]
    numbers["limit_ms"] = min(limits) if limits else None
    return ("pass" if not limits or new.p95_ms <= min(limits) + 1e-9 else "fail"), numbers


def _share(e: Evidence, windows: int, flagged: int, share: float | None, baseline_share: float | None) -> Judged:
    """The share of flagged windows not above the baseline's by more than the drift margin."""
    g = e.gates
    numbers: dict[str, Any] = {"new_windows": windows, "new_drifted": flagged, "new_share": share,
                               "baseline_share": baseline_share, "baseline": e.base.source, "margin": g.drift_margin}
    if windows < g.min_drift_windows:
        return "insufficient", numbers
    limit = (baseline_share or 0.0) + g.drift_margin
    numbers["limit"] = limit
    return ("pass" if (share or 0.0) <= limit + 1e-12 else "fail"), numbers


def _drift(e: Evidence) -> Judged:
    """Windows whose inputs drifted from the reference's (server/drift.py)."""
    return _share(e, e.new.drift_windows, e.new.drifted_windows, e.new.drift_share, e.base.drift_share)


def _predictions(e: Evidence) -> Judged:
    """Windows whose outputs departed from the reference's (a classifier's predicted classes, a regression model's
    values on its output bins: server/drift.py), with the drift gate's margin."""
    return _share(e, e.new.output_windows, e.new.output_drifted, e.new.output_share, e.base.output_share)


def _always(_: Gates) -> bool:
    return True


def _drift_scored(g: Gates) -> bool:
    return g.min_drift_windows > 0


#: Every gate, in the order they are judged and recorded: name → (whether the thresholds turn it on, its judge).
GATES: dict[str, tuple[Callable[[Gates], bool], Callable[[Evidence], Judged]]] = {
    "error_rate": (_always, _error_rate),
    "latency": (_always, _latency),
    "drift": (_drift_scored, _drift),
    "predictions": (_drift_scored, _predictions),
}


def judge(g: Gates, new: Metrics, fleet: Metrics | None, prior: Baseline | None = None,
          profile_budget_ms: float | None = None) -> list[GateResult]:
    """Every gate ``g`` turns on, for the new version's ``new`` numbers against the baseline of ``fleet``/``prior``
    (:func:`choose_baseline`)."""
    evidence = Evidence(g, new, choose_baseline(g, fleet, prior), profile_budget_ms)
    return [GateResult(name, *verdict(evidence)) for name, (on, verdict) in GATES.items() if on(g)]
