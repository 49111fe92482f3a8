"""What a regression build does differently from a classifier's: the model's output in the target's own units, its
error metrics on slices and per feature, its output bins for drift, its golden rows and smoke tolerance.

- :class:`Destandardized`: ``core(x) * std + mean``. The network learns a
  standardised target (toolchain/train.py) and the exported graph turns its
  output back into the target's units, so devices, golden vectors and metrics
  all speak those units.
- :func:`quality`: MAE per segment value (slices) and permutation importance
  as the rise in MAE when one input column is shuffled; the report sections
  ``slices`` and ``importance`` with the same shape as a classifier's, MAE in
  place of accuracy.
- :func:`with_output_bins`: the reference profile's ``output_edges`` (about
  ten quantile bins of the fp32 model's training predictions) and their counts
  in ``class_counts``; devices count their outputs on the same bins
  (:func:`agent.window.output_bin_counts`) and the server scores the output's
  drift on them.
- :func:`smoke_atol`: the smoke test's absolute tolerance, from the target's
  spread and the artifact's precision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.window import output_bin_counts
from protocol import Precision, ReferenceProfile, Target
from toolchain.evaluate import error_metrics
from toolchain.profile import feature_edges
from toolchain.quality import MIN_SLICE_COUNT

__all__ = ["Destandardized", "golden_rows", "importance", "quality", "slices", "smoke_atol", "with_output_bins"]

Predict = Callable[[np.ndarray], np.ndarray]
#: Output bins of a regression model's reference profile (quantiles of its training predictions).
OUTPUT_BINS = 10


class Destandardized(nn.Module):
    """``core(x) * std + mean``: the target's de-standardisation travels inside the exported graph."""

    def __init__(self, core: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("target_mean", torch.tensor([mean], dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor([std], dtype=torch.float32))

    target_mean: torch.Tensor
    target_std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.core(x) * self.target_std + self.target_mean
        return out


def with_output_bins(reference: ReferenceProfile, predictions: np.ndarray) -> ReferenceProfile:
    """``reference`` with a regression model's output bins: ``output_edges`` from the training predictions,
    ``class_counts`` the predictions on them; no class labels' counts, no confidence histogram."""
    values = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)[:, 0]
    edges, _ = feature_edges(values, OUTPUT_BINS)
    counts = output_bin_counts(values, edges)
    fields = reference.model_dump(by_alias=True) | {
        "class_counts": [int(c) for c in counts], "output_edges": edges,
        "confidence_edges": None, "confidence_counts": None}
    return ReferenceProfile.model_validate(fields)


def golden_rows(y: np.ndarray, k: int = 8) -> np.ndarray:
    """``k`` test rows spread over the target's range: the rows nearest to ``k`` evenly spaced quantiles."""
    order = np.argsort(y, kind="stable")
    picks = np.unique(np.round(np.linspace(0, len(y) - 1, min(k, len(y)))).astype(np.int64))
    return np.sort(order[picks])


def smoke_atol(y_train: np.ndarray, golden_outputs: np.ndarray, target: Target, precision: Precision) -> float:
    """The smoke test's tolerance on a regression artifact's golden outputs, in the target's units.

    The device runs the same file as the build, so an fp32 ONNX artifact differs only by floating-point order
    (1e-3 of the target's spread, plus 1e-5 of the outputs' magnitude for a target far from zero); an int8 or
    TFLite artifact's kernels differ more between CPUs, and a TensorRT engine is built on the device at another
    precision than the ONNX Runtime run that made the expected outputs: 5 % of the spread.
    """
    spread = float(np.std(y_train)) or 1.0
    magnitude = float(np.abs(golden_outputs).max()) if golden_outputs.size else 0.0
    exact = precision is Precision.FP32 and target is not Target.TENSORRT
    return (1e-3 if exact else 0.05) * spread + 1e-5 * magnitude


def slices(y: np.ndarray, predicted: np.ndarray, segments: Mapping[str, np.ndarray],
           min_count: int = MIN_SLICE_COUNT) -> dict[str, Any]:
    """MAE per value of each segment column; the worst is the highest MAE among slices of ``min_count`` rows."""
    columns: dict[str, list[dict[str, Any]]] = {}
    worst: dict[str, Any] | None = None
    for column, values in segments.items():
        rows: list[dict[str, Any]] = []
        for value in np.unique(values):
            at = values == value
            m = error_metrics(y[at], predicted[at])
            rows.append({"value": str(value), "n": int(at.sum()), "mae": round(m.mae, 6), "rmse": round(m.rmse, 6)})
        rows.sort(key=lambda r: (-r["mae"], r["value"]))
        columns[column] = rows
        for r in rows:
            if r["n"] >= min_count and (worst is None or r["mae"] > worst["mae"]):
                worst = {"column": column, **r}
    return {"metric": "mae", "min_count": min_count, "columns": columns, "worst": worst}


def importance(x: np.ndarray, y: np.ndarray, predict: Predict, names: Sequence[str], *, repeats: int, seed: int
               ) -> dict[str, Any]:
    """Permutation importance: the rise in MAE (target units) when one column is shuffled, ``repeats`` times."""
    rng = np.random.default_rng(seed)
    baseline = error_metrics(y, predict(x)).mae
    features: list[dict[str, Any]] = []
    for j, name in enumerate(names):
        rises = []
        for _ in range(repeats):
            shuffled = x.copy()
            shuffled[:, j] = shuffled[rng.permutation(len(x)), j]
            rises.append(error_metrics(y, predict(shuffled)).mae - baseline)
        features.append({"name": name, "mean": round(float(np.mean(rises)), 6), "std": round(float(np.std(rises)), 6)})
    features.sort(key=lambda f: -float(f["mean"]))
    return {"metric": "mae", "baseline_mae": round(baseline, 6), "rows": len(x), "repeats": repeats, "seed": seed,
            "features": features}


def quality(y_test: np.ndarray, predicted_test: np.ndarray, segments_test: Mapping[str, np.ndarray],
            artifact: str, xv: np.ndarray, yv: np.ndarray, predict: Predict | None, names: Sequence[str], *,
            repeats: int, seed: int, why_no_importance: str | None) -> dict[str, Any]:
    """Report sections for a regression model's fp32 artifact: ``per_class`` and ``confusion`` say why they are
    not computed, ``slices`` holds MAE per segment value, ``importance`` the MAE rise per feature."""
    out: dict[str, Any] = {
        "per_class": {"skipped": "a regression model has no classes; see the MAE, RMSE and R² per artifact"},
        "confusion": {"skipped": "a regression model has no classes"},
    }
    if segments_test:
        out["slices"] = {"split": "test", "artifact": artifact, **slices(y_test, predicted_test, segments_test)}
    else:
        out["slices"] = {"skipped": "the dataset declares no segment columns (schema `segments`)"}
    if predict is None or why_no_importance is not None:
        out["importance"] = {"skipped": why_no_importance or "not computed"}
    else:
        out["importance"] = {"split": "validation", "artifact": artifact,
                             **importance(xv, yv, predict, names, repeats=repeats, seed=seed)}
    return out
