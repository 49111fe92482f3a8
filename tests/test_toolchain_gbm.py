"""A LightGBM classifier brought as ONNX (onnxmltools' ``convert_lightgbm``: a TreeEnsembleClassifier of the
``ai.onnx.ml`` domain, a label output and a probabilities output, a ZipMap by default): the build serves the
probabilities, evaluates them as ONNX Runtime computes them on the supplied file, ships the fp32 model and names
each target it cannot make, with the reason, in the build report and the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.predictor import Predictor
from agent.runtime import smoke_test
from protocol import Target, generate_signing_key, private_key_to_pem
from tests.test_toolchain_sklearn import build_splits, cli_build
from toolchain.bundle import ARTIFACTS, CARD, REPORT, verify_bundle
from toolchain.errors import ModelError
from toolchain.onnx_input import prepare_onnx

lightgbm = pytest.importorskip("lightgbm", reason="the LightGBM model needs lightgbm (edgeherd[dev])")
onnxmltools = pytest.importorskip("onnxmltools", reason="exporting it needs onnxmltools (edgeherd[dev])")

pytestmark = pytest.mark.integration

#: Targets an ai.onnx.ml model cannot become, and a word each reason must hold.
SKIPPED = {"onnx-int8": "ai.onnx.ml", "tensorrt": "ai.onnx.ml", "tflite": "needs a torch model"}


def export_lightgbm(clf, n_features: int, path: Path, *, zipmap: bool = True, batch: object = None) -> Path:
    """``clf`` as onnxmltools exports it, with one float input named "input" shaped (``batch``, ``n_features``)."""
    from onnxmltools.convert.common.data_types import FloatTensorType

    onx = onnxmltools.convert_lightgbm(clf, initial_types=[("input", FloatTensorType([batch, n_features]))],
                                       zipmap=zipmap)
    path.write_bytes(onx.SerializeToString())
    return path


def ort_probabilities(model: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's probabilities for ``x`` from the supplied file: its "probabilities" output, as a tensor (a
    ZipMap's {class: probability} maps read in class order)."""
    import onnxruntime as ort

    (out,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["probabilities"], {"input": x})
    if isinstance(out, list):  # ZipMap: one dict per row
        return np.array([[row[c] for c in sorted(row)] for row in out], dtype=np.float32)
    return np.asarray(out, dtype=np.float32)


def noisy_classes(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A table whose classes a model separates well but not perfectly (so an accuracy compares for real)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=600, n_features=8, n_informative=5, n_redundant=1, n_classes=n_classes,
                               flip_y=0.08, class_sep=1.0, random_state=0)
    return x.astype(np.float32), y.astype(np.int64)


CASES = {  # name: (classes, zipmap)
    "multi-zipmap": (3, True),
    "multi-tensor": (3, False),
    "binary-zipmap": (2, True),
    "binary-tensor": (2, False),
}


@pytest.fixture(scope="module")
def gbm(tmp_path_factory):
    root = tmp_path_factory.mktemp("gbm")
    (root / "signing.key").write_bytes(private_key_to_pem(key := generate_signing_key()))
    cwd = root / "cwd"
    cwd.mkdir()
    built = {}
    for case, (classes, zipmap) in CASES.items():
        x, y = noisy_classes(classes)
        data = root / f"{classes}.npz"
        if not data.exists():
            np.savez(data, x=x, y=y)
        splits = build_splits(data)
        clf = lightgbm.LGBMClassifier(n_estimators=30, num_leaves=8, verbose=-1, random_state=0, n_jobs=1)
        clf.fit(x[splits["train"]], y[splits["train"]])
        model = export_lightgbm(clf, x.shape[1], root / f"{case}.onnx", zipmap=zipmap)
        out = root / "bundles" / case
        result = cli_build(cwd, "onnx", "--onnx", str(model), "--data", str(data), "--name", case, "--out", str(out),
                           "--key", str(root / "signing.key"))
        built[case] = {"result": result, "out": out, "model": model, "clf": clf, "x": x, "y": y, "splits": splits,
                       "classes": classes, "zipmap": zipmap}
    return {"root": root, "key": key, "cwd": cwd, "built": built}


