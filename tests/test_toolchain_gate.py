"""The int8 accuracy gate decides what ships: an artifact it rejects is recorded in the build report and the
model card, left out of the manifest, the artifacts directory and the tar, and named in the CLI's output.

The model is a hand-made ONNX graph that int8 quantisation must break: it answers which of two inputs is the
larger, on inputs spread over [-100, 100] that differ by 0.05 to 0.2. fp32 gets every row right; int8
activations step by about 0.8 over that range, so the quantised models get about half of them wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from protocol import Precision, generate_signing_key, private_key_to_pem
from tests.model_helpers import _save
from toolchain.bundle import verify_bundle
from toolchain.pipeline import BuildSpec, build

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
NAME = "close"
INT8 = {f"{NAME}-onnx-int8", f"{NAME}-tensorrt-int8"}
KEPT = {f"{NAME}-onnx-fp32", f"{NAME}-tensorrt-fp16"}


def close_call_onnx(path: Path) -> Path:
    """Logits (x0 - x1, x1 - x0): class 0 when the first input is the larger."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"])], "close_call",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
                              initializer=[w])
    return _save(graph, path)


def close_call_data(path: Path, n: int = 400) -> Path:
    """``n`` rows (x, y) for :func:`close_call_onnx`: label 1 when the second input is the larger."""
    rng = np.random.default_rng(0)
    base = rng.uniform(-100, 100, n)
    gap = rng.uniform(0.05, 0.2, n) * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    x = np.stack([base + gap, base], axis=1).astype(np.float32)
    np.savez(path, x=x, y=(x[:, 0] < x[:, 1]).astype(np.int64))
    return path


@pytest.fixture
def inputs(tmp_path):
    key = generate_signing_key()
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(key))
    return key, close_call_onnx(tmp_path / "close.onnx"), close_call_data(tmp_path / "close.npz")


def test_an_artifact_the_gate_rejects_is_reported_and_left_out_of_the_bundle(tmp_path, inputs):
    key, model, data = inputs
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [str(BIN / "edgeherd"), "build", "onnx", "--onnx", str(model), "--data", str(data), "--name", NAME,
         "--max-drop", "0", "--out", str(out), "--key", str(tmp_path / "signing.key")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr

    report = json.loads((out / "build-report.json").read_text())
    assert set(report["rejected"]) == INT8, report["rejected"]
    for why in report["rejected"].values():
        assert "points below fp32 (1.0000); the gate allows 0.00" in why

    m = verify_bundle(out, key.public_key())
    assert {a.name for a in m.artifacts} == KEPT
    assert all(a.metrics["accuracy"] == 1.0 and a.metrics["accuracy_drop_points"] == 0.0 for a in m.artifacts)
    # fp32 and the TensorRT fp16 build share one ONNX file: nothing else may sit in the bundle
    shipped = {a.sha256 for a in m.artifacts}
    assert {p.name for p in (out / "artifacts").iterdir()} == shipped
    with tarfile.open(out.with_name(out.name + ".tar")) as tar:
        packed = {Path(n).name for n in tar.getnames() if n.startswith("artifacts/")}
    assert packed == shipped

    card = (out / "MODEL_CARD.md").read_text()
    for name in INT8:
        assert f"**{name}**" in card
        assert f"left out {name}: accuracy " in proc.stdout
    assert not any(f"│ {name}" in proc.stdout for name in INT8)  # not in the table of what was built


def test_the_same_int8_artifacts_ship_when_the_gate_allows_their_drop(tmp_path, inputs):
    """The control: with room for the drop, the int8 models build, pass and ship with their measured drop."""
    key, model, data = inputs
    result = build(BuildSpec(recipe="onnx", onnx=model, data=data, name=NAME, out=tmp_path / "bundle",
                             key=tmp_path / "signing.key", max_drop=100.0, tar=False))
    assert result.rejected == {} and result.report["rejected"] == {}
    m = verify_bundle(result.out, key.public_key())
    assert {a.name for a in m.artifacts} == KEPT | INT8
    for a in m.artifacts:
        if a.precision is Precision.INT8:
            assert a.metrics["accuracy_drop_points"] > 20, (a.name, a.metrics)  # what the strict gate refused
    assert len(list((result.out / "artifacts").iterdir())) == 3  # fp32 (shared by fp16), int8, symmetric int8
