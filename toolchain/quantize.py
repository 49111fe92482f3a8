"""ONNX int8 quantisation with ONNX Runtime: static, QDQ, per-channel.

Weights are int8 (per channel, symmetric); activations are uint8 with a zero
point ("U8S8"). With int8 activations ("S8S8", ONNX Runtime's default) ONNX
Runtime 1.32 on x86-64 fused only 29 of MobileNetV3-Small's 52 convolutions
into QLinearConv: the other 23 ran as float convolutions that dequantize their
int8 weights on every call, and the model ran at 4.2× its fp32 latency; with
uint8 activations all 52 fuse and it runs at 1.5× (benchmarks/
toolchain_targets.py prints the measured figures and ORT's per-operator
profile). U8S8 is also the pairing ONNX Runtime's x86 kernels are built around
(u8 × s8 dot products); on x86 CPUs without VNNI their 16-bit intermediate sums
can saturate, which the build's accuracy checks on the int8 artifact would
show as an accuracy drop.

The symmetric variant (zero points of 0 for weights and activations, int8
throughout) is the input for TensorRT, whose explicit quantisation wants
symmetric int8 scales.

ONNX Runtime's shape inference writes a file of its own into the current
directory when it gives up (``sym_shape_infer_temp.onnx``); quantisation
therefore runs with a temporary directory as the current one, and nothing of
it is left behind, whether it succeeds or fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from toolchain._quiet import quiet
from toolchain.errors import ConversionError

__all__ = ["int8_unsupported", "quantize_onnx"]

#: Loggers that ONNX Runtime's quantisation tools write warnings to (and the root logger, which some use).
_QUIET_LOGGERS = ("", "onnxruntime", "onnxruntime.tools.symbolic_shape_infer", "onnxruntime.quantization")


def int8_unsupported(domains: list[str], operators: list[str] | None = None) -> str | None:
    """Why a model using operators of ``domains`` (other than the default ONNX one) gets no int8 variant.

    ``operators``: the operators of those domains it uses, named in the reason when given.
    """
    if not domains:
        return None
    which = (", ".join(operators) if operators else
             "the classic ML operators skl2onnx and onnxmltools write, e.g. LinearClassifier, TreeEnsembleClassifier")
    return (f"int8 quantisation needs every operator in the default ONNX domain; this model uses operators of "
            f"{', '.join(domains)} ({which}), which ONNX Runtime does not quantise; the fp32 model ships")


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    """Run with ``directory`` as the current directory (what a tool writes beside itself lands there)."""
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's tools print and log progress of their own; keep the CLI's output ours."""
    with quiet(_QUIET_LOGGERS, logging.CRITICAL):
        yield


class _Reader:
    def __init__(self, name: str, data: np.ndarray, batch: int = 8) -> None:
        self._batches = iter([{name: data[i : i + batch]} for i in range(0, len(data), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # part of ORT's reader interface; one pass is all we use
        pass


def quantize_onnx(src: Path, dst: Path, calibration: np.ndarray, *, symmetric: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = src.resolve(), dst.resolve()  # the tools run in a temporary directory
    graph = onnx.load(str(src), load_external_data=False).graph  # the input's name, read from the file
    weights = {init.name for init in graph.initializer}
    name = next(i.name for i in graph.input if i.name not in weights)
    reader = type("CalibrationReader", (_Reader, CalibrationDataReader), {})(name, calibration.astype(np.float32))
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
    activations = QuantType.QInt8 if symmetric else QuantType.QUInt8  # see the module docstring
    try:
        with tempfile.TemporaryDirectory(prefix="edgeherd-quantize.") as tmp, _inside(Path(tmp)), _quiet():
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre))
            quantize_static(
                str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=activations, weight_type=QuantType.QInt8, extra_options=extra,
            )
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConversionError(f"ONNX int8 quantisation failed: {type(exc).__name__}: {detail}") from None
