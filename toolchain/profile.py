"""Reference profile (what the training data looked like) and golden smoke vectors.

Each feature's bins depend on its kind (:func:`feature_edges`). A *discrete*
feature (every finite value integral, or a few distinct values that repeat)
with at most :data:`protocol.manifest.MAX_BINS` distinct values gets one bin
per value: edges at the midpoints between consecutive values, the first and
last half a gap outside the extreme values, so no two values ever share a bin.
Other features get about ``bins`` quantile bins whose edges also lie between
distinct values (a value that carries at least ``1/bins`` of the mass gets a
bin of its own, the top and bottom values included); a continuous feature's
outer edges are its training minimum and maximum. The reference records the
training rows that were NaN/±inf (``nan``) and outside the edges
(``outside``), which the server tests windows' rates against.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from agent.stats import bin_counts
from agent.summaries import IMAGE_SUMMARIES, image_summaries, image_summary_names
from protocol import FeatureReference, ReferenceProfile
from protocol.manifest import MAX_BINS

__all__ = ["CONFIDENCE_EDGES", "FeatureKind", "feature_edges", "feature_kind", "feature_matrix", "feature_reference",
           "golden_indices", "profile_of", "quantile_edges", "reference_profile", "softmax"]

FeatureKind = Literal["continuous", "discrete"]

CONFIDENCE_EDGES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
MAX_RAW_FEATURES = 1024


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    """Up to ``bins`` quantile bins; ties collapse, a constant feature gets two bins around its value.

    Kept for callers that want plain quantiles; reference profiles use :func:`feature_edges`, which never
    merges distinct values."""
    v = values[np.isfinite(values)].astype(np.float64)
    if v.size == 0:
        return [-1.0, 0.0, 1.0]
    edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)))
    if len(edges) < 3:
        lo, hi = float(v.min()), float(v.max())
        if hi > lo:
            return [lo, (lo + hi) / 2, hi]
        return [lo - 1.0, lo, lo + 1.0]
    return [float(e) for e in edges]


def feature_kind(values: np.ndarray) -> FeatureKind:
    """``discrete`` when every finite value is integral, or when there are at most MAX_BINS distinct values and
    they repeat (at least two rows per distinct value on average); else ``continuous``."""
    v = values[np.isfinite(values)].astype(np.float64)
    if v.size == 0:
        return "continuous"
    if bool(np.all(v == np.round(v))):
        return "discrete"
    distinct = np.unique(v).size
    return "discrete" if distinct <= MAX_BINS and 2 * distinct <= v.size else "continuous"


def _between(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Edges strictly between consecutive distinct values (their midpoints)."""
    mid: np.ndarray = lo + (hi - lo) / 2
    return mid


def feature_edges(values: np.ndarray, bins: int = 10) -> tuple[list[float], FeatureKind]:
    """A feature's bin edges and kind: one bin per value for a discrete feature with at most MAX_BINS distinct
    values, else about ``bins`` quantile bins; in both, edges lie between distinct values, so no two values
    that carry mass merge and the top value never shares the last (closed) bin with its neighbour."""
    kind = feature_kind(values)
    v = values[np.isfinite(values)].astype(np.float64)
    if v.size == 0:
        return [-1.0, 0.0, 1.0], kind
    u, cnt = np.unique(v, return_counts=True)
    if u.size == 1:
        x = float(u[0])
        gap = 1.0 if x == round(x) else max(abs(x), 1.0) * 1e-3
        return [x - gap / 2, x, x + gap / 2], kind
    if kind == "discrete" and u.size <= MAX_BINS:
        inner = _between(u[:-1], u[1:])
        edges = np.concatenate([[u[0] - (u[1] - u[0]) / 2], inner, [u[-1] + (u[-1] - u[-2]) / 2]])
        return [float(e) for e in edges], kind
    # quantile bins on boundaries between distinct values: boundary k lies between u[k-1] and u[k]
    below = np.cumsum(cnt)[:-1] / v.size  # mass below boundary k = 1 .. len(u) - 1
    targets = np.arange(1, bins) / bins
    chosen = {int(np.argmin(np.abs(below - t))) + 1 for t in targets}
    heavy = np.flatnonzero(cnt >= v.size / bins)
    for k in heavy[:bins]:  # a value with at least 1/bins of the mass gets a bin of its own
        chosen.update({int(k), int(k) + 1})
    ks = np.array(sorted(k for k in chosen if 1 <= k <= u.size - 1), dtype=np.int64)
    if ks.size > MAX_BINS - 1:
        ks = ks[np.linspace(0, ks.size - 1, MAX_BINS - 1).round().astype(np.int64)]
    inner = _between(u[ks - 1], u[ks])
    if kind == "discrete":
        lo, hi = u[0] - (u[1] - u[0]) / 2, u[-1] + (u[-1] - u[-2]) / 2
    else:
        lo, hi = u[0], u[-1]
    edges = np.concatenate([[lo], inner, [hi]])
    return [float(e) for e in edges], kind


