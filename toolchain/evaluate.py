"""Evaluate an artifact with the runtime a device would use (the agent's own backends)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.backends import IOSpec, open_backend

__all__ = ["Evaluation", "evaluate", "gate"]


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    size: int
    latency_ms_p50: float
    outputs: np.ndarray  # model outputs on the test inputs
    input: IOSpec  # the model's input and output as its runtime reports them
    output: IOSpec

    def metrics(self) -> dict[str, float]:
        return {"accuracy": round(self.accuracy, 6), "size_bytes": float(self.size),
                "latency_ms_p50": round(self.latency_ms_p50, 4)}


def evaluate(path: Path, runtime: str, x: np.ndarray, y: np.ndarray, *, latency_runs: int = 100) -> Evaluation:
    backend = open_backend(path, runtime)
    try:
        outputs = np.concatenate([backend.predict(x[i : i + 64]) for i in range(0, len(x), 64)])
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
    accuracy = float((outputs.argmax(1) == y).mean())
    return Evaluation(accuracy, path.stat().st_size, statistics.median(times) * 1000, outputs, backend.input,
                      backend.output)


def gate(accuracy: float, baseline: float, max_drop_points: float) -> str | None:
    """Why an artifact fails the accuracy gate, or None when it passes.

    ``max_drop_points`` is in percentage points against the fp32 baseline.
    """
    drop = (baseline - accuracy) * 100
    if drop > max_drop_points + 1e-9:
        return (f"accuracy {accuracy:.4f} is {drop:.2f} points below fp32 ({baseline:.4f}); "
                f"the gate allows {max_drop_points:.2f}")
    return None
