"""Which inference runtimes are installed, read from package metadata: no runtime (and no numpy) is imported."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["installed_runtimes"]

#: Manifest runtime name -> distribution that provides it.
_DISTRIBUTIONS = {
    "onnxruntime": "onnxruntime",
    "ai-edge-litert": "ai-edge-litert",
    "tflite-runtime": "tflite-runtime",
    "tensorrt": "tensorrt",
}


def installed_runtimes() -> dict[str, str]:
    """Runtimes installed here and their versions, read from package metadata (no import)."""
    out = {}
    for runtime, dist in _DISTRIBUTIONS.items():
        try:
            out[runtime] = version(dist)
        except PackageNotFoundError:
            continue
    return out
