"""An image model end to end: a generated image folder → build (MobileNetV3-Small, trained from scratch, resize
and normalisation in the graph) → push → deploy → a real agent → ``POST /v1/predict`` with raw pixels. The agent's
answers must be ONNX Runtime's own on the artifact file it runs, and the bundle's metric what ONNX Runtime
computes on the test split outside edgeherd."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from tests.byom_helpers import deployed_agent
from tests.vision_helpers import CAPTURE, vision_build
from toolchain.data import split_indices
from toolchain.images import load_image_folder
from toolchain.validate import validate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return vision_build(tmp_path_factory.getbasetemp())  # shared with tests/test_toolchain_vision.py


def test_agent_answers_raw_pixel_requests_as_onnx_runtime_does(built, tmp_path):
    manifest = json.loads((built.bundle / "manifest.json").read_text())["manifest"]
    ds = load_image_folder(built.folder)
    _, kept = validate(ds)
    test = kept[split_indices(ds.y[kept], int(manifest["lineage"]["seed"]))["test"]]
    rows = ds.x[test[:: max(1, len(test) // 6)]]  # raw RGB 0-255 at the capture size, as a camera gives them
    assert rows.shape[1:] == (3, *CAPTURE) and rows.max() > 1.0

    with deployed_agent(tmp_path, built.key) as fleet:
        served = fleet.deploy(built.bundle)
        answer = fleet.predict(rows)
        path = fleet.artifact_file(built.bundle, served)

    assert served.target.value == "onnx", served.name
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    own = sess.run(None, {sess.get_inputs()[0].name: rows})[0]
    outputs = np.asarray(answer["outputs"], dtype=np.float32)
    assert outputs.shape == own.shape == (len(rows), len(ds.classes))
    np.testing.assert_allclose(outputs, own, rtol=1e-5, atol=1e-5)
    assert answer["classes"] == own.argmax(1).tolist()
    assert answer["labels"] == [ds.classes[c] for c in own.argmax(1)]

    # the served artifact's evaluated accuracy is what ONNX Runtime gives on the whole test split
    scores = sess.run(None, {sess.get_inputs()[0].name: ds.x[test]})[0]
    accuracy = float((scores.argmax(1) == ds.y[test]).mean())
    entry = next(a for a in manifest["artifacts"] if a["name"] == served.name)
    assert entry["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
