"""A model that fails at run time: a 500 with a message, counted as an error, and the agent keeps serving;
and a smoke test that refuses a model whose outputs are not finite."""

from __future__ import annotations

import http.client
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.api import ApiServer
from agent.backends import open_backend
from agent.errors import InferenceError, InputError
from agent.predictor import Predictor
from agent.runtime import smoke_test
from protocol import SmokeExpectation
from tests.model_helpers import ROWS, lookup_onnx, lookup_tflite, onnx_manifest, sqrt_onnx

GOOD = [[1.0, 2.0], [3.0, -1.0]]
OUT_OF_TABLE = [[float(ROWS + 3), 0.5]]  # the first value indexes the model's table: 7 is past its 4 rows


def _predictor(model_file: Path, **manifest: Any) -> Predictor:
    m = onnx_manifest(model_file, **manifest)
    return Predictor(model_file, m, m.artifacts[0], stats=False)


class _Host:
    """What the HTTP API asks the agent for: here one loaded predictor."""

    def __init__(self, pred: Predictor, *, broken_metrics: bool = False) -> None:
        self.pred, self.broken_metrics = pred, broken_metrics

    def predictor(self) -> Predictor | None:
        return self.pred

    def model_info(self) -> dict[str, Any]:
        return {"model": self.pred.manifest.model}

    def metrics_text(self) -> str:
        if self.broken_metrics:
            raise RuntimeError("metrics are broken")
        return "edgeherd_agent_connected 0\n"


@pytest.fixture
def lookup(tmp_path):
    pred = _predictor(lookup_onnx(tmp_path / "lookup.onnx"))
    yield pred
    pred.close()


def _window(pred: Predictor):
    now = datetime.now(timezone.utc)
    window, _ = pred.close_window(device_id="pi-1", session=1, window_seq=1, start=now, end=now,
                                  manifest_sha256=pred.manifest_sha256)
    return window


def _post(conn: http.client.HTTPConnection, inputs: list[list[float]]) -> tuple[int, dict[str, Any]]:
    conn.request("POST", "/v1/predict", body=json.dumps({"inputs": inputs}).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_a_runtime_failure_answers_500_with_a_message_is_counted_and_the_agent_keeps_serving(lookup):
    api = ApiServer(_Host(lookup), port=0).start()
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        # one keep-alive connection throughout: a failed request must not drop it
        status, body = _post(conn, GOOD)
        assert status == 200 and len(body["classes"]) == 2
        status, body = _post(conn, OUT_OF_TABLE)
        assert status == 500, body
        assert body["error"] == "Internal Server Error"
        assert "onnxruntime failed while running the model" in body["message"]
        assert "out of data bounds" in body["message"] and "counted as an error" in body["message"]
        status, body = _post(conn, [GOOD[0], OUT_OF_TABLE[0]])  # one bad row fails its batch
        assert status == 500
        status, body = _post(conn, [[9.0]])  # a wrong shape is still the caller's error, not the model's
        assert status == 400 and "does not match" in body["message"]
        status, body = _post(conn, GOOD)
        assert status == 200 and body["labels"] == [f"class-{c}" for c in body["classes"]]
    finally:
        conn.close()
        api.stop()
    window = _window(lookup)
    assert (window.requests, window.errors) == (5, 3)
    assert (lookup.stats.lifetime_requests, lookup.stats.lifetime_errors) == (5, 3)


def test_the_in_process_predictor_raises_inference_error_and_counts_it(lookup):
    out = lookup.predict(np.asarray(GOOD, np.float32))
    assert out.shape == (2, 3)
    with pytest.raises(InferenceError, match="out of data bounds"):
        lookup.predict(np.asarray(OUT_OF_TABLE, np.float32))
    with pytest.raises(InputError):
        lookup.predict(np.zeros((1, 5), np.float32))
    window = _window(lookup)
    assert (window.requests, window.errors) == (3, 2)


def test_the_fixed_model_answers_every_input(tmp_path):
    pred = _predictor(lookup_onnx(tmp_path / "fixed.onnx", clip=True))
    try:
        assert pred.predict(np.asarray(GOOD + OUT_OF_TABLE, np.float32)).shape == (3, 3)
        assert _window(pred).errors == 0
    finally:
        pred.close()


def test_a_litert_runtime_failure_is_an_inference_error_and_the_interpreter_keeps_working(tmp_path):
    pytest.importorskip("litert_torch", reason="converting the test model needs litert-torch (edgeherd[toolchain])")
    backend = open_backend(lookup_tflite(tmp_path / "lookup.tflite"), "ai-edge-litert")
    try:
        good = backend.predict(np.asarray(GOOD, np.float32))
        with pytest.raises(InferenceError, match="failed while running the model on this input") as err:
            backend.predict(np.asarray(OUT_OF_TABLE, np.float32))
        assert "GATHER" in str(err.value)
        assert np.array_equal(backend.predict(np.asarray(GOOD, np.float32)), good)
    finally:
        backend.close()


def test_an_unexpected_error_in_a_handler_answers_500_and_the_agent_keeps_serving(lookup):
    api = ApiServer(_Host(lookup, broken_metrics=True), port=0).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 500
        assert body == {"error": "Internal Server Error",
                        "message": "the agent failed while answering this request; its log has the details"}
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
        assert _post(conn, GOOD)[0] == 200
        conn.close()
    finally:
        api.stop()


# -- smoke test ----------------------------------------------------------------------------------------


def test_the_smoke_test_refuses_nan_outputs(tmp_path):
    # sqrt of a negative golden input is NaN; the manifest expects finite numbers, and NaN compares false with
    # any tolerance. The golden labels agree with argmax (NaN rows argmax to 0), so only the NaN check catches it.
    golden = [[-1.0, 4.0, 9.0], [1.0, 4.0, 9.0]]
    smoke = SmokeExpectation(outputs=[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], atol=0.01, min_agreement=0.0)
    pred = _predictor(sqrt_onnx(tmp_path / "sqrt.onnx"), model="sqrt", features=3, golden=golden, smoke=smoke)
    try:
        problem = smoke_test(pred)
    finally:
        pred.close()
    assert problem is not None
    assert "1 NaN and 0 infinite values on golden input(s) [0]" in problem


def test_the_smoke_test_still_passes_finite_outputs_within_tolerance(tmp_path):
    golden = [[1.0, 4.0, 9.0]]
    smoke = SmokeExpectation(outputs=[[1.0, 2.0, 3.0]], atol=0.01)
    pred = _predictor(sqrt_onnx(tmp_path / "sqrt.onnx"), model="sqrt", features=3, golden=golden, smoke=smoke)
    try:
        assert smoke_test(pred) is None
    finally:
        pred.close()
