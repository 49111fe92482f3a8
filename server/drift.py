"""Drift scores from bin counts: the decision, and PSI / Jensen–Shannon for people.

How the decision works
----------------------
The device sends, per feature, its window's counts on the reference profile's
bins, the values below and above the reference range, and the NaN/±inf values.
Per feature the server runs three tests, each against what the reference
implies when nothing has changed:

1. **Distribution** — a chi-square test of homogeneity between the reference's
   and the window's counts on the bins (values inside the range only). The
   approximation needs enough expected rows per bin, so bins whose expected
   count at *this window's size* is below :data:`MIN_EXPECTED` are pooled
   first: adjacent bins for ordered features, the small ones into one "other"
   bin for unordered ones (output classes). If fewer than two pooled bins
   remain, the distribution is not decidable at this size (``decidable`` is
   False on the feature) and only the two rate tests run.
2. **Out of range** — the share of finite values outside
   ``[edges[0], edges[-1]]``. For a fresh value the chance of falling outside
   the range of ``n`` training values is ``2/(n+1)`` (exchangeability), and the
   whole mass outside is Beta(2, n−1) distributed; with ``o`` training values
   already outside, Beta(o+2, n−o−1). The window's count is tested one-sided
   and exactly against the matching beta-binomial distribution (which
   accounts for the reference being a sample too).
3. **Missing** — the share of NaN/±inf rows, against the reference's own
   ``k`` of ``n`` through Beta(k+1, n−k+1) (mean ``(k+1)/(n+2)``), one-sided
   and exact in the same way.

The family-wise false-alarm rate per window is :data:`ALPHA`, split by
(weighted) Bonferroni over all tests of the window: with ``m`` features, a
distribution test alarms at ``p < 0.6·ALPHA/m``, each rate test at
``p < 0.2·ALPHA/m``. A window smaller than :data:`MIN_WINDOW` rows is not
decided at all (``DriftReport.decidable`` is False): callers add a device's
small windows up (:func:`sum_stats`) until they are, and show "insufficient"
until then. ``tests/test_drift.py`` and ``tests/test_drift_kinds.py`` measure
the false-alarm rate on continuous, integer and categorical features at 20 to
1000 rows, and the detection of shifts, values moved to a neighbour, tails
beyond the range and missing values.

Registry features (profile kind ``features``) are binned on their declared
range and their reference counts values beyond it in the end bins; the
window's are folded the same way there (:func:`folded_counts`), and still
tested for their out-of-range rate.

The model's output is scored the same way on its own: a classifier's top-1
classes on unordered bins (``output.class``), a regression model's first
output on the value bins of its reference's ``output_edges`` (``output.value``,
ordered: adjacent bins pool; the device counts values beyond the edges in the
end bins, as the reference counts the training predictions). The rollout's
``predictions`` gate reads this output score, whichever kind it is.

PSI is reported as the readable score, on the same pooled bins, with the
threshold that matches the distribution test at this window size:
``(1/n_ref + 1/n_win) · χ²_{K−1}(1 − 0.6·alpha/m)``. Counts add, so the same
functions score one window, a device over time, or the whole fleet (sum the
counts first). Alerts are raised and cleared with hysteresis
(:class:`Hysteresis`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import chdtrc, chdtri
from scipy.stats import betabinom

from protocol import FeatureReference, FeatureStats, FeatureWindow, ReferenceProfile

__all__ = [
    "ALPHA",
    "MIN_EXPECTED",
    "MIN_WINDOW",
    "DriftReport",
    "FeatureDrift",
    "Hysteresis",
    "chi_square",
    "folded_counts",
    "js_divergence",
    "misfit",
    "pool_bins",
    "psi",
    "rate_p_value",
    "score",
    "score_feature",
    "sum_stats",
]

#: Family-wise false-alarm rate per evaluated window.
ALPHA = 0.005
#: Windows with fewer rows are not decided: they accumulate until they reach it.
MIN_WINDOW = 20
#: Smallest expected count of a (pooled) bin in the chi-square test.
MIN_EXPECTED = 5.0
#: Shares of a feature's ALPHA/m for its distribution, out-of-range and missing tests (they sum to 1).
SHARE_DISTRIBUTION, SHARE_RANGE, SHARE_MISSING = 0.6, 0.2, 0.2
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
    return stat, df, float(chdtrc(df, stat))


def pool_bins(reference: np.ndarray, n_win: int, *, ordered: bool = True,
              min_expected: float = MIN_EXPECTED) -> np.ndarray:
    """The pooled group of each bin, so that every group expects at least ``min_expected`` rows in a window of
    ``n_win`` (and in the reference, when it is the smaller sample). It depends on the reference and the size
    only, never on the window's counts, so the test stays valid. Ordered bins pool with their neighbours (a
    short last run joins the group before it); unordered ones pool their small bins into one "other" group."""
    r = reference.astype(np.float64)
    n_ref = r.sum()
    groups = np.zeros(len(r), dtype=np.int64)
    if n_ref <= 0 or n_win <= 0:
        return groups
    expected = r / n_ref * min(n_ref, float(n_win))
    if ordered:
        g, acc = 0, 0.0
        for i, e in enumerate(expected):
            groups[i] = g
            acc += e
            if acc >= min_expected:
                g, acc = g + 1, 0.0
        if acc < min_expected and g > 0:  # the short tail joins the last full group
            groups[groups == g] = g - 1
        return groups
    small = expected < min_expected
    if not small.any():
        return np.arange(len(r), dtype=np.int64)
    big = np.flatnonzero(~small)
    if expected[small].sum() < min_expected and big.size:
        small[big[np.argmin(expected[big])]] = True  # "other" alone would be too small: give it the smallest bin
        big = np.flatnonzero(~small)
    groups[big] = np.arange(big.size)
    groups[small] = big.size
    return groups


def rate_p_value(k: int, trials: int, prior_hits: float, prior_misses: float) -> float:
    """P(at least ``k`` of ``trials``) when the rate is Beta(prior_hits, prior_misses): a one-sided exact test of a
    window's rate against a reference's, allowing for the reference being a sample too."""
    if k <= 0 or trials <= 0:
        return 1.0
    return float(min(1.0, max(0.0, betabinom.sf(k - 1, trials, prior_hits, max(prior_misses, 1.0)))))


def _pct(x: float) -> str:
    pct = x * 100
    return f"{pct:.0f} %" if pct >= 9.5 or abs(pct - round(pct)) < 0.05 else f"{pct:.1f} %"


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's tests in one window (or sum of windows).

    ``n`` counts the finite values inside the range, ``bins`` the pooled bins its distribution was tested on
    (``decidable`` False when fewer than two), ``p_value`` the distribution test's p; ``p_out_of_range`` and
    ``p_missing`` the rate tests'. ``reason`` says why, when ``drifted``.
    """

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
    kind: str = "continuous"
    decidable: bool = True
    bins: int = 0
    out_of_range_rate: float = 0.0
    p_out_of_range: float = 1.0
    p_missing: float = 1.0
    reason: str | None = None


