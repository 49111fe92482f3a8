"""Inference backends behind one interface.

``open_backend(path, runtime)`` loads an artifact with the named runtime and
returns a :class:`Backend`: float32 batch in, float32 batch out, whatever the
artifact's own input and output dtypes (int8 tensors are quantised and
dequantised at the edge of the backend). Runtimes are imported only when a
backend is opened, and numpy only when ``Backend``, ``IOSpec`` or a backend
is first used: an agent with no model (which asks only
:func:`installed_runtimes`) loads neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.backends._runtimes import installed_runtimes
from agent.errors import RuntimeMissing

if TYPE_CHECKING:
    from agent.backends._base import Backend, IOSpec
    from protocol import TensorRTBuild

__all__ = ["Backend", "IOSpec", "installed_runtimes", "open_backend"]


def __getattr__(name: str) -> Any:
    if name in ("Backend", "IOSpec"):
        from agent.backends import _base

        return getattr(_base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_backend(path: Path, runtime: str, *, threads: int = 1, tensorrt: TensorRTBuild | None = None,
                 engine_cache: Path | None = None) -> Backend:
    """Load ``path`` with ``runtime`` (a manifest runtime name).

    For ``tensorrt``, ``tensorrt`` are the artifact's build settings and
    ``engine_cache`` the directory where built engines are kept.
    """
    if runtime == "onnxruntime":
        from agent.backends.onnx import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, threads=threads)
    if runtime in ("ai-edge-litert", "tflite-runtime"):
        from agent.backends.litert import LiteRTBackend

        return LiteRTBackend(path, threads=threads)
    if runtime == "tensorrt":
        if tensorrt is None or engine_cache is None:
            raise RuntimeMissing("a TensorRT artifact needs its build settings and an engine cache directory")
        from agent.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, tensorrt, engine_cache)
    raise RuntimeMissing(f"no backend for runtime {runtime!r} in this agent")
