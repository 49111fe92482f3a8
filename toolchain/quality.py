"""Model quality beyond one accuracy number: feature importance, per-class metrics, slices.

Pure functions over numpy arrays; the model enters as a ``predict`` callable
(inputs in, predicted class ids out), so the build passes the fp32 ONNX model
run by the agent's own backend and the tests pass a plain function.

- :func:`permutation_importance`: shuffle one input column at a time (seeded)
  and measure how much accuracy drops, ``repeats`` times per column.
- :func:`confusion_matrix` and :func:`per_class_metrics`: precision, recall,
  F1 and support per class; rows of the matrix are true classes, columns
  predicted ones.
- :func:`slice_metrics` and :func:`slice_gate`: accuracy per value of each
  segment column (a column of the table that is not a model input, such as a
  site), the worst slice among those with at least ``min_count`` rows, and
  whether it clears a threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_SLICE_COUNT",
    "ClassMetrics",
    "FeatureImportance",
    "Importance",
    "Slice",
    "SliceReport",
    "accuracy",
    "confusion_matrix",
    "per_class_metrics",
    "permutation_importance",
    "slice_gate",
    "slice_metrics",
]

#: A slice needs at least this many test rows to be called the worst (or to fail the gate):
#: below it, one or two misclassified rows swing its accuracy by whole percentage points.
MIN_SLICE_COUNT = 20

Predict = Callable[[np.ndarray], np.ndarray]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of rows predicted right; 0.0 for no rows."""
    return float((np.asarray(y_true) == np.asarray(y_pred)).mean()) if len(y_true) else 0.0


# ---------------------------------------------------------------- feature importance


@dataclass(frozen=True)
class FeatureImportance:
    name: str
    mean: float  # mean accuracy drop (fraction, not points) over the repeats; negative: shuffling helped
    std: float  # population std of the drops over the repeats

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "mean": round(self.mean, 6), "std": round(self.std, 6)}


@dataclass(frozen=True)
class Importance:
    baseline: float  # accuracy with nothing shuffled
    repeats: int
    seed: int
    rows: int
    features: list[FeatureImportance]  # sorted by mean drop, largest first

    def to_dict(self) -> dict[str, object]:
        return {"metric": "accuracy drop", "baseline_accuracy": round(self.baseline, 6), "repeats": self.repeats,
                "seed": self.seed, "rows": self.rows, "features": [f.to_dict() for f in self.features]}


def permutation_importance(x: np.ndarray, y: np.ndarray, predict: Predict, names: Sequence[str], *,
                           repeats: int = 5, seed: int = 0) -> Importance:
    """Permutation importance of each column of ``x`` (shaped ``(n, features)``).

    For every column and repeat, that column alone is shuffled (one
    ``numpy.random.default_rng(seed)`` drives all shuffles, columns in order
    within each repeat), ``predict`` runs on the result, and the importance is
    the accuracy with nothing shuffled minus the accuracy with the column
    shuffled. Returns the mean and std over the repeats, sorted by mean,
    largest first (ties keep column order).
    """
    if x.ndim != 2:
        raise ValueError(f"permutation importance needs inputs shaped (n, features), got {x.shape}")
    if x.shape[1] != len(names):
        raise ValueError(f"{len(names)} feature names for {x.shape[1]} columns")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as rows, and at least one row: {len(x)} rows, {len(y)} labels")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rng = np.random.default_rng(seed)
    baseline = accuracy(y, predict(x))
    drops = np.zeros((x.shape[1], repeats), dtype=np.float64)
    shuffled = x.copy()
    for r in range(repeats):
        for j in range(x.shape[1]):
            shuffled[:, j] = x[rng.permutation(len(x)), j]
            drops[j, r] = baseline - accuracy(y, predict(shuffled))
            shuffled[:, j] = x[:, j]
    means, stds = drops.mean(axis=1), drops.std(axis=1)
    order = sorted(range(x.shape[1]), key=lambda j: -means[j])
    return Importance(baseline=baseline, repeats=repeats, seed=seed, rows=len(x),
                      features=[FeatureImportance(names[j], float(means[j]), float(stds[j])) for j in order])


