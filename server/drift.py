"""Drift scores from bin counts: chi-square decision, PSI and Jensen–Shannon for people.

The device sends, per feature, its window's counts on the reference profile's
bins (plus values below/above the reference range, which are folded into the
extreme bins, and NaN/inf, reported separately). The decision is a chi-square
test of homogeneity between the reference counts and the window's counts,
per feature, with a Bonferroni bound over the features: a window drifts when
any feature has ``p < alpha / m``. Its false-alarm rate stays near ``alpha``
whatever the window size, which fixed PSI thresholds do not
(``tests/test_drift.py`` measures both on data without drift).

PSI is reported as the readable score, with the threshold that matches the
same decision at this window size: ``(1/n_ref + 1/n_win) · χ²_{K−1}(1 − alpha/m)``.
Counts add, so the same functions score one window, a device over time, or
the whole fleet (sum the counts first). Alerts are raised and cleared with
hysteresis (:class:`Hysteresis`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import chi2

from protocol import FeatureStats, FeatureWindow, ReferenceProfile

__all__ = [
    "ALPHA",
    "DriftReport",
    "FeatureDrift",
    "Hysteresis",
    "chi_square",
    "folded_counts",
    "js_divergence",
    "psi",
    "score",
    "score_feature",
    "sum_stats",
]

#: Family-wise false-alarm rate per evaluated window.
ALPHA = 0.005
_SMOOTH = 0.5


def _props(counts: np.ndarray) -> np.ndarray:
    c = counts.astype(np.float64) + _SMOOTH
    out: np.ndarray = c / c.sum()
    return out


def psi(reference: np.ndarray, window: np.ndarray) -> float:
    """Population stability index of two count vectors (smoothed by 0.5 per bin)."""
    r, w = _props(reference), _props(window)
    return float(((w - r) * np.log(w / r)).sum())


def js_divergence(reference: np.ndarray, window: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    r, w = _props(reference), _props(window)
    m = (r + w) / 2
    return float(0.5 * (r * np.log2(r / m)).sum() + 0.5 * (w * np.log2(w / m)).sum())


def chi_square(reference: np.ndarray, window: np.ndarray) -> tuple[float, int, float]:
    """Chi-square test of homogeneity of two count vectors: (statistic, degrees of freedom, p-value)."""
    r, w = reference.astype(np.float64), window.astype(np.float64)
    keep = (r + w) > 0
    r, w = r[keep], w[keep]
    n_r, n_w = r.sum(), w.sum()
    if n_r == 0 or n_w == 0 or len(r) < 2:
        return 0.0, 0, 1.0
    total = r + w
    e_r, e_w = total * n_r / (n_r + n_w), total * n_w / (n_r + n_w)
    stat = float(((r - e_r) ** 2 / e_r).sum() + ((w - e_w) ** 2 / e_w).sum())
    df = len(r) - 1
    return stat, df, float(chi2.sf(stat, df))


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    n: int
    psi: float
    psi_threshold: float
    js: float
    chi2: float
    df: int
    p_value: float
    nan_rate: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    n: int
    features: list[FeatureDrift]
    output: FeatureDrift | None
    drifted: bool
    worst: str | None = None
    alpha: float = ALPHA

    @property
    def score(self) -> float | None:
        """The largest PSI / its size-aware threshold over the features: ≥ 1 is beyond the threshold."""
        ratios = [f.psi / f.psi_threshold for f in self.features if f.n > 0 and f.psi_threshold > 0]
        return max(ratios) if ratios else None

    def to_dict(self) -> dict[str, object]:
        return {"n": self.n, "drifted": self.drifted, "worst": self.worst, "alpha": self.alpha,
                "features": [vars(f) for f in self.features], "output": vars(self.output) if self.output else None}


def score_feature(name: str, ref: np.ndarray, win: np.ndarray, n_ref: int, nan: int, m: int, alpha: float
                  ) -> FeatureDrift:
    """One feature's window counts against its reference counts (``m`` features tested together, Bonferroni)."""
    n_win = int(win.sum())
    stat, df, p = chi_square(ref, win)
    crit = float(chi2.ppf(1 - alpha / m, max(df, 1)))
    threshold = (1 / max(n_ref, 1) + 1 / max(n_win, 1)) * crit
    total = n_win + nan
    return FeatureDrift(name=name, n=n_win, psi=psi(ref, win), psi_threshold=threshold, js=js_divergence(ref, win),
                        chi2=stat, df=df, p_value=p, nan_rate=nan / total if total else 0.0,
                        drifted=bool(n_win > 0 and p < alpha / m))


@dataclass
class _Summed:
    n: int
    counts: dict[str, np.ndarray]
    nan: dict[str, int]
    classes: np.ndarray | None


def folded_counts(f: FeatureWindow) -> np.ndarray:
    """A window's counts of one feature, values below and above the reference's range in its end bins."""
    c = np.asarray(f.counts, dtype=np.int64)
    c[0] += f.below
    c[-1] += f.above
    return c


def sum_stats(windows: Iterable[FeatureStats]) -> _Summed:
    """Add the counts of several windows (of one device or many) for the same manifest."""
    out = _Summed(0, {}, {}, None)
    for w in windows:
        out.n += w.n
        for f in w.features:
            c = folded_counts(f)
            out.counts[f.name] = out.counts[f.name] + c if f.name in out.counts else c
            out.nan[f.name] = out.nan.get(f.name, 0) + f.nan
        if w.class_counts is not None:
            cc = np.asarray(w.class_counts, dtype=np.int64)
            out.classes = cc if out.classes is None else out.classes + cc
    return out


def score(reference: ReferenceProfile, windows: Sequence[FeatureStats] | _Summed, *, alpha: float = ALPHA
          ) -> DriftReport:
    """Score one or more windows (summed) against ``reference``."""
    summed = windows if isinstance(windows, _Summed) else sum_stats(windows)
    m = len(reference.features)
    feats = []
    for f in reference.features:
        win = summed.counts.get(f.name)
        if win is None or len(win) != len(f.counts):
            continue
        feats.append(score_feature(f.name, np.asarray(f.counts), win, reference.n, summed.nan.get(f.name, 0), m, alpha))
    output = None
    if reference.class_counts is not None and summed.classes is not None and \
            len(summed.classes) == len(reference.class_counts):
        output = score_feature("output.class", np.asarray(reference.class_counts), summed.classes, reference.n, 0, 1,
                          alpha)
    drifted = [f for f in feats if f.drifted]
    worst = min(feats, key=lambda f: f.p_value).name if feats else None
    return DriftReport(n=summed.n, features=feats, output=output, drifted=bool(drifted), worst=worst, alpha=alpha)


@dataclass
class Hysteresis:
    """Raise an alert after ``raise_after`` drifting evaluations in a row; clear after ``clear_after`` clean ones.

    One window's decision has a false-alarm rate near :data:`ALPHA` (about 0.5 %, measured in
    ``tests/test_drift.py``); requiring two drifting windows in a row brings false *alerts* to
    about ALPHA², while a real, lasting shift still raises one within two windows.
    """

    raise_after: int = 2
    clear_after: int = 3
    active: bool = False
    _streak: int = field(default=0, repr=False)

    def update(self, drifted: bool) -> str | None:
        """Feed one evaluation; returns "raised", "cleared" or None."""
        if drifted != self.active:
            self._streak += 1
            if self._streak >= (self.raise_after if drifted else self.clear_after):
                self.active, self._streak = drifted, 0
                return "raised" if drifted else "cleared"
        else:
            self._streak = 0
        return None
