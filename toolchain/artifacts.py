"""What the build decides about each artifact, as functions of values: the candidates TensorRT gets, the smoke
expectation a device checks, the runtime it needs, the metrics and the lineage the manifest records. No I/O here
beyond reading an ONNX file's opset; the pipeline (toolchain/pipeline.py) runs the steps around them."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import IOSpec
from protocol import (
    Precision,
    RuntimeRequirement,
    ShapeRange,
    SmokeExpectation,
    Target,
    TensorRTBuild,
    TensorSpec,
)
from protocol.version import __version__
from toolchain import data as datamod
from toolchain.evaluate import Evaluation
from toolchain.spec import BuildSpec

__all__ = ["ORT_FOR_OPSET", "TRT_CAPABILITIES", "Candidate", "artifact_metrics", "code_revision", "lineage",
           "runtime_requirement", "smoke_expectation", "tensor_spec", "tensorrt_candidates"]

#: ONNX opset -> first ONNX Runtime release that runs it.
ORT_FOR_OPSET = {17: "1.13.0", 18: "1.14.0", 19: "1.16.0", 20: "1.17.0", 21: "1.20.0", 22: "1.20.0", 23: "1.22.0"}
#: GPUs the TensorRT settings are meant for: Jetson Xavier 7.2, Orin 8.7; x86 T4/A100/A10/L4/H100.
TRT_CAPABILITIES = ["7.2", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"]


@dataclass
class Candidate:
    """An artifact the build made, before the gate decides whether it enters the bundle."""

    name: str
    target: Target
    precision: Precision
    path: Path
    runtime: str
    evaluation: Evaluation | None = None
    tensorrt: TensorRTBuild | None = None

    @property
    def evaluated(self) -> Evaluation:
        if self.evaluation is None:
            raise RuntimeError(f"{self.name} was not evaluated")
        return self.evaluation


def tensor_spec(spec: IOSpec, name: str) -> TensorSpec:
    dtype = spec.dtype if spec.dtype in ("float32", "float16", "int8", "uint8", "int32", "int64") else "float32"
    return TensorSpec(name=name or spec.name, shape=list(spec.shape), dtype=dtype,  # type: ignore[arg-type]
                      scale=spec.scale if spec.quantized else None,
                      zero_point=spec.zero_point if spec.quantized else None)


def tensorrt_candidates(name: str, fp32: Path, sym: Path | None, domains: list[str], input_name: str,
                        shape: list[int], skipped: dict[str, str]) -> list[Candidate]:
    """The TensorRT engines a device builds from the bundle's ONNX files (fp16 from fp32, int8 from the symmetric
    int8 model); what cannot be had goes into ``skipped`` with the reason."""
    inputs: list[tuple[Precision, Path]] = [(Precision.FP16, fp32)]
    if domains:
        skipped["tensorrt"] = (f"TensorRT's ONNX parser reads operators of the default ONNX domain only; this "
                               f"model uses operators of {', '.join(domains)}")
        inputs = []
    elif sym is None:
        skipped["tensorrt-int8"] = "needs the symmetric int8 ONNX model, which was not made (see onnx-int8)"
    else:
        inputs.append((Precision.INT8, sym))
    return [Candidate(
        f"{name}-tensorrt-{prec.value}", Target.TENSORRT, prec, path, "onnxruntime",
        tensorrt=TensorRTBuild(
            precision=prec, workspace_bytes=256 * 1024**2,
            profiles=[ShapeRange(input=input_name, min=[1, *shape], opt=[1, *shape], max=[32, *shape])],
            compute_capabilities=TRT_CAPABILITIES, min_tensorrt="10.0", validated_on=[],
        ),
    ) for prec, path in inputs]


def smoke_expectation(c: Candidate, outputs: np.ndarray, golden_labels: list[int] | None,
                      y_train: np.ndarray) -> SmokeExpectation:
    """What a device must see on the golden inputs before it switches: the outputs within a tolerance, and for a
    classifier the share of top-1 classes that agree with the fp32 model's."""
    rows = [[float(v) for v in row] for row in outputs]
    if golden_labels is None:  # regression: a tolerance in the target's units, no top-1 agreement
        from toolchain.regression import smoke_atol

        return SmokeExpectation(outputs=rows, atol=smoke_atol(y_train, outputs, c.target, c.precision))
    agreement = float((outputs.argmax(1) == np.array(golden_labels)).mean())
    span = float(np.abs(outputs).max()) or 1.0
    atol = 1e-3 * span if c.precision is Precision.FP32 and c.target is not Target.TENSORRT else 0.05 * span
    return SmokeExpectation(outputs=rows, atol=atol, min_agreement=agreement)


