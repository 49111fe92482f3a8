"""Small datasets and models the toolchain tests make for themselves."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SCHEMA = """\
label = "fault"
classes = ["ok", "imbalance", "bearing"]

[[features]]
name = "rms"
min = -10.0
max = 10.0

[[features]]
name = "peak_hz"
min = -10.0
max = 10.0

[[features]]
name = "kurtosis"
min = -10.0
max = 10.0

[[features]]
name = "temp"
min = -10.0
max = 10.0
"""


def blobs(n: int = 600, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated classes in four features."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = np.array([[0, 0, 0, 0], [2.5, -2, 1, 0], [-2, 2.5, -1, 1]], dtype=np.float64)
    x = centres[y] + rng.normal(0, 0.6, size=(n, 4))
    return x.astype(np.float32), y.astype(np.int64)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, classes: tuple[str, ...] = ("ok", "imbalance", "bearing"),
              ) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rms", "peak_hz", "kurtosis", "temp", "fault"])
        for row, label in zip(x, y, strict=True):
            w.writerow([*(f"{v:.6f}" for v in row), classes[int(label)]])
    return path


def write_schema(path: Path, text: str = SCHEMA) -> Path:
    path.write_text(text)
    return path


def logistic_onnx(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A linear classifier as a hand-made ONNX graph (MatMul + Add), fitted with scikit-learn."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=500).fit(x, y)
    w = numpy_helper.from_array(clf.coef_.T.astype(np.float32), "W")
    b = numpy_helper.from_array(clf.intercept_.astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["z"]), helper.make_node("Add", ["z", "B"], ["logits"])],
        "logistic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", x.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", len(clf.classes_)])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


USER_MODEL = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)
"""
