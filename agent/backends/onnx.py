"""ONNX Runtime backend (CPU execution provider).

A model may have several outputs (a converter's label and probabilities): the backend runs one, named by
``output`` (the manifest's declared output), or the model's first output when no name is given. The output it
runs must be a numeric tensor: a sequence or map output (e.g. a ZipMap) is refused when the model is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends._base import IOSpec, check_input, inference_failed
from agent.errors import ModelLoadError, RuntimeMissing

log = logging.getLogger(__name__)

_FLOAT32 = np.dtype(np.float32)
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def _spec(node: Any) -> IOSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
    return IOSpec(node.name, shape, _ORT_TYPES.get(node.type, node.type))


def _pick(path: Path, outputs: list[Any], name: str | None) -> Any:
    """The output named ``name`` (the first one without a name); a numeric tensor, or ModelLoadError."""
    listing = ", ".join(f"{o.name} ({o.type})" for o in outputs)
    if name is None:
        chosen = outputs[0]
    else:
        chosen = next((o for o in outputs if o.name == name), None)
        if chosen is None:
            raise ModelLoadError(f"{path} has no output {name!r}, which its manifest declares; its outputs are: "
                                 f"{listing}")
    if not str(chosen.type).startswith("tensor(") or chosen.type == "tensor(string)":
        raise ModelLoadError(f"{path}: output {chosen.name!r} is {chosen.type}, not a tensor; the agent serves "
                             f"a numeric tensor output (its outputs are: {listing})")
    return chosen


class OnnxRuntimeBackend:
    runtime = "onnxruntime"

    def __init__(self, path: Path, *, threads: int = 1, output: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeMissing("onnxruntime is not installed: pip install 'edgeherd[onnx]'") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/… types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelLoadError(f"{path}: expected one input and at least one output, got {len(inputs)} inputs")
        self.input, self.output = _spec(inputs[0]), _spec(_pick(path, outputs, output))
        # a failed run is raised as InferenceError and logged by the agent (throttled); ORT's own error line
        # per failed request would flood the device's log
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        # Per call: the compiled session's own ``run``. The Python wrapper's ``InferenceSession.run`` checks the
        # feed's names and OrtValue ownership and handles execution-provider fallback, none of which applies
        # here (one input, named by us, as a validated numpy array; CPU provider only); where the wrapper has no
        # such attribute, its public ``run`` is used.
        self._run = getattr(self.session, "_sess", self.session).run
        self._output_names = [self.output.name]
        self._input_name = self.input.name
        log.info("loaded %s with onnxruntime %s", path, ort.__version__)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.input, x)
        try:
            out = self._run(self._output_names, {self._input_name: x}, self._run_options)[0]
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument/RuntimeException types
            raise inference_failed(self.runtime, exc) from exc
        return out if type(out) is np.ndarray and out.dtype is _FLOAT32 else np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        del self.session, self._run