def runtime_requirement(c: Candidate) -> RuntimeRequirement:
    if c.runtime != "onnxruntime":
        return RuntimeRequirement(name="ai-edge-litert", min_version=dist_version("ai-edge-litert"))
    from toolchain.export import onnx_opset

    opset = onnx_opset(c.path)
    return RuntimeRequirement(
        name="tensorrt" if c.target is Target.TENSORRT else "onnxruntime",
        min_version="10.0" if c.target is Target.TENSORRT else ORT_FOR_OPSET.get(opset, "1.17.0"),
        onnx_opset=opset)


def artifact_metrics(ev: Evaluation, base: Evaluation, c: Candidate, regression: bool) -> dict[str, float]:
    metrics = ev.metrics() | ({"mae_rise": round(ev.mae - base.mae, 6)} if regression else
                              {"accuracy_drop_points": round(((base.accuracy or 0.0) - (ev.accuracy or 0.0)) * 100,
                                                             4)})
    if c.target is Target.TENSORRT:
        metrics["measured_with_onnxruntime"] = 1.0
    return metrics


def code_revision() -> str | None:
    """The git commit of this edgeherd checkout, when it is one (``+dirty`` with local changes)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],  # noqa: S603, S607
                             capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],  # noqa: S603, S607
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


def lineage(spec: BuildSpec, ds: datamod.Dataset, splits: dict[str, np.ndarray], report: dict[str, Any], *,
            trained_torch: bool, revision: str | None) -> dict[str, str]:
    """The manifest's lineage: where the data came from, how it was split, what built the model."""
    import hashlib

    regression = ds.task == "regression"
    split_digest = hashlib.sha256(b"".join(splits[k].astype("<i8").tobytes() for k in datamod.SPLITS))
    out = {
        "recipe": spec.recipe, "dataset_sha256": ds.sha256, "dataset_source": ds.source[-256:],
        "seed": str(spec.seed), "edgeherd": __version__,
        ("max_mae_rise" if regression else "max_drop_points"): str(spec.max_drop),
        "split_sizes": "/".join(str(len(splits[k])) for k in datamod.SPLITS),
        "split_sha256": split_digest.hexdigest(), "onnxruntime": dist_version("onnxruntime"),
    }
    if "training" in report:
        out["epochs"] = str(report["training"]["epochs"])
        out["train_device"] = report["training"]["device"][:256]
    worst = report["slices"].get("worst")
    metric = "mae" if regression else "accuracy"
    if worst:
        out["worst_slice"] = f"{worst['column']}={worst['value']} {metric} {worst[metric]:.4f} n {worst['n']}"[:256]
    if report["importance"].get("features"):
        top = report["importance"]["features"][0]
        out["top_feature"] = f"{top['name']} {'MAE rise' if regression else 'accuracy drop'} {top['mean']:.4f}"
    if regression:
        out["target"] = ds.schema.label
    if revision:
        out["code_revision"] = revision
    if trained_torch:
        out["torch"] = dist_version("torch")
    if spec.parent:
        out["parent_version"] = spec.parent
    if spec.model:
        out["model_class"] = spec.model
    if "onnx_input" in report:
        out["onnx_output"] = report["onnx_input"]["output"]
    return out
