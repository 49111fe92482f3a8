"""Tabular CSV/Parquet, a user's torch model and an existing ONNX file all become verified bundles."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from protocol import Target, generate_signing_key, private_key_to_pem
from tests.toolchain_helpers import USER_MODEL, blobs, logistic_onnx, write_csv, write_schema
from toolchain.bundle import verify_bundle
from toolchain.data import load_schema, load_table
from toolchain.pipeline import BuildSpec, build

pytestmark = pytest.mark.integration


@pytest.fixture
def key(tmp_path):
    k = generate_signing_key()
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(k))
    return k


def test_tabular_csv_build(tmp_path, key):
    x, y = blobs()
    csv_path = write_csv(tmp_path / "vibration.csv", x, y)
    schema = write_schema(tmp_path / "schema.toml")
    result = build(BuildSpec(recipe="tabular", out=tmp_path / "b", key=tmp_path / "signing.key", data=csv_path,
                             schema=schema, epochs=20, tar=False))
    m = verify_bundle(result.out, key.public_key())
    assert m.model == "vibration" and m.labels == ["ok", "imbalance", "bearing"]
    assert {a.target for a in m.artifacts} == {Target.ONNX, Target.TFLITE, Target.TENSORRT}
    fp32 = next(a for a in m.artifacts if a.name == "vibration-onnx-fp32")
    assert fp32.metrics["accuracy"] >= 0.9
    assert m.reference is not None and m.reference.kind == "raw"
    assert [f.name for f in m.reference.features] == ["rms", "peak_hz", "kurtosis", "temp"]
    assert m.preprocessing is not None and len(m.preprocessing.mean) == 4 and m.preprocessing.in_graph
    assert m.lineage["recipe"] == "tabular" and len(m.lineage["dataset_sha256"]) == 64


def test_parquet_loads_like_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    x, y = blobs(60)
    classes = ("ok", "imbalance", "bearing")
    table = pa.table({"rms": x[:, 0], "peak_hz": x[:, 1], "kurtosis": x[:, 2], "temp": x[:, 3],
                      "fault": [classes[i] for i in y]})
    pq.write_table(table, tmp_path / "v.parquet")
    schema = load_schema(write_schema(tmp_path / "schema.toml"))
    from_parquet = load_table(tmp_path / "v.parquet", schema)
    from_csv = load_table(write_csv(tmp_path / "v.csv", x, y), schema)
    np.testing.assert_allclose(from_parquet.x, from_csv.x, atol=1e-5)
    assert (from_parquet.y == from_csv.y).all()


def test_onnx_input_build(tmp_path, key):
    x, y = blobs()
    model = logistic_onnx(tmp_path / "linear.onnx", x, y)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    result = build(BuildSpec(recipe="onnx", onnx=model, out=tmp_path / "b", key=tmp_path / "signing.key",
                             data=tmp_path / "data.npz", tar=False))
    m = verify_bundle(result.out, key.public_key())
    names = {a.name for a in m.artifacts}
    assert {"data-onnx-fp32", "data-onnx-int8", "data-tensorrt-fp16"} <= names
    assert not any(a.target is Target.TFLITE for a in m.artifacts)
    assert "needs a torch model" in result.report["skipped"]["tflite"]
    fp32 = next(a for a in m.artifacts if a.name == "data-onnx-fp32")
    assert fp32.metrics["accuracy"] >= 0.9 and fp32.runtime.onnx_opset == 17


def test_user_torch_model_build(tmp_path, key, monkeypatch):
    (tmp_path / "usernet.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usernet", None)
    import usernet

    net = usernet.Net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    x, y = blobs()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    result = build(BuildSpec(recipe="torch", model="usernet:Net", weights=tmp_path / "net.pt",
                             data=tmp_path / "data.npz", out=tmp_path / "b", key=tmp_path / "signing.key",
                             max_drop=100.0, tar=False))
    m = verify_bundle(result.out, key.public_key())
    assert m.lineage["model_class"] == "usernet:Net"
    assert {a.target for a in m.artifacts} == {Target.ONNX, Target.TFLITE, Target.TENSORRT}
    assert result.report["onnx_parity_max_abs_diff"] <= 1e-4