def feature_matrix(x: np.ndarray, kind: str) -> tuple[np.ndarray, list[str]]:
    """The features drift is measured on: image summaries, or the raw columns of a table."""
    if kind == "image":
        return image_summaries(x), image_summary_names(x.shape[1])
    table = x.reshape(len(x), -1)[:, :MAX_RAW_FEATURES]
    return table.astype(np.float64), [f"f{i}" for i in range(table.shape[1])]


def feature_reference(name: str, values: np.ndarray, edges: list[float], *, version: int | None = None,
                      fold_outside: bool = False, kind: FeatureKind | None = None) -> FeatureReference:
    """One feature's training distribution on ``edges``; with ``fold_outside`` (registry features, binned on
    their declared range), values beyond the edges also count in the end bins, as the server counts devices'
    values for such profiles; else they are left out. Either way ``outside`` records how many there were and
    ``nan`` how many were NaN/±inf. ``kind`` and those two counts are written only where they differ from
    their defaults (continuous, 0), so a profile that needs none of them has the same bytes as before."""
    counted = bin_counts(values, np.asarray(edges))
    counts = counted.counts.copy()
    if fold_outside:
        counts[0] += counted.below
        counts[-1] += counted.above
    finite = values[np.isfinite(values)]
    outside = counted.below + counted.above
    return FeatureReference(name=name, version=version, edges=edges, counts=[int(c) for c in counts],
                            mean=float(finite.mean()) if finite.size else 0.0,
                            std=float(finite.std()) if finite.size else 0.0,
                            kind="discrete" if kind == "discrete" else None,
                            nan=counted.nan or None, outside=outside or None)


def profile_of(kind: Literal["raw", "image", "features"], refs: list[FeatureReference], y_train: np.ndarray,
               classes: int, probs_train: np.ndarray) -> ReferenceProfile:
    """The reference profile: the features' references, the class counts and the fp32 model's confidence."""
    confidence = bin_counts(probs_train.max(axis=1), np.asarray(CONFIDENCE_EDGES))
    return ReferenceProfile(
        kind=kind,
        summaries=IMAGE_SUMMARIES if kind == "image" else None,
        n=len(y_train),
        features=refs,
        class_counts=[int(c) for c in np.bincount(y_train, minlength=classes)],
        confidence_edges=CONFIDENCE_EDGES,
        confidence_counts=[int(c) for c in confidence.counts],
    )


def reference_profile(x_train: np.ndarray, kind: str, names: list[str] | None, y_train: np.ndarray,
                      classes: int, probs_train: np.ndarray, bins: int = 10) -> ReferenceProfile:
    feats, default_names = feature_matrix(x_train, kind)
    names = default_names if kind == "image" or names is None else names[: feats.shape[1]]
    refs = []
    for j, name in enumerate(names):
        edges, feature_kind_ = feature_edges(feats[:, j], bins)
        refs.append(feature_reference(name, feats[:, j], edges, kind=feature_kind_))
    return profile_of("image" if kind == "image" else "raw", refs, y_train, classes, probs_train)


def golden_indices(y: np.ndarray, k: int = 8) -> np.ndarray:
    """``k`` test rows, spread over the classes."""
    picked: list[int] = []
    classes = np.unique(y)
    for round_ in range(k):
        for c in classes:
            rows = np.flatnonzero(y == c)
            if round_ < len(rows) and len(picked) < k:
                picked.append(int(rows[round_]))
        if len(picked) >= k:
            break
    return np.array(sorted(picked))