@pytest.mark.parametrize("case", list(CASES))
def test_the_build_serves_the_probabilities_and_names_what_it_did_not_build(gbm, case):
    b = gbm["built"][case]
    assert b["result"].exit_code == 0, b["result"].output
    m = verify_bundle(b["out"], gbm["key"].public_key())
    assert [(a.name, a.target) for a in m.artifacts] == [(f"{case}-onnx-fp32", Target.ONNX)]
    (art,) = m.artifacts
    # onnxmltools' ZipMap reads the tensor "lgbmprobabilities"; without a ZipMap "probabilities" is that tensor
    served = "lgbmprobabilities" if b["zipmap"] else "probabilities"
    assert [(t.name, t.shape) for t in art.outputs] == [(served, [-1, b["classes"]])]
    assert [t.name for t in art.inputs] == ["input"]
    assert m.lineage["onnx_output"] == served

    report = json.loads((b["out"] / REPORT).read_text())
    assert report["onnx_input"]["source_output"] == "probabilities"
    assert report["onnx_input"]["zipmap_removed"] is b["zipmap"]
    assert report["onnx_input"]["dropped_outputs"] == ["label"]
    assert report["onnx_input"]["operator_domains"] == ["ai.onnx.ml"]
    assert set(report["skipped"]) == set(SKIPPED)
    for target, why in SKIPPED.items():
        assert why in report["skipped"][target], (target, report["skipped"][target])
    assert "TreeEnsembleClassifier" in report["skipped"]["onnx-int8"]
    said = " ".join(b["result"].output.split())
    assert "not built onnx-int8: int8 quantisation needs every operator in the default ONNX domain" in said

    card = (b["out"] / CARD).read_text()
    assert "### Not built" in card
    for target in SKIPPED:
        assert f"- **{target}**: " in card
    assert f"output `{served}`" in card


@pytest.mark.parametrize("case", list(CASES))
def test_the_artifact_answers_what_onnx_runtime_and_lightgbm_answer_and_its_accuracy_is_theirs(gbm, case):
    from sklearn.metrics import accuracy_score

    b = gbm["built"][case]
    assert b["result"].exit_code == 0, b["result"].output
    m = verify_bundle(b["out"], gbm["key"].public_key())
    (art,) = m.artifacts
    test = b["splits"]["test"]
    x_test, y_test = b["x"][test], b["y"][test]
    pred = Predictor(b["out"] / ARTIFACTS / art.sha256, m, art, stats=False)
    try:
        assert smoke_test(pred) is None  # the golden vectors replay on the served output
        served = pred.predict(x_test)
    finally:
        pred.close()

    supplied = ort_probabilities(b["model"], x_test)
    # the same trees, summed in ONNX Runtime's thread order: equal to float32 rounding
    np.testing.assert_allclose(served, supplied, rtol=0, atol=1e-6)
    diff = float(np.abs(served - b["clf"].predict_proba(x_test)).max())
    assert diff < 1e-5, f"max abs diff against LightGBM's predict_proba {diff:.2e}"
    accuracy = float(accuracy_score(y_test, supplied.argmax(1)))
    assert 0.6 < accuracy < 1.0, accuracy  # a test that can tell two accuracies apart
    assert art.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)  # the manifest keeps 6 decimals


def test_nothing_is_left_in_the_working_directory(gbm):
    assert all(b["result"].exit_code == 0 for b in gbm["built"].values())
    assert list(gbm["cwd"].iterdir()) == []
    assert sorted(p.name for p in (gbm["root"] / "bundles").iterdir()) == sorted(
        [*CASES, *(f"{c}.tar" for c in CASES)])


def test_the_tree_ensemble_is_the_only_ml_operator_left_and_outputs_are_chosen_by_either_name(gbm, tmp_path):
    b = gbm["built"]["multi-zipmap"]
    for wanted in (None, "probabilities", "lgbmprobabilities"):
        prepared = prepare_onnx(b["model"], tmp_path / "p.onnx", wanted, row_shape=(8,))
        assert (prepared.output, prepared.source_output, prepared.zipmap) == (
            "lgbmprobabilities", "probabilities", True)
        assert (prepared.domains, prepared.operators) == (["ai.onnx.ml"], ["TreeEnsembleClassifier"])
        assert prepared.class_labels == ["0", "1", "2"]
    # the label output, chosen by name, is served as labels: one-hot scores over the classifier's class ids
    labels = prepare_onnx(b["model"], tmp_path / "labels.onnx", "label", row_shape=(8,), classes=3)
    assert (labels.output, labels.labels, labels.class_labels) == ("label_one_hot", True, ["0", "1", "2"])
    with pytest.raises(ModelError, match="this dataset has no classes"):
        prepare_onnx(b["model"], tmp_path / "refused.onnx", "label")
    assert not (tmp_path / "refused.onnx").exists()


def test_int8_names_the_operators_it_cannot_quantise():
    from toolchain.quantize import int8_unsupported

    assert int8_unsupported([]) is None
    why = int8_unsupported(["ai.onnx.ml"], ["TreeEnsembleClassifier"])
    assert why is not None and "ai.onnx.ml (TreeEnsembleClassifier)" in why and why.endswith("the fp32 model ships")
