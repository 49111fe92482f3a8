"""Evaluate an artifact with the runtime a device would use (the agent's own backends).

A classifier is scored by accuracy and gated by its drop in percentage points
against the fp32 artifact (:func:`gate`); a regression model by MAE, RMSE and
R² on its first output, and gated by how far its MAE rises above the fp32
artifact's, in the target's own units (:func:`error_gate`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.backends import Backend, IOSpec, open_backend

__all__ = ["ErrorMetrics", "Evaluation", "error_gate", "error_metrics", "evaluate", "gate", "predict_all"]


@dataclass(frozen=True)
class ErrorMetrics:
    """A regression model's errors in the target's units (R² has none): what sklearn.metrics computes."""

    mae: float
    rmse: float
    r2: float

    def to_dict(self) -> dict[str, float]:
        return {"mae": self.mae, "rmse": self.rmse, "r2": self.r2}


def error_metrics(y: np.ndarray, predicted: np.ndarray) -> ErrorMetrics:
    """MAE, RMSE and R² of ``predicted`` against ``y`` (both (n,), in float64); R² is 0 for a constant ``y``."""
    y64, p64 = np.asarray(y, dtype=np.float64).ravel(), np.asarray(predicted, dtype=np.float64).ravel()
    err = p64 - y64
    ss_tot = float(((y64 - y64.mean()) ** 2).sum()) if y64.size else 0.0
    return ErrorMetrics(mae=float(np.abs(err).mean()) if err.size else 0.0,
                        rmse=float(np.sqrt((err**2).mean())) if err.size else 0.0,
                        r2=1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else 0.0)


@dataclass(frozen=True)
class Evaluation:
    accuracy: float | None  # None for a regression model
    size: int
    latency_ms_p50: float
    outputs: np.ndarray  # model outputs on the test inputs
    input: IOSpec  # the model's input and output as its runtime reports them
    output: IOSpec
    errors: ErrorMetrics | None = None  # a regression model's, on its first output

    def metrics(self) -> dict[str, float]:
        common = {"size_bytes": float(self.size), "latency_ms_p50": round(self.latency_ms_p50, 4)}
        if self.errors is not None:
            return {k: round(v, 6) for k, v in self.errors.to_dict().items()} | common
        return {"accuracy": round(self.accuracy or 0.0, 6)} | common

    @property
    def mae(self) -> float:
        if self.errors is None:
            raise ValueError("a classifier's evaluation has no MAE")
        return self.errors.mae


def predict_all(path: Path, x: np.ndarray, runtime: str = "onnxruntime", batch: int = 64) -> np.ndarray:
    """The artifact's outputs for every row of ``x``, a batch at a time (a whole image split in one call could need
    more memory than the build has), with the runtime a device would use."""
    backend = open_backend(path, runtime)
    try:
        return _batched(backend, x, batch)
    finally:
        backend.close()


def _batched(backend: Backend, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([backend.predict(x[i : i + batch]) for i in range(0, len(x), batch)])


def evaluate(path: Path, runtime: str, x: np.ndarray, y: np.ndarray, *, latency_runs: int = 100,
             task: str = "classification") -> Evaluation:
    """Run ``x`` through the artifact; accuracy against class ids ``y``, or (``task="regression"``) the errors of
    the first output against target values ``y``."""
    backend = open_backend(path, runtime)
    try:
        outputs = _batched(backend, x, 64)
        one = x[:1]
        for _ in range(10):
            backend.predict(one)
        times = []
        for i in range(latency_runs):
            sample = x[i % len(x) : i % len(x) + 1]
            t0 = time.perf_counter()
            backend.predict(sample)
            times.append(time.perf_counter() - t0)
    finally:
        backend.close()
    latency = statistics.median(times) * 1000
    if task == "regression":
        return Evaluation(None, path.stat().st_size, latency, outputs, backend.input, backend.output,
                          errors=error_metrics(y, outputs.reshape(len(outputs), -1)[:, 0]))
    accuracy = float((outputs.argmax(1) == y).mean())
    return Evaluation(accuracy, path.stat().st_size, latency, outputs, backend.input, backend.output)


def gate(accuracy: float, baseline: float, max_drop_points: float) -> str | None:
    """Why an artifact fails the accuracy gate, or None when it passes.

    ``max_drop_points`` is in percentage points against the fp32 baseline.
    """
    drop = (baseline - accuracy) * 100
    if drop > max_drop_points + 1e-9:
        return (f"accuracy {accuracy:.4f} is {drop:.2f} points below fp32 ({baseline:.4f}); "
                f"the gate allows {max_drop_points:.2f}")
    return None


def error_gate(mae: float, baseline: float, max_rise: float) -> str | None:
    """Why a regression artifact fails the gate, or None when it passes.

    ``max_rise`` (``--max-drop``) is in the target's own units: how much higher than the fp32 artifact's MAE an
    artifact's MAE may be.
    """
    rise = mae - baseline
    if rise > max_rise + 1e-9 * max(1.0, abs(baseline)):
        return (f"MAE {mae:.6g} is {rise:.6g} above fp32 ({baseline:.6g}), in the target's units; the gate allows "
                f"{max_rise:g} (--max-drop)")
    return None