@dataclass(frozen=True)
class DriftReport:
    n: int
    features: list[FeatureDrift]
    output: FeatureDrift | None
    drifted: bool
    worst: str | None = None
    alpha: float = ALPHA
    #: False when the window (or sum) has fewer than MIN_WINDOW rows, or no feature could be tested: nothing was
    #: decided, and ``drifted`` is False; accumulate more rows.
    decidable: bool = True

    @property
    def score(self) -> float | None:
        """The largest PSI / its size-aware threshold over the features: ≥ 1 is beyond the threshold."""
        ratios = [f.psi / f.psi_threshold for f in self.features if f.n > 0 and f.psi_threshold > 0]
        return max(ratios) if ratios else None

    @property
    def reasons(self) -> list[str]:
        """Why the window drifted, one line per drifted feature (and the output)."""
        out = [f.reason for f in self.features if f.drifted and f.reason]
        if self.output is not None and self.output.drifted and self.output.reason:
            out.append(self.output.reason)
        return out

    def to_dict(self) -> dict[str, object]:
        return {"n": self.n, "drifted": self.drifted, "decidable": self.decidable, "min_window": MIN_WINDOW,
                "worst": self.worst, "alpha": self.alpha, "reasons": self.reasons,
                "features": [vars(f) for f in self.features], "output": vars(self.output) if self.output else None}


