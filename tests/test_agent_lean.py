"""The agent's lean paths: what an idle agent imports, and a request path that keeps the statistics exact.

Importing the agent loads neither numpy nor an inference runtime, paho, the HTTP stack or X.509 handling:
numpy and the runtime come with the first model, the rest when an ``Agent`` is constructed (its MQTT session
and local API). On the request path, an image is buffered for the statistics as the strided pixels the
summaries read, and the window must come out exactly as if the whole images had been counted.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from agent.backends import IOSpec
from agent.backends._base import check_input
from agent.errors import InputError
from agent.predictor import Predictor
from agent.summaries import IMAGE_SUMMARIES, image_summary_names
from agent.window import LATENCY_EDGES_MS, WindowStats
from protocol import (
    ArtifactEntry,
    FeatureReference,
    Manifest,
    Precision,
    ReferenceProfile,
    RuntimeRequirement,
    Target,
    TensorSpec,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
#: Loaded with a model or by constructing an Agent; never by importing the agent.
NOT_WHEN_IDLE = ["numpy", "onnxruntime", "ai_edge_litert", "tensorrt", "http.server", "cryptography.x509",
                 "fastapi", "uvicorn", "paho"]


@pytest.mark.parametrize("module", ["agent.runtime", "agent.installer", "agent.commands", "agent.reporter",
                                    "agent.metrics", "agent.fingerprint", "agent.backends"])
def test_importing_the_agent_loads_no_model_stack(module):
    code = f"import sys, {module}\nprint(','.join(m for m in {NOT_WHEN_IDLE!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loaded: {out.stdout.strip()}"


def test_a_model_brings_its_stack():
    """The other side of the lazy imports: opening a backend does load numpy and the runtime."""
    code = ("import sys\nfrom agent.backends import IOSpec, installed_runtimes\n"
            "print(IOSpec.__name__, 'numpy' in sys.modules, 'onnxruntime' in installed_runtimes())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["IOSpec", "True", "True"]


SPEC = IOSpec("x", (-1, 2, 3), "float32")
GOOD = np.arange(12, dtype=np.float32).reshape(2, 2, 3)


@pytest.mark.parametrize(("x", "same_object"), [
    (GOOD, True),                                        # the fast path: handed on as it is
    (GOOD.astype(np.float64), False),                    # converted
    (np.asfortranarray(GOOD), False),                    # made contiguous
    (GOOD[:, :, ::-1], False),                           # a reversed view, made contiguous
    (GOOD.astype(">f4"), False),                         # big-endian float32, converted
])
def test_check_input_passes_valid_batches_as_contiguous_float32(x, same_object):
    got = check_input(SPEC, x)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == x.shape
    np.testing.assert_array_equal(got, x)
    assert (got is x) is same_object


@pytest.mark.parametrize(("x", "message"), [
    (np.zeros((0, 2, 3), np.float32), "empty"),
    (np.zeros((2, 3, 2), np.float32), "does not match"),
    (np.zeros((2, 2, 3, 1), np.float32), "does not match"),
    (np.zeros((2, 6), np.float32), "does not match"),
    (np.float32(1.0), "must be a numpy array"),
    (np.zeros((2, 2, 3), "U1"), "not numeric"),
    ([[[0.0] * 3] * 2], "must be a numpy array"),
])
def test_check_input_refuses_what_the_model_cannot_take(x, message):
    with pytest.raises(InputError, match=message):
        check_input(SPEC, x)


def test_check_input_with_a_dynamic_row_dimension():
    spec = IOSpec("x", (-1, -1, 3), "float32")
    assert spec.fixed_row is None and SPEC.fixed_row == (2, 3)
    x = np.zeros((1, 5, 3), np.float32)
    assert check_input(spec, x) is x
    with pytest.raises(InputError):
        check_input(spec, np.zeros((1, 5, 4), np.float32))


def test_lifetime_counters_span_windows():
    w = WindowStats(None, 2)
    for ms in (0.01, 0.3, 7.0, 1e9, -1.0):  # below the first edge and beyond the last land in the end bins
        w.record_request(ms)
    w.record_request(2.5, error=True)
    first, _ = w.close(device_id="d", session=1, window_seq=0, start=T0, end=T0, manifest_sha256=None)
    w.record_request(0.3)
    w.record_request(0.3, error=True)
    second, _ = w.close(device_id="d", session=1, window_seq=1, start=T0, end=T0, manifest_sha256=None)
    w.record_request(50.0)  # the open window counts too
    assert first.latency_counts[0] == 2 and first.latency_counts[-1] == 1
    assert (w.lifetime_requests, w.lifetime_errors) == (9, 2)
    counts = [a + b for a, b in zip(first.latency_counts, second.latency_counts, strict=True)]
    counts[LATENCY_EDGES_MS.index(50.0)] += 1
    assert w.lifetime_latency_counts == counts
    assert w.lifetime_latency_sum == pytest.approx(0.01 + 0.3 + 7.0 + 1e9 - 1.0 + 2.5 + 0.6 + 50.0)


def _image_model(path: Path, shape: tuple[int, int, int]) -> Path:
    """Logits = each channel's mean: (n, c, h, w) -> (n, c)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["logits"], axes=[2, 3], keepdims=0)], "channel-means",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", shape[0]])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _image_manifest(path: Path, shape: tuple[int, int, int]) -> Manifest:
    edges = [-1.0, 0.1, 0.3, 0.5, 0.7, 2.0]
    ref = ReferenceProfile(kind="image", summaries=IMAGE_SUMMARIES, n=10,
                           features=[FeatureReference(name=n, edges=edges, counts=[2] * 5, mean=0.5, std=0.3)
                                     for n in image_summary_names(shape[0])],
                           confidence_edges=[0.0, 0.5, 1.0], confidence_counts=[5, 5])
    data = path.read_bytes()
    art = ArtifactEntry(name="img", target=Target.ONNX, precision=Precision.FP32,
                        sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                        runtime=RuntimeRequirement(name="onnxruntime", min_version="1.17"),
                        inputs=[TensorSpec(name="x", shape=[-1, *shape], dtype="float32")],
                        outputs=[TensorSpec(name="logits", shape=[-1, shape[0]], dtype="float32")])
    return Manifest(model="img", version="1", created_at=T0, task="classification",
                    labels=[str(i) for i in range(shape[0])], artifacts=[art], reference=ref)


