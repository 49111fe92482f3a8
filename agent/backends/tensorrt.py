"""TensorRT backend: build an engine from the bundle's ONNX file on the device, cache it, run it.

Engines are not portable across GPU architectures or TensorRT versions, so
the bundle carries the ONNX model and build settings
(:class:`protocol.TensorRTBuild`); the first load on a device builds the
engine with the ONNX parser, the settings' precision flag and optimisation
profile, and stores it under a key of (model sha256, TensorRT version, GPU
compute capability, precision). A reinstall or a reboot then loads the cached
engine instead of rebuilding. The same code serves as a build worker on any
machine whose fingerprint matches the devices'.

Written against the TensorRT 10 Python API (``tensorrt``) and CUDA through
``cuda-python``; execution uses the tensor-address API
(``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``).
TensorRT cannot be installed on the machines this project is built and
tested on, so this module's GPU paths are exercised only on a device; the
tests of the pure parts (cache key, shapes) run everywhere and the GPU tests
skip, saying so.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends._base import IOSpec, check_input
from agent.errors import BackendError, InferenceError, InputError, ModelLoadError, RuntimeMissing
from hardware.files import atomic_write
from protocol import TensorRTBuild

__all__ = ["TensorRTBackend", "engine_cache_key"]

log = logging.getLogger(__name__)


def engine_cache_key(model_sha256: str, trt_version: str, compute_capability: str, precision: str) -> str:
    """File name of a cached engine: every input that makes an engine unportable is in it."""
    cc = compute_capability.replace(".", "")
    return f"{model_sha256[:32]}-trt{trt_version}-sm{cc}-{precision}.engine"


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise RuntimeMissing("the TensorRT backend needs cuda-python: pip install cuda-python") from None
    return cudart


def _check(result: Any, error: type[BackendError] = ModelLoadError) -> Any:
    """The value of a cuda-python call, or ``error`` (ModelLoadError while loading, InferenceError while
    running) when it failed."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise error(f"CUDA call failed with error {err}; check the GPU's state (nvidia-smi / tegrastats) and the "
                    "agent's log")
    return rest[0] if len(rest) == 1 else rest


class TensorRTBackend:
    runtime = "tensorrt"

    def __init__(self, path: Path, settings: TensorRTBuild, cache_dir: Path) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeMissing("tensorrt is not installed (it ships with JetPack, or pip install tensorrt)"
                                 ) from None
        self._trt = trt
        self._cudart = _cudart()
        props = _check(self._cudart.cudaGetDeviceProperties(0))
        self.compute_capability = f"{props.major}.{props.minor}"
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached = cache_dir / engine_cache_key(sha, trt.__version__, self.compute_capability,
                                              settings.precision.value)
        self._logger = trt.Logger(trt.Logger.WARNING)
        if cached.exists():
            blob = cached.read_bytes()
            log.info("loading cached TensorRT engine %s", cached.name)
        else:
            log.info("building a TensorRT engine for %s (%s, sm %s); this takes a while once",
                     path.name, settings.precision.value, self.compute_capability)
            blob = self._build(path, settings)
            atomic_write(cached, blob)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(blob)
        if self.engine is None:
            raise ModelLoadError(f"TensorRT could not deserialize the engine for {path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise ModelLoadError(f"{path}: expected one input and at least one output")
        self.input = IOSpec(inputs[0], tuple(self.engine.get_tensor_shape(inputs[0])), "float32")
        self.output = IOSpec(outputs[0], tuple(self.engine.get_tensor_shape(outputs[0])), "float32")
        self._stream = _check(self._cudart.cudaStreamCreate())

    def _build(self, path: Path, settings: TensorRTBuild) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelLoadError(f"TensorRT's ONNX parser refused {path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        if settings.precision.value == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif settings.precision.value == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantisation: scales come from the QDQ nodes
        profile = builder.create_optimization_profile()
        for shapes in settings.profiles:
            profile.set_shape(shapes.input, shapes.min, shapes.opt, shapes.max)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelLoadError(f"TensorRT could not build an engine for {path}")
        return bytes(serialized)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.input, x)
        cudart = self._cudart
        if not self.context.set_input_shape(self.input.name, x.shape):
            raise InputError(f"input shape {tuple(x.shape)} is outside the TensorRT engine's optimisation profile "
                             "(the manifest's tensorrt.profiles); send a batch within it")
        out_shape = tuple(self.context.get_tensor_shape(self.output.name))
        out = np.empty(out_shape, dtype=np.float32)
        d_in = _check(cudart.cudaMalloc(x.nbytes), InferenceError)
        try:
            d_out = _check(cudart.cudaMalloc(out.nbytes), InferenceError)
        except InferenceError:
            cudart.cudaFree(d_in)
            raise
        try:
            h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self._stream), InferenceError)
            self.context.set_tensor_address(self.input.name, int(d_in))
            self.context.set_tensor_address(self.output.name, int(d_out))
            if not self.context.execute_async_v3(self._stream):
                raise InferenceError("TensorRT failed while running the model on this input (execute_async_v3 "
                                     "returned false); the agent's log has TensorRT's own message; the request "
                                     "is counted as an error")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self._stream), InferenceError)
            _check(cudart.cudaStreamSynchronize(self._stream), InferenceError)
        finally:
            cudart.cudaFree(d_in)
            cudart.cudaFree(d_out)
        return out

    def close(self) -> None:
        self._cudart.cudaStreamDestroy(self._stream)
        del self.context, self.engine
