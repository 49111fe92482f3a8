"""The agent against a real Mosquitto, with a test publisher playing the server."""

from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pytest

from toolchain.data import load_digits, split_indices

pytestmark = pytest.mark.integration


def _test_split():
    ds = load_digits()
    test = split_indices(ds.y, 0)["test"]
    return ds.x[test], ds.y[test]


def _post(port, body, ctype):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=body, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("artifact", ["digits-onnx-int8", "digits-tflite-int8"])
def test_installs_serves_and_reports(fleet, digits_bundle, artifact):
    server, make = fleet
    agent = make()
    server.desire("pi-1", 1, digits_bundle.signed, artifact)
    state = server.wait_running(artifact)
    assert state.running.slot in ("a", "b")
    manifest = digits_bundle.signed.manifest
    entry = manifest.artifact(artifact)
    x, y = _test_split()
    pred = agent.predictor()
    assert pred is not None
    out = np.concatenate([pred.predict(x[i : i + 32]) for i in range(0, len(x), 32)])
    accuracy = float((out.argmax(1) == y).mean())
    assert accuracy == pytest.approx(entry.metrics["accuracy"], abs=1e-6)  # the manifest rounds to 6 places
    # the same answers over HTTP, as JSON and as .npy
    port = agent.api.port
    got = _post(port, json.dumps({"inputs": x[:5].tolist()}).encode(), "application/json")
    assert got["classes"] == out[:5].argmax(1).tolist() and got["version"] == manifest.version
    buf = io.BytesIO()
    np.save(buf, x[5])
    got = _post(port, buf.getvalue(), "application/x-npy")
    assert got["classes"] == [int(out[5].argmax())]
    # one window: telemetry and feature statistics reach the server
    agent.close_window_now()
    server.wait(lambda s: s.stats and s.telemetry, what="window reports")
    stats, telemetry = server.seen.stats[-1], server.seen.telemetry[-1]
    assert stats.n == len(x) + 6
    assert telemetry.requests == (len(x) + 31) // 32 + 2 and telemetry.errors == 0
    assert {f.name for f in stats.features} == {f.name for f in manifest.reference.features}
    assert sum(stats.class_counts) == stats.n
    assert server.seen.hellos >= 1