@pytest.mark.parametrize("shape", [(3, 130, 100), (1, 64, 64), (2, 65, 9)])
def test_image_statistics_from_the_strided_buffer_equal_the_whole_images(tmp_path, shape):
    """Large images (stride 3 here, and 2) are buffered as the pixels the summaries read; 64 × 64 ones whole.
    Either way the window equals one counted from the whole images, a buffer of rows at a time as the agent
    does."""
    model = _image_model(tmp_path / "m.onnx", shape)
    manifest = _image_manifest(model, shape)
    pred = Predictor(model, manifest, manifest.artifacts[0])
    rng = np.random.default_rng(7)
    batches = [rng.random((n, *shape)).astype(np.float32) for n in (1, 7, 32, 1, 64, 3, 20)]
    batches.append(rng.random((5, *shape)))  # float64: buffered as float32, as the model sees it
    batches.append(np.asfortranarray(rng.random((4, *shape)).astype(np.float32)))
    outs = [pred.predict(x) for x in batches]
    try:
        got_tel, got = pred.close_window(device_id="d", session=1, window_seq=0, start=T0, end=T0,
                                         manifest_sha256="a" * 64)
    finally:
        pred.close()
    xs = np.concatenate([x.astype(np.float32) for x in batches])
    ys = np.concatenate(outs)
    want = WindowStats(manifest.reference, shape[0])
    rows = pred.flush_rows
    for i in range(0, len(xs), rows):
        want.add_rows(xs[i : i + rows], ys[i : i + rows])
    _, expected = want.close(device_id="d", session=1, window_seq=0, start=T0, end=T0, manifest_sha256="a" * 64)
    assert got is not None and expected is not None and got.n == len(xs) == 137
    assert got.model_dump() == expected.model_dump()
    assert got_tel.requests == len(batches) and pred.stats_dropped_rows == 0
