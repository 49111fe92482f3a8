"""The Backend interface and what the backends share."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from agent.backends._runtimes import installed_runtimes
from agent.errors import InferenceError, InputError

__all__ = ["Backend", "IOSpec", "check_input", "dequantize", "inference_failed", "installed_runtimes", "quantize"]

#: Longest runtime message quoted in an :class:`InferenceError`.
_MAX_DETAIL = 300

@dataclass(frozen=True)
class IOSpec:
    """A model input or output as the runtime reports it (-1: dynamic dimension)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "uint8") and self.scale > 0

    @cached_property
    def fixed_row(self) -> tuple[int, ...] | None:
        """The shape of one row (all but the batch dimension) when every dimension is fixed, else None."""
        return None if any(d < 0 for d in self.shape[1:]) else self.shape[1:]


class Backend(Protocol):
    runtime: str
    input: IOSpec
    output: IOSpec

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run a float32 batch shaped like ``input`` (any batch size); return float32 outputs.

        Raises :class:`InputError` for a batch of the wrong shape or dtype and :class:`InferenceError`
        (see :func:`inference_failed`) when the runtime fails while running it; never the runtime's own
        exceptions.
        """
        ...

    def close(self) -> None: ...


_FLOAT32 = np.dtype(np.float32)


def check_input(spec: IOSpec, x: np.ndarray) -> np.ndarray:
    """Validate a batch against ``spec`` and return it as contiguous float32."""
    # the common case, checked in a few attribute reads: a contiguous float32 batch of the model's fixed shape
    if (type(x) is np.ndarray and x.dtype is _FLOAT32 and x.shape[1:] == spec.fixed_row
            and x.ndim == len(spec.shape) and x.shape[0] and x.flags.c_contiguous):
        return x
    if not isinstance(x, np.ndarray):
        raise InputError(f"input must be a numpy array, got {type(x).__name__}")
    if x.dtype.kind not in "fiu":
        raise InputError(f"input dtype {x.dtype} is not numeric; expected float32 shaped {_shape(spec)}")
    want = spec.shape[1:]
    if x.ndim != len(spec.shape) or any(w not in (-1, g) for w, g in zip(want, x.shape[1:], strict=True)):
        raise InputError(f"input shape {tuple(x.shape)} does not match {_shape(spec)} for {spec.name!r}")
    if x.shape[0] < 1:
        raise InputError("input batch is empty")
    return np.ascontiguousarray(x, dtype=np.float32)


def inference_failed(runtime: str, exc: BaseException) -> InferenceError:
    """The :class:`InferenceError` for ``runtime``'s own exception ``exc``, raised while running a batch."""
    detail = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if len(detail) > _MAX_DETAIL:
        detail = detail[: _MAX_DETAIL - 1] + "…"
    return InferenceError(f"{runtime} failed while running the model on this input: {detail}. The input has a "
                          "valid shape, so the model itself cannot handle these values (often a value outside "
                          "the range it was built for); the request is counted as an error")


def _shape(spec: IOSpec) -> str:
    return "(batch, " + ", ".join("?" if d < 0 else str(d) for d in spec.shape[1:]) + ")"


def quantize(spec: IOSpec, x: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.dtype(spec.dtype))
    q = np.round(x / spec.scale + spec.zero_point)
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(spec: IOSpec, q: np.ndarray) -> np.ndarray:
    return ((q.astype(np.float32) - spec.zero_point) * spec.scale).astype(np.float32)
