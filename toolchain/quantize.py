"""ONNX int8 quantisation with ONNX Runtime: static, QDQ, per-channel.

The symmetric variant (zero points of 0 for weights and activations) is the
input for TensorRT, whose explicit quantisation wants symmetric scales.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from toolchain.errors import ConversionError

__all__ = ["quantize_onnx"]


class _Reader:
    def __init__(self, name: str, data: np.ndarray, batch: int = 8) -> None:
        self._batches = iter([{name: data[i : i + batch]} for i in range(0, len(data), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # part of ORT's reader interface; one pass is all we use
        pass


def quantize_onnx(src: Path, dst: Path, calibration: np.ndarray, *, symmetric: bool = False) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    reader = type("CalibrationReader", (_Reader, CalibrationDataReader), {})(name, calibration.astype(np.float32))
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(logging.WARNING)
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre))
            quantize_static(
                str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, extra_options=extra,
            )
    except Exception as exc:
        raise ConversionError(f"ONNX int8 quantisation failed: {type(exc).__name__}: {exc}") from None
