"""The one artifact policy (server/assignment.py), table by table: what each kind of device is given, when it
waits, and why a bundle does not suit it."""

from __future__ import annotations

import pytest

from server.assignment import Outcome, choose, runtimes_of
from tests.samples import manifest

ORT = {"onnxruntime": "1.20.1"}
LITERT = {"ai-edge-litert": "2.3.0"}
TRT10 = {"tensorrt": "10.3.0", "onnxruntime": "1.20.1"}


@pytest.mark.parametrize(("profile", "runtimes", "requested", "outcome", "artifact"), [
    # a Jetson without TensorRT (or with one too old for the engine) runs the ONNX artifact, never the engine
    ("jetson-orin-nano", ORT, None, Outcome.CHOSEN, "digits-onnx-int8"),
    ("jetson-orin-nano", {"tensorrt": "8.6.2", **ORT}, None, Outcome.CHOSEN, "digits-onnx-int8"),
    # a Jetson with TensorRT 10 gets the engine its profile prefers (the bundle has fp16, not int8)
    ("jetson-orin-nano", TRT10, None, Outcome.CHOSEN, "digits-tensorrt-fp16"),
    # a Pi with LiteRT only is sent the TFLite artifact, not onnx-int8
    ("raspberry-pi-5", LITERT, None, Outcome.CHOSEN, "digits-tflite-int8"),
    ("raspberry-pi-4", {"ai-edge-litert": "1.1.0"}, None, Outcome.UNSUITABLE, None),  # LiteRT older than needed
    # its profile takes TFLite only: an ONNX Runtime on the Pi does not make onnx-int8 one of its choices
    ("raspberry-pi-5", ORT, None, Outcome.UNSUITABLE, None),
    ("x86-64-cpu", {**ORT, **LITERT}, None, Outcome.CHOSEN, "digits-onnx-int8"),
    # a board edgeherd has no profile for: the default order over what it reported
    ("my-own-board", LITERT, None, Outcome.CHOSEN, "digits-tflite-int8"),
    ("my-own-board", ORT, None, Outcome.CHOSEN, "digits-onnx-int8"),
    # nothing reported yet: wait, whatever the profile or the request
    ("jetson-orin-nano", None, None, Outcome.WAITING, None),
    ("raspberry-pi-5", None, "digits-tflite-int8", Outcome.WAITING, None),
    # an artifact the operator names is taken when the device can load it, even outside the profile's order
    ("x86-64-cpu", {**ORT, **LITERT}, "digits-tflite-int8", Outcome.CHOSEN, "digits-tflite-int8"),
    ("jetson-orin-nano", ORT, "digits-tensorrt-fp16", Outcome.UNSUITABLE, None),
    ("x86-64-cpu", ORT, "digits-onnx-fp32", Outcome.UNSUITABLE, None),
])
def test_choose(profile, runtimes, requested, outcome, artifact):
    choice = choose(manifest(), profile, runtimes, requested)
    assert (choice.outcome, choice.artifact) == (outcome, artifact), choice.reason
    assert bool(choice.reason) == (outcome is not Outcome.CHOSEN)


def test_reasons_say_what_the_bundle_has_and_what_the_device_reported():
    reason = choose(manifest(), "raspberry-pi-5", ORT).reason
    assert "digits:1.0.0" in reason and "digits-onnx-int8" in reason and "tflite-int8" in reason
    assert "onnxruntime 1.20.1" in reason
    assert "needs tensorrt >= 10.0, which is not installed (installed: onnxruntime 1.20.1)" in choose(
        manifest(), "jetson-orin-nano", ORT, "digits-tensorrt-fp16").reason
    assert "has no artifact 'digits-onnx-fp32' (it has digits-onnx-int8" in choose(
        manifest(), "x86-64-cpu", ORT, "digits-onnx-fp32").reason
    assert "has not reported its runtimes" in choose(manifest(), "x86-64-cpu", None).reason


@pytest.mark.parametrize(("fingerprint", "expected"), [
    (None, None),
    ({}, None),
    ({"arch": "aarch64"}, None),  # a hello without the field: not known
    ({"runtimes": {}}, {}),  # known: it has none
    ({"runtimes": {"onnxruntime": "1.20.1"}}, {"onnxruntime": "1.20.1"}),
    ({"runtimes": ["onnxruntime"]}, None),
])
def test_runtimes_of(fingerprint, expected):
    assert runtimes_of(fingerprint) == expected
