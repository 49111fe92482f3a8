"""TensorRT: the pure parts everywhere; the GPU path only where TensorRT and a GPU exist."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from agent.backends import open_backend
from agent.backends.tensorrt import engine_cache_key
from agent.errors import RuntimeMissing
from protocol import Target

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_engine_cache_key_separates_everything_that_makes_engines_unportable():
    base = engine_cache_key("a" * 64, "10.3.0", "8.7", "fp16")
    assert base == f"{'a' * 32}-trt10.3.0-sm87-fp16.engine"
    others = {engine_cache_key("b" * 64, "10.3.0", "8.7", "fp16"), engine_cache_key("a" * 64, "10.4.0", "8.7", "fp16"),
              engine_cache_key("a" * 64, "10.3.0", "7.2", "fp16"), engine_cache_key("a" * 64, "10.3.0", "8.7", "int8")}
    assert base not in others and len(others) == 4


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_backend_says_what_is_missing(digits_bundle, tmp_path):
    art = next(a for a in digits_bundle.signed.manifest.artifacts if a.target is Target.TENSORRT)
    with pytest.raises(RuntimeMissing, match="tensorrt is not installed"):
        open_backend(digits_bundle.artifacts / art.sha256, "tensorrt", tensorrt=art.tensorrt, engine_cache=tmp_path)


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed on this machine (it needs an NVIDIA GPU and "
                                          "JetPack or the tensorrt wheel); the engine build runs on devices")
def test_tensorrt_engine_builds_caches_and_matches_onnx(digits_bundle, tmp_path):  # pragma: no cover
    m = digits_bundle.signed.manifest
    art = next(a for a in m.artifacts if a.name.endswith("tensorrt-fp16"))
    path = digits_bundle.artifacts / art.sha256
    backend = open_backend(path, "tensorrt", tensorrt=art.tensorrt, engine_cache=tmp_path)
    x = np.asarray(m.golden.inputs, dtype=np.float32).reshape(-1, 1, 8, 8)
    reference = open_backend(path, "onnxruntime").predict(x)
    assert np.abs(backend.predict(x) - reference).max() < 0.05
    assert len(list(tmp_path.glob("*.engine"))) == 1
    open_backend(path, "tensorrt", tensorrt=art.tensorrt, engine_cache=tmp_path)  # loads from the cache
    assert len(list(tmp_path.glob("*.engine"))) == 1
