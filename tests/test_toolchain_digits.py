"""The digits recipe end to end: one build, checked every way a user would check it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from agent.backends import open_backend
from protocol import Precision, Target, generate_signing_key, private_key_to_pem, public_key_to_pem
from toolchain.bundle import ARTIFACTS, CARD, verify_bundle
from toolchain.errors import BundleError
from toolchain.pipeline import BuildSpec, NullReporter, build

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    key = generate_signing_key()
    (root / "signing.key").write_bytes(private_key_to_pem(key))
    reporter = NullReporter()
    result = build(BuildSpec(recipe="digits", out=root / "bundle", key=root / "signing.key"), reporter)
    return result, key, reporter


def _art(manifest, target, precision):
    return next(a for a in manifest.artifacts if a.target is target and a.precision is precision)


def test_all_targets_are_in_the_bundle(built):
    result, _, reporter = built
    kinds = {(a.target, a.precision) for a in result.manifest.artifacts}
    assert {(Target.ONNX, Precision.FP32), (Target.ONNX, Precision.INT8), (Target.TFLITE, Precision.FP32),
            (Target.TFLITE, Precision.INT8), (Target.TENSORRT, Precision.FP16),
            (Target.TENSORRT, Precision.INT8)} <= kinds
    assert result.rejected == {}
    assert reporter.steps[:2] == ["load and validate data", "train"]


def test_accuracy_and_quantization_deltas(built):
    m = built[0].manifest
    fp32 = _art(m, Target.ONNX, Precision.FP32).metrics["accuracy"]
    assert fp32 >= 0.95
    for target in (Target.ONNX, Target.TFLITE):
        int8 = _art(m, target, Precision.INT8).metrics["accuracy"]
        assert (fp32 - int8) * 100 <= 1.0, f"{target.value} int8 lost {(fp32 - int8) * 100:.2f} points"


def test_int8_files_are_at_least_twice_smaller(built):
    m = built[0].manifest
    for target in (Target.ONNX, Target.TFLITE):
        ratio = _art(m, target, Precision.FP32).size / _art(m, target, Precision.INT8).size
        assert ratio >= 2.0, f"{target.value}: fp32/int8 size ratio {ratio:.2f}"


def test_onnx_matches_torch(built):
    assert built[0].report["onnx_parity_max_abs_diff"] <= 1e-4


def test_reference_profile_sums_to_training_split(built):
    result = built[0]
    ref = result.manifest.reference
    n_train = result.report["splits"]["train"]
    assert ref is not None and ref.n == n_train and ref.kind == "image"
    for f in ref.features:
        assert sum(f.counts) == n_train, f.name
    assert ref.class_counts is not None and sum(ref.class_counts) == n_train
    assert ref.confidence_counts is not None and sum(ref.confidence_counts) == n_train


def test_artifacts_reproduce_manifest_numbers_and_golden_vectors(built):
    result = built[0]
    from toolchain.data import load_digits, split_indices

    ds = load_digits()
    test = split_indices(ds.y, 0)["test"]
    golden = result.manifest.golden
    assert golden is not None and golden.labels is not None
    for art in result.manifest.artifacts:
        if art.target is Target.TENSORRT:
            assert art.tensorrt is not None and art.tensorrt.validated_on == []
            assert art.metrics["measured_with_onnxruntime"] == 1.0
            continue
        runtime = "onnxruntime" if art.target is Target.ONNX else "ai-edge-litert"
        backend = open_backend(result.out / ARTIFACTS / art.sha256, runtime)
        acc = float((backend.predict(ds.x[test]).argmax(1) == ds.y[test]).mean())
        assert acc == pytest.approx(art.metrics["accuracy"], abs=1e-6), art.name
        x = np.asarray(golden.inputs, dtype=np.float32).reshape(-1, 1, 8, 8)
        out = backend.predict(x)
        assert art.smoke is not None
        assert np.abs(out - np.asarray(art.smoke.outputs)).max() <= art.smoke.atol, art.name
        agreement = float((out.argmax(1) == np.asarray(golden.labels)).mean())
        assert agreement >= art.smoke.min_agreement


def test_bundle_and_tar_verify_and_tampering_is_caught(built, tmp_path):
    result, key, _ = built
    assert verify_bundle(result.out, key.public_key()) == result.manifest
    assert result.tar is not None and verify_bundle(result.tar, key.public_key()) == result.manifest
    with pytest.raises(BundleError, match=r"another key|pinned"):
        verify_bundle(result.out, generate_signing_key().public_key())
    # flip one byte of one artifact inside a copy of the tar
    tampered = tmp_path / "tampered.tar"
    flipped = False
    with tarfile.open(result.tar) as src, tarfile.open(tampered, "w") as dst:
        for member in src.getmembers():
            f = src.extractfile(member)
            if f is None:
                dst.addfile(member)
                continue
            data = f.read()
            if not flipped and member.name.startswith(ARTIFACTS + "/"):
                data, flipped = bytes([data[0] ^ 1]) + data[1:], True
            dst.addfile(member, io.BytesIO(data))
    assert flipped
    with pytest.raises(BundleError, match="not matching their sha256"):
        verify_bundle(tampered, key.public_key())


def test_model_card_and_report(built):
    result = built[0]
    card = (result.out / CARD).read_text()
    for art in result.manifest.artifacts:
        assert art.name in card
    assert "max abs difference" in card and "Limitations" in card
    report = json.loads((result.out / "build-report.json").read_text())
    assert report["validation"]["rows_in"] == 1797
    assert len(report["training"]["history"]) == 30
    lineage = result.manifest.lineage
    assert lineage["epochs"] == "30" and lineage["seed"] == "0" and len(lineage["split_sha256"]) == 64
    order = ("train", "calibration", "validation", "test")
    assert lineage["split_sizes"] == "/".join(str(report["splits"][k]) for k in order)


def test_cli_verify_and_inspect(built, tmp_path):
    from typer.testing import CliRunner

    from server.cli import app

    result, key, _ = built
    pub = tmp_path / "signing.pub"
    pub.write_bytes(public_key_to_pem(key.public_key()))
    runner = CliRunner()
    ok = runner.invoke(app, ["bundle", "verify", str(result.out), "--key", str(pub)])
    assert ok.exit_code == 0, ok.output
    assert "signature and 6 artifacts verified" in ok.output
    shown = runner.invoke(app, ["bundle", "inspect", str(result.tar), "--key", str(pub)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "signature OK" in shown.output and "digits-tflite-int8" in shown.output
    other = tmp_path / "other.pub"
    other.write_bytes(public_key_to_pem(generate_signing_key().public_key()))
    bad = runner.invoke(app, ["bundle", "verify", str(result.out), "--key", str(other)])
    assert bad.exit_code == 1
    assert Path(result.out).is_dir()