def score_feature(name: str, ref: np.ndarray, win: np.ndarray, n_ref: int, nan: int, m: int, alpha: float, *,
                  below: int = 0, above: int = 0, ref_nan: int = 0, ref_outside: int = 0, kind: str = "continuous",
                  ordered: bool = True, fold: bool = False, decide: bool = True) -> FeatureDrift:
    """One feature's window counts against its reference counts (``m`` features tested together, Bonferroni).

    ``ref``/``win``: counts on the bins (values inside the range); ``below``/``above``: the window's finite values
    outside it; ``nan``: its NaN/±inf values; ``n_ref``: the reference's rows, ``ref_nan`` and ``ref_outside`` of
    them missing and outside. With ``fold`` (registry features, whose reference counts them so), the values
    outside the range also count in the end bins. With ``decide`` False (a window below MIN_WINDOW) nothing is
    flagged.
    """
    ref = np.asarray(ref, dtype=np.int64)
    win = np.array(win, dtype=np.int64)
    finite = int(win.sum()) + below + above
    if fold:
        win[0] += below
        win[-1] += above
    n_win = int(win.sum())
    groups = pool_bins(ref, n_win, ordered=ordered)
    k = int(groups.max()) + 1 if len(groups) else 0
    r_p = np.bincount(groups, weights=ref, minlength=k)
    w_p = np.bincount(groups, weights=win, minlength=k)
    tested = k >= 2 and n_win > 0
    stat, df, p = chi_square(r_p, w_p) if tested else (0.0, 0, 1.0)
    a_dist = SHARE_DISTRIBUTION * alpha / m
    crit = float(chdtri(max(df, 1), a_dist))
    n_r = int(ref.sum())
    threshold = (1 / max(n_r, 1) + 1 / max(n_win, 1)) * crit if tested else 0.0

    rows = finite + nan
    finite_ref = max(n_ref - ref_nan, 1)
    p_range = rate_p_value(below + above, finite, ref_outside + 2, finite_ref - ref_outside - 1)
    p_missing = rate_p_value(nan, rows, ref_nan + 1, n_ref - ref_nan + 1)

    reasons = []
    if decide and p_missing < SHARE_MISSING * alpha / m:
        reasons.append(f"{name}: {_pct(nan / rows)} NaN (training {_pct(ref_nan / max(n_ref, 1))})")
    if decide and p_range < SHARE_RANGE * alpha / m:
        sides = [f"{_pct(c / finite)} {where}" for c, where in
                 ((below, "below the reference minimum"), (above, "above the reference maximum")) if c]
        reasons.append(f"{name}: {', '.join(sides)}")
    if decide and tested and p < a_dist:
        reasons.append(f"{name}: distribution (chi-square p={p:.2g}, {k} bins)")
    return FeatureDrift(name=name, n=n_win, psi=psi(r_p, w_p) if tested else 0.0, psi_threshold=threshold,
                        js=js_divergence(r_p, w_p) if tested else 0.0, chi2=stat, df=df, p_value=p,
                        nan_rate=nan / rows if rows else 0.0, drifted=bool(reasons), kind=kind,
                        decidable=bool(decide and tested), bins=k,
                        out_of_range_rate=(below + above) / finite if finite else 0.0,
                        p_out_of_range=p_range, p_missing=p_missing, reason="; ".join(reasons) or None)


@dataclass
class _Summed:
    n: int
    counts: dict[str, np.ndarray]
    nan: dict[str, int]
    classes: np.ndarray | None
    below: dict[str, int] = field(default_factory=dict)
    above: dict[str, int] = field(default_factory=dict)


def folded_counts(f: FeatureWindow) -> np.ndarray:
    """A window's counts of one feature, values below and above the reference's range in its end bins (as
    registry features' references count them)."""
    c = np.asarray(f.counts, dtype=np.int64)
    c[0] += f.below
    c[-1] += f.above
    return c


