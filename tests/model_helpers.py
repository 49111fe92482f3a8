"""Tiny hand-made ONNX models that misbehave on purpose, and signed bundles around a given model file."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from protocol import (
    ArtifactEntry,
    GoldenSet,
    Manifest,
    Precision,
    RuntimeRequirement,
    SignedManifest,
    SmokeExpectation,
    Target,
    TensorSpec,
    encode_model,
    manifest_digest,
)
from protocol.signing import Ed25519PrivateKey, sign_manifest

#: Rows of the lookup model's table: a first input column outside [-ROWS, ROWS) makes its Gather fail.
ROWS = 4
CLASSES = 3


def lookup_onnx(path: Path, *, clip: bool = False) -> Path:
    """A classifier of 2 features whose logits are a table row chosen by the first feature (cast to an index)
    plus a linear term of both. ONNX Runtime refuses an index outside the table at run time, so inputs whose
    first value is >= 4 or < -4 fail; ``clip=True`` clips the index into the table first (the fixed model)."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(ROWS * CLASSES, dtype=np.float32).reshape(ROWS, CLASSES) / 10
    weights = np.array([[0.5, -0.5, 0.0], [0.0, 0.25, -0.25]], dtype=np.float32)
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weights, "W"),
             numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([1], np.int64), "end"),
             numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, CLASSES], np.int64), "flat"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(ROWS - 1, np.float32), "hi")]
    nodes = [helper.make_node("Slice", ["x", "start", "end", "axes"], ["first"])]
    if clip:
        nodes.append(helper.make_node("Clip", ["first", "lo", "hi"], ["first_in_table"]))
    nodes += [
        helper.make_node("Cast", ["first_in_table" if clip else "first"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["rows"], axis=0),
        helper.make_node("Reshape", ["rows", "flat"], ["looked_up"]),
        helper.make_node("MatMul", ["x", "W"], ["linear"]),
        helper.make_node("Add", ["looked_up", "linear"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])],
                              initializer=inits)
    return _save(graph, path)


def lookup_tflite(path: Path) -> Path:
    """:func:`lookup_onnx`'s failing model for LiteRT, converted from torch by the toolchain's exporter: the
    interpreter refuses a first input value outside the table's 4 rows."""
    import torch

    from toolchain.export import export_tflite

    class Lookup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.arange(ROWS * CLASSES, dtype=torch.float32).reshape(ROWS, CLASSES))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.table[x[:, 0].long()] + x[:, 1:]

    path.parent.mkdir(parents=True, exist_ok=True)
    export_tflite(Lookup(), np.zeros((1, 2), np.float32), path)
    return path


def sqrt_onnx(path: Path) -> Path:
    """Logits = sqrt(x) over 3 features: NaN wherever an input is negative."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["logits"])], "sqrt",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])])
    return _save(graph, path)


def _save(graph: object, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def onnx_manifest(model_file: Path, *, model: str = "lookup", version: str = "1.0.0", features: int = 2,
                  classes: int = CLASSES, golden: list[list[float]] | None = None,
                  smoke: SmokeExpectation | None = None) -> Manifest:
    """The manifest of a bundle whose one artifact ("<model>-onnx-fp32") is ``model_file``."""
    data = model_file.read_bytes()
    art = ArtifactEntry(name=f"{model}-onnx-fp32", target=Target.ONNX, precision=Precision.FP32,
                        sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                        runtime=RuntimeRequirement(name="onnxruntime", min_version="1.17.0", onnx_opset=17),
                        inputs=[TensorSpec(name="x", shape=[-1, features], dtype="float32")],
                        outputs=[TensorSpec(name="logits", shape=[-1, classes], dtype="float32")], smoke=smoke)
    return Manifest(model=model, version=version, created_at=datetime.now(timezone.utc), task="classification",
                    labels=[f"class-{i}" for i in range(classes)], artifacts=[art],
                    golden=GoldenSet(inputs=golden) if golden is not None else None)


def onnx_bundle(path: Path, key: Ed25519PrivateKey, model_file: Path, **manifest: object
                ) -> tuple[Path, SignedManifest, str]:
    """A signed bundle directory around ``model_file`` (see :func:`onnx_manifest` for ``manifest``'s keys);
    (dir, signed manifest, manifest digest)."""
    m = onnx_manifest(model_file, **manifest)  # type: ignore[arg-type]
    (path / "artifacts").mkdir(parents=True)
    (path / "artifacts" / m.artifacts[0].sha256).write_bytes(model_file.read_bytes())
    signed = sign_manifest(m, key)
    (path / "manifest.json").write_bytes(encode_model(signed))
    return path, signed, manifest_digest(m)