# ---------------------------------------------------------------- per-class metrics


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts: row = true class, column = predicted class."""
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    for what, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{what} holds class ids outside 0..{n_classes - 1}")
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (t, p), 1)
    return out


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float  # of the rows predicted as this class, the fraction truly of it (0.0 if none predicted)
    recall: float  # of the rows truly of this class, the fraction predicted as it (0.0 if none present)
    f1: float  # harmonic mean of precision and recall (0.0 when both are 0)
    support: int  # rows truly of this class

    def to_dict(self) -> dict[str, object]:
        return {"class": self.name, "precision": round(self.precision, 6), "recall": round(self.recall, 6),
                "f1": round(self.f1, 6), "support": self.support}


def per_class_metrics(confusion: np.ndarray, classes: Sequence[str]) -> list[ClassMetrics]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows true); 0/0 counts as 0.0."""
    if confusion.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {confusion.shape} does not match {len(classes)} classes")
    out = []
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        predicted, support = int(confusion[:, i].sum()), int(confusion[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append(ClassMetrics(name, precision, recall, f1, support))
    return out


# ---------------------------------------------------------------- slices


@dataclass(frozen=True)
class Slice:
    column: str
    value: str
    n: int
    accuracy: float

    def describe(self) -> str:
        return f"{self.column}={self.value!r}: accuracy {self.accuracy:.4f} on {self.n} rows"

    def to_dict(self) -> dict[str, object]:
        return {"column": self.column, "value": self.value, "n": self.n, "accuracy": round(self.accuracy, 6)}


@dataclass(frozen=True)
class SliceReport:
    min_count: int
    slices: list[Slice]  # per column in the given order; within a column, lowest accuracy first
    worst: Slice | None  # lowest accuracy among slices with n >= min_count (None: no such slice)

    def to_dict(self) -> dict[str, object]:
        columns: dict[str, list[dict[str, object]]] = {}
        for s in self.slices:
            columns.setdefault(s.column, []).append({"value": s.value, "n": s.n, "accuracy": round(s.accuracy, 6)})
        return {"metric": "accuracy", "min_count": self.min_count, "columns": columns,
                "worst": self.worst.to_dict() if self.worst else None}


def slice_metrics(y_true: np.ndarray, y_pred: np.ndarray, segments: Mapping[str, np.ndarray], *,
                  min_count: int = MIN_SLICE_COUNT) -> SliceReport:
    """Accuracy and row count per value of each segment column (arrays aligned with ``y_true``).

    Within a column, slices are listed lowest accuracy first (then by value).
    The worst slice is the one with the lowest accuracy among those with at
    least ``min_count`` rows; ties go to the larger slice, then to the first
    column and value.
    """
    correct = np.asarray(y_true) == np.asarray(y_pred)
    slices: list[Slice] = []
    for column, values in segments.items():
        vals = np.asarray(values).astype(str)
        if len(vals) != len(correct):
            raise ValueError(f"segment column {column!r} has {len(vals)} values for {len(correct)} rows")
        found = []
        for value in np.unique(vals):
            mask = vals == value
            found.append(Slice(column, str(value), int(mask.sum()), float(correct[mask].mean())))
        slices += sorted(found, key=lambda s: (s.accuracy, s.value))
    eligible = [s for s in slices if s.n >= min_count]
    worst = min(eligible, key=lambda s: (s.accuracy, -s.n)) if eligible else None
    return SliceReport(min_count=min_count, slices=slices, worst=worst)


def slice_gate(report: SliceReport, threshold: float) -> str | None:
    """Why the worst slice fails ``threshold`` (an accuracy, 0–1), or None when it passes."""
    if report.worst is None:
        return (f"no slice has at least {report.min_count} test rows, so the minimum slice accuracy "
                f"{threshold:.4f} cannot be checked; use more data or fewer segment values")
    w = report.worst
    if w.accuracy < threshold:
        return (f"worst slice {w.column}={w.value!r} has accuracy {w.accuracy:.4f} on {w.n} test rows, "
                f"below the minimum slice accuracy {threshold:.4f}")
    return None
