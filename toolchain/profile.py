"""Reference profile (what the training data looked like) and golden smoke vectors."""

from __future__ import annotations

from typing import Literal

import numpy as np

from agent.stats import bin_counts
from agent.summaries import IMAGE_SUMMARIES, image_summaries, image_summary_names
from protocol import FeatureReference, ReferenceProfile

__all__ = ["CONFIDENCE_EDGES", "feature_matrix", "feature_reference", "golden_indices", "profile_of", "quantile_edges",
           "reference_profile", "softmax"]

CONFIDENCE_EDGES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
MAX_RAW_FEATURES = 1024


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    """Up to ``bins`` quantile bins; ties collapse, a constant feature gets two bins around its value."""
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


def feature_matrix(x: np.ndarray, kind: str) -> tuple[np.ndarray, list[str]]:
    """The features drift is measured on: image summaries, or the raw columns of a table."""
    if kind == "image":
        return image_summaries(x), image_summary_names(x.shape[1])
    table = x.reshape(len(x), -1)[:, :MAX_RAW_FEATURES]
    return table.astype(np.float64), [f"f{i}" for i in range(table.shape[1])]


def feature_reference(name: str, values: np.ndarray, edges: list[float], *, version: int | None = None,
                      fold_outside: bool = False) -> FeatureReference:
    """One feature's training distribution on ``edges``; with ``fold_outside``, values beyond the edges count in
    the end bins (as the server folds devices' out-of-range values), else they are left out."""
    counted = bin_counts(values, np.asarray(edges))
    counts = counted.counts.copy()
    if fold_outside:
        counts[0] += counted.below
        counts[-1] += counted.above
    finite = values[np.isfinite(values)]
    return FeatureReference(name=name, version=version, edges=edges, counts=[int(c) for c in counts],
                            mean=float(finite.mean()) if finite.size else 0.0,
                            std=float(finite.std()) if finite.size else 0.0)


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
    refs = [feature_reference(name, feats[:, j], quantile_edges(feats[:, j], bins)) for j, name in enumerate(names)]
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
