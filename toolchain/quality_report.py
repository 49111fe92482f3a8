"""The build report's quality sections for the fp32 ONNX model: per-class metrics, the confusion matrix, slices
and permutation importance for a classifier; MAE per slice and the MAE rise per shuffled column for a regression
model. The metrics themselves are pure functions (toolchain/quality.py, toolchain/regression.py); here the model
enters, run by the agent's own ONNX Runtime backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import open_backend
from toolchain import data as datamod
from toolchain.errors import QualityGateFailed
from toolchain.evaluate import Evaluation
from toolchain.quality import confusion_matrix, per_class_metrics, permutation_importance, slice_gate, slice_metrics
from toolchain.spec import BuildSpec

__all__ = ["IMPORTANCE_MAX_ROWS", "classification_quality", "quality_note", "regression_quality"]

#: Permutation importance runs on at most this many validation rows (a seeded sample beyond it).
IMPORTANCE_MAX_ROWS = 10_000


def classification_quality(spec: BuildSpec, ds: datamod.Dataset, artifact: str, fp32: Path, base: Evaluation,
                           xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], segs: dict[str, dict[str, np.ndarray]],
                           ) -> dict[str, Any]:
    """Report sections "per_class", "confusion", "slices", "importance" for the fp32 ONNX model.

    Raises :class:`QualityGateFailed` when ``spec.min_slice_metric`` is set and the worst slice is below it.
    """
    out: dict[str, Any] = {}
    pred = base.outputs.argmax(1)
    cm = confusion_matrix(ys["test"], pred, len(ds.classes))
    out["per_class"] = {"split": "test", "artifact": artifact,
                        "classes": [m.to_dict() for m in per_class_metrics(cm, ds.classes)]}
    out["confusion"] = {"split": "test", "artifact": artifact, "rows": "true", "columns": "predicted",
                        "labels": list(ds.classes), "matrix": cm.tolist()}
    if segs["test"]:
        slices = slice_metrics(ys["test"], pred, segs["test"])
        out["slices"] = {"split": "test", "artifact": artifact, **slices.to_dict(),
                         "min_slice_metric": spec.min_slice_metric}
        if spec.min_slice_metric is not None:
            why = slice_gate(slices, spec.min_slice_metric)
            if why:
                raise QualityGateFailed(f"quality gate failed: {why}; nothing was written")
    else:
        out["slices"] = {"skipped": "the dataset declares no segment columns (schema `segments`)"}

    xv, yv = xs["validation"], ys["validation"]
    names = [f.name for f in ds.schema.features]
    if ds.kind != "tabular" or xv.ndim != 2 or xv.shape[1] != len(names):
        out["importance"] = {"skipped": f"{ds.kind} inputs shaped {list(ds.input_shape)}: single input values "
                             "mean little alone; permutation importance is computed for table columns only"}
        return out
    if len(xv) > IMPORTANCE_MAX_ROWS:
        rows = np.sort(np.random.default_rng(spec.seed).choice(len(xv), IMPORTANCE_MAX_ROWS, replace=False))
        xv, yv = xv[rows], yv[rows]
    backend = open_backend(fp32, "onnxruntime")
    try:
        imp = permutation_importance(xv, yv, lambda a: backend.predict(a).argmax(1), names,
                                     repeats=spec.importance_repeats, seed=spec.seed)
    finally:
        backend.close()
    out["importance"] = {"split": "validation", "artifact": artifact, **imp.to_dict()}
    return out


def regression_quality(spec: BuildSpec, ds: datamod.Dataset, artifact: str, fp32: Path, base: Evaluation,
                       xs: dict[str, np.ndarray], ys: dict[str, np.ndarray],
                       segs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Report sections "slices" (MAE per segment value) and "importance" (MAE rise) for a regression model."""
    from toolchain.regression import quality

    xv, yv = xs["validation"], ys["validation"]
    names = [f.name for f in ds.schema.features]
    why = None
    if ds.kind != "tabular" or xv.ndim != 2 or xv.shape[1] != len(names):
        why = f"{ds.kind} inputs shaped {list(ds.input_shape)}: permutation importance is for table columns only"
    if len(xv) > IMPORTANCE_MAX_ROWS:
        rows = np.sort(np.random.default_rng(spec.seed).choice(len(xv), IMPORTANCE_MAX_ROWS, replace=False))
        xv, yv = xv[rows], yv[rows]
    backend = open_backend(fp32, "onnxruntime")
    try:
        return quality(ys["test"], base.outputs.reshape(len(base.outputs), -1)[:, 0], segs["test"], artifact, xv, yv,
                       lambda a: backend.predict(a).reshape(len(a), -1)[:, 0], names,
                       repeats=spec.importance_repeats, seed=spec.seed, why_no_importance=why)
    finally:
        backend.close()


def quality_note(quality: dict[str, Any]) -> str:
    parts = []
    worst = quality["slices"].get("worst")
    if worst:
        metric = "mae" if "mae" in worst else "accuracy"
        parts.append(f"worst slice {worst['column']}={worst['value']} {metric} {worst[metric]:.4f}")
    features = quality["importance"].get("features")
    if features:
        parts.append(f"top feature {features[0]['name']}")
    return ", ".join(parts) or "per-class metrics"
