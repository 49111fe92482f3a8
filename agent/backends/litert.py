"""LiteRT backend: ``ai_edge_litert`` first, ``tflite_runtime`` as a legacy fallback.

Static int8 models may take or return int8 tensors; this backend quantises
inputs and dequantises outputs with the scale and zero point the interpreter
reports, so callers always speak float32. Models with a dynamic batch
dimension are resized to the batch at hand; models converted with a fixed
batch (their graph often reshapes to it) run the batch one slice at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends._base import IOSpec, check_input, dequantize, inference_failed, quantize
from agent.errors import InputError, ModelLoadError, RuntimeMissing

log = logging.getLogger(__name__)


def _interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"
    except ImportError:
        raise RuntimeMissing(
            "no LiteRT runtime is installed: pip install 'edgeherd[tflite]' (ai-edge-litert)"
        ) from None


def _spec(detail: dict[str, Any]) -> IOSpec:
    scale, zero = detail.get("quantization", (0.0, 0))
    shape = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
    return IOSpec(detail["name"], shape, np.dtype(detail["dtype"]).name, float(scale), int(zero))


class LiteRTBackend:
    def __init__(self, path: Path, *, threads: int = 1) -> None:
        cls, self.runtime = _interpreter_class()
        try:
            self.interp = cls(model_path=str(path), num_threads=threads)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{self.runtime} cannot load {path}: {exc}") from None
        ins, outs = self.interp.get_input_details(), self.interp.get_output_details()
        if len(ins) != 1 or not outs:
            raise ModelLoadError(f"{path}: expected one input and at least one output, got {len(ins)} inputs")
        self._in, self._out = ins[0]["index"], outs[0]["index"]
        raw_in, self.output = _spec(ins[0]), _spec(outs[0])
        # callers may send any batch size, so report the batch dimension as dynamic
        self.input = IOSpec(raw_in.name, (-1, *raw_in.shape[1:]), raw_in.dtype, raw_in.scale, raw_in.zero_point)
        self._raw_in = raw_in
        self._batch = int(ins[0]["shape"][0])
        self._dynamic = raw_in.shape[0] == -1
        log.info("loaded %s with %s", path, self.runtime)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.input, x)
        if self._dynamic or x.shape[0] == self._batch:
            return self._run(x)
        step = self._batch
        if x.shape[0] % step:
            raise InputError(f"this model takes batches of a multiple of {step}, got {x.shape[0]}")
        return np.concatenate([self._run(x[i : i + step]) for i in range(0, x.shape[0], step)])

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            if x.shape[0] != self._batch:
                self._batch = -1  # resized again on the next call should this fail half-way
                self.interp.resize_tensor_input(self._in, list(x.shape))
                self.interp.allocate_tensors()
                self._batch = x.shape[0]
            feed = quantize(self._raw_in, x) if self._raw_in.quantized else x.astype(self._raw_in.dtype, copy=False)
            self.interp.set_tensor(self._in, feed)
            self.interp.invoke()
            out = self.interp.get_tensor(self._out)
        except (RuntimeError, ValueError) as exc:  # the interpreter reports kernel failures as RuntimeError
            raise inference_failed(self.runtime, exc) from exc
        return dequantize(self.output, out) if self.output.quantized else np.array(out, dtype=np.float32)

    def close(self) -> None:
        del self.interp