def misfit(reference: ReferenceProfile, window: FeatureStats) -> str | None:
    """Why ``window`` cannot be counted with ``reference`` (a feature's or the classes' counts of another length
    than the reference's bins), or None when it can. Counts of different lengths cannot be added: one such window
    summed with others would stop every evaluation of its model version."""
    bins = {f.name: len(f.counts) for f in reference.features}
    for f in window.features:
        if f.name in bins and len(f.counts) != bins[f.name]:
            return f"feature {f.name}: {len(f.counts)} bins, the reference has {bins[f.name]}"
    if reference.class_counts is not None and window.class_counts is not None and \
            len(window.class_counts) != len(reference.class_counts):
        if reference.output_edges is not None:
            return (f"output counts: {len(window.class_counts)} bins, the reference has {len(reference.class_counts)} "
                    "output bins")
        return f"class counts: {len(window.class_counts)} classes, the reference has {len(reference.class_counts)}"
    return None


def sum_stats(windows: Iterable[FeatureStats]) -> _Summed:
    """Add the counts of several windows (of one device or many) for the same manifest: bins, values below and
    above the range, and NaN/±inf, each on its own."""
    out = _Summed(0, {}, {}, None)
    for w in windows:
        out.n += w.n
        for f in w.features:
            c = np.asarray(f.counts, dtype=np.int64)
            out.counts[f.name] = out.counts[f.name] + c if f.name in out.counts else c
            out.nan[f.name] = out.nan.get(f.name, 0) + f.nan
            out.below[f.name] = out.below.get(f.name, 0) + f.below
            out.above[f.name] = out.above.get(f.name, 0) + f.above
        if w.class_counts is not None:
            cc = np.asarray(w.class_counts, dtype=np.int64)
            out.classes = cc if out.classes is None else out.classes + cc
    return out


def _feature(ref: FeatureReference, summed: _Summed, n_ref: int, folded: bool, m: int, alpha: float, decide: bool
             ) -> FeatureDrift | None:
    win = summed.counts.get(ref.name)
    if win is None or len(win) != len(ref.counts):
        return None
    below, above = summed.below.get(ref.name, 0), summed.above.get(ref.name, 0)
    return score_feature(ref.name, np.asarray(ref.counts), win, n_ref, summed.nan.get(ref.name, 0), m, alpha,
                         below=below, above=above, ref_nan=ref.nan or 0, ref_outside=ref.outside or 0,
                         kind=ref.kind or "continuous", fold=folded, decide=decide)


def score(reference: ReferenceProfile, windows: Sequence[FeatureStats] | _Summed, *, alpha: float = ALPHA
          ) -> DriftReport:
    """Score one or more windows (summed) against ``reference``."""
    summed = windows if isinstance(windows, _Summed) else sum_stats(windows)
    m = len(reference.features)
    decide = summed.n >= MIN_WINDOW
    folded = reference.kind == "features"
    feats = [f for f in (_feature(r, summed, reference.n, folded, m, alpha, decide) for r in reference.features)
             if f is not None]
    output = None
    if reference.class_counts is not None and summed.classes is not None and \
            len(summed.classes) == len(reference.class_counts):
        if reference.output_edges is not None:  # a regression model: its values on ordered bins
            output = score_feature("output.value", np.asarray(reference.class_counts), summed.classes, reference.n,
                                   0, 1, alpha, kind="continuous", ordered=True, decide=decide)
        else:
            output = score_feature("output.class", np.asarray(reference.class_counts), summed.classes, reference.n,
                                   0, 1, alpha, kind="classes", ordered=False, decide=decide)
    decidable = decide and bool(feats)
    drifted = [f for f in feats if f.drifted]

    def weakest(f: FeatureDrift) -> float:
        return min(f.p_value / SHARE_DISTRIBUTION, f.p_out_of_range / SHARE_RANGE, f.p_missing / SHARE_MISSING)

    worst = min(feats, key=weakest).name if feats else None
    return DriftReport(n=summed.n, features=feats, output=output, drifted=bool(drifted), worst=worst, alpha=alpha,
                       decidable=decidable)


@dataclass
class Hysteresis:
    """Raise an alert after ``raise_after`` drifting evaluations in a row; clear after ``clear_after`` clean ones.

    One window's decision has a false-alarm rate of at most :data:`ALPHA` (about 0.5 %, measured in
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
