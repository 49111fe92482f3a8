"""A scikit-learn model brought as ONNX: skl2onnx's export (``ai.onnx.ml`` operators, a label and a ZipMap
probabilities output) becomes a bundle whose one artifact serves the probabilities, evaluated, smoke-tested and
run by the agent on that same output; the targets that cannot be made are named with the reason; nothing is
left in the working directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.predictor import Predictor
from agent.runtime import smoke_test
from protocol import Target, generate_signing_key, private_key_to_pem
from server.cli import app
from tests.toolchain_helpers import SCHEMA, blobs, write_csv, write_schema
from toolchain.bundle import ARTIFACTS, CARD, REPORT, verify_bundle
from toolchain.data import SPLITS, load_npz, split_indices
from toolchain.errors import ConversionError, ModelError
from toolchain.onnx_input import prepare_onnx
from toolchain.pipeline import BuildSpec, build
from toolchain.validate import validate

skl2onnx = pytest.importorskip("skl2onnx", reason="exporting the model needs skl2onnx (edgeherd[toolchain])")

pytestmark = pytest.mark.integration

NAME = "iris"
SKIPPED = {"onnx-int8": "ai.onnx.ml", "tensorrt": "ai.onnx.ml", "tflite": "needs a torch model"}


def _export(clf, x: np.ndarray, path: Path, **options) -> Path:
    onx = skl2onnx.to_onnx(clf, x[:1].astype(np.float32), options={id(clf): options} if options else None)
    path.write_bytes(onx.SerializeToString())
    return path


def build_splits(data: Path) -> dict[str, np.ndarray]:
    """The build's splits of ``data`` (seed 0), computed the way the build computes them."""
    ds = load_npz(data)
    _, kept = validate(ds)
    return {k: kept[v] for k, v in split_indices(ds.y[kept], 0).items()}


def cli_build(cwd: Path, *args: str):
    """`edgeherd build` in-process, with ``cwd`` as the working directory."""
    before = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, ["build", *args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("sklearn")
    key = generate_signing_key()
    (root / "signing.key").write_bytes(private_key_to_pem(key))
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    data = root / "iris.npz"
    np.savez(data, x=x, y=y.astype(np.int64))
    splits = build_splits(data)
    clf = LogisticRegression(max_iter=1000).fit(x[splits["train"]], y[splits["train"]])
    model = _export(clf, x, root / "logreg.onnx")  # ZipMap on, as skl2onnx exports by default
    cwd = root / "cwd"
    cwd.mkdir()
    out = root / "bundles" / NAME
    result = cli_build(cwd, "onnx", "--onnx", str(model), "--data", str(data), "--name", NAME, "--out", str(out),
                  "--key", str(root / "signing.key"))
    return {"result": result, "out": out, "key": key, "clf": clf, "x": x, "y": y, "splits": splits, "model": model,
            "cwd": cwd, "root": root}


def test_the_build_ships_the_fp32_onnx_artifact_and_names_the_targets_it_cannot_make(built):
    result, out = built["result"], built["out"]
    assert result.exit_code == 0, result.output
    assert "Only support models of onnx opset" not in result.output  # ONNX Runtime's tools are not heard
    m = verify_bundle(out, built["key"].public_key())
    assert [(a.name, a.target) for a in m.artifacts] == [(f"{NAME}-onnx-fp32", Target.ONNX)]
    art = m.artifacts[0]
    assert [t.name for t in art.outputs] == ["probabilities"] and art.outputs[0].shape == [-1, 3]
    assert [t.name for t in art.inputs] == ["X"]
    assert m.lineage["onnx_output"] == "probabilities"

    report = json.loads((out / REPORT).read_text())
    assert set(report["skipped"]) == set(SKIPPED)
    for target, why in SKIPPED.items():
        assert why in report["skipped"][target], (target, report["skipped"][target])
    assert report["rejected"] == {}
    assert report["onnx_input"]["source_output"] == "output_probability"
    assert report["onnx_input"]["zipmap_removed"] is True
    assert report["onnx_input"]["dropped_outputs"] == ["output_label"]

    card = (out / CARD).read_text()
    assert "### Not built" in card
    for target in SKIPPED:
        assert f"- **{target}**: " in card
    assert "output `probabilities`" in card


def test_nothing_is_left_in_the_working_directory(built):
    assert built["result"].exit_code == 0, built["result"].output
    assert sorted(p.name for p in built["cwd"].iterdir()) == []
    assert sorted(p.name for p in (built["root"] / "bundles").iterdir()) == [NAME, f"{NAME}.tar"]


def test_the_agent_answers_what_onnx_runtime_and_sklearn_answer(built):
    import onnxruntime as ort

    m = verify_bundle(built["out"], built["key"].public_key())
    art = m.artifacts[0]
    path = built["out"] / ARTIFACTS / art.sha256
    x_test = built["x"][built["splits"]["test"]]
    pred = Predictor(path, m, art, stats=False)
    try:
        assert smoke_test(pred) is None
        agent_out = pred.predict(x_test)
    finally:
        pred.close()

    own = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"], {"X": x_test})[0]
    np.testing.assert_array_equal(agent_out, own)
    # the supplied file's ZipMap answers: the same probabilities, as {class: probability} maps
    label, zipmap = ort.InferenceSession(str(built["model"]), providers=["CPUExecutionProvider"]).run(
        ["output_label", "output_probability"], {"X": x_test})
    supplied = np.array([[row[c] for c in range(3)] for row in zipmap], dtype=np.float32)
    np.testing.assert_array_equal(agent_out, supplied)
    assert (agent_out.argmax(1) == label).all()
    diff = float(np.abs(agent_out - built["clf"].predict_proba(x_test)).max())
    assert diff < 1e-5, f"max abs diff against sklearn's predict_proba {diff:.2e}"


def test_the_bundle_accuracy_is_sklearns_accuracy_on_the_same_test_split(built):
    m = verify_bundle(built["out"], built["key"].public_key())
    splits = built["splits"]
    digest = hashlib.sha256(b"".join(splits[k].astype("<i8").tobytes() for k in SPLITS)).hexdigest()
    assert m.lineage["split_sha256"] == digest  # the split the test computed is the build's
    test = splits["test"]
    sklearn_accuracy = float(built["clf"].score(built["x"][test], built["y"][test]))
    assert m.artifacts[0].metrics["accuracy"] == pytest.approx(sklearn_accuracy, abs=1e-6)
    report = json.loads((built["out"] / REPORT).read_text())
    assert report["importance"]["features"], "permutation importance ran on the probabilities output"


def test_quantisation_that_fails_leaves_nothing_in_the_working_directory(built, tmp_path, monkeypatch):
    """ONNX Runtime's shape inference writes sym_shape_infer_temp.onnx into the current directory when it gives
    up, as it does on ai.onnx.ml operators; quantize_onnx runs it in a temporary directory instead."""
    from toolchain.quantize import quantize_onnx

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root_level = logging.getLogger().level
    with pytest.raises(ConversionError, match="ONNX int8 quantisation failed"):
        quantize_onnx(built["model"], tmp_path / "int8.onnx", built["x"][:16])
    assert list(cwd.iterdir()) == []
    assert Path.cwd() == cwd
    assert logging.getLogger().level == root_level


def test_an_export_without_zipmap_serves_its_probabilities_tensor(built, tmp_path):
    model = _export(built["clf"], built["x"], tmp_path / "plain.onnx", zipmap=False)
    prepared = prepare_onnx(model, tmp_path / "prepared.onnx")
    assert (prepared.output, prepared.zipmap, prepared.dropped) == ("probabilities", False, ["label"])
    assert prepared.domains == ["ai.onnx.ml"]


# --- bad input: one message naming the problem, exit 1, nothing written ------------------------------------------

def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".tar").exists()
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir()] == []


def test_a_file_that_is_not_onnx_is_refused(built, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 20)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out" / "bundle"
    result = cli_build(cwd, "--onnx", str(bad), "--data", str(built["root"] / "iris.npz"), "--out", str(out),
                  "--key", str(built["root"] / "signing.key"))
    assert result.exit_code == 1, result.output
    assert "model.onnx cannot run: it is not an ONNX model" in " ".join(result.output.split())
    assert_nothing_written(out)
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize(("output", "message"), [
    ("scores", "has no output 'scores'; its outputs are: output_label (int64 tensor (batch,)), output_probability "
               "(ZipMap of 'probabilities': a sequence of maps)"),
])
def test_an_output_that_is_not_there_is_refused(built, tmp_path, output, message):
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ModelError) as exc:
        build(BuildSpec(recipe="onnx", onnx=built["model"], data=built["root"] / "iris.npz", output=output, out=out,
                        key=built["root"] / "signing.key"))
    assert message in str(exc.value)
    assert_nothing_written(out)


def _label_only(src: Path, dst: Path) -> Path:
    """``src`` with its probabilities output removed: a model that answers class ids alone."""
    import onnx

    model = onnx.load(str(src))
    keep = [o for o in model.graph.output if o.name == "output_label"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    dst.write_bytes(model.SerializeToString())
    return dst


@pytest.mark.parametrize("how", ["--output output_label", "a label-only model"])
def test_a_label_output_is_served_as_one_hot_scores(built, tmp_path, how):
    """Class ids are served as labels: one-hot scores whose argmax is the supplied model's label, evaluated like any
    scores (the bundle's accuracy is the label's accuracy on the test split)."""
    import onnxruntime as ort
    from sklearn.metrics import accuracy_score

    model = built["model"] if how.startswith("--") else _label_only(built["model"], tmp_path / "labels.onnx")
    result = build(BuildSpec(recipe="onnx", onnx=model, data=built["root"] / "iris.npz", name=NAME,
                             output="output_label" if how.startswith("--") else None, out=tmp_path / "b",
                             key=built["root"] / "signing.key", tar=False))
    art = result.manifest.artifacts[0]
    assert [t.name for t in art.outputs] == ["output_label_one_hot"] and art.outputs[0].shape == [-1, 3]
    assert result.report["onnx_input"]["source_output"] == "output_label"
    assert any("one-hot" in n for n in result.report["onnx_input"]["notes"])
    x_test, y_test = built["x"][built["splits"]["test"]], built["y"][built["splits"]["test"]]
    served = ort.InferenceSession(str(tmp_path / "b" / ARTIFACTS / art.sha256),
                                  providers=["CPUExecutionProvider"]).run(None, {"X": x_test})[0]
    (label,) = ort.InferenceSession(str(built["model"]), providers=["CPUExecutionProvider"]).run(
        ["output_label"], {"X": x_test})
    np.testing.assert_array_equal(served, np.eye(3, dtype=np.float32)[label])
    assert art.metrics["accuracy"] == pytest.approx(accuracy_score(y_test, label), abs=1e-9)


def test_the_chosen_output_by_name_builds(built, tmp_path):
    """``output`` names the ZipMap output (as the source model calls it): the same probabilities tensor ships."""
    result = build(BuildSpec(recipe="onnx", onnx=built["model"], data=built["root"] / "iris.npz",
                             output="output_probability", name=NAME, out=tmp_path / "b",
                             key=built["root"] / "signing.key", tar=False))
    assert [t.name for t in result.manifest.artifacts[0].outputs] == ["probabilities"]


def test_score_columns_in_another_order_than_the_datasets_classes_are_refused(tmp_path):
    """skl2onnx orders a string-labelled model's columns alphabetically; the schema declares its own order."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(300)
    classes = ("ok", "imbalance", "bearing")
    clf = LogisticRegression(max_iter=500).fit(x, np.array([classes[i] for i in y]))
    model = _export(clf, x, tmp_path / "strings.onnx")
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ModelError) as exc:
        build(BuildSpec(recipe="onnx", onnx=model, data=write_csv(tmp_path / "v.csv", x, y),
                        schema=write_schema(tmp_path / "s.toml", SCHEMA), out=out, key=tmp_path / "signing.key"))
    assert ("the model's score columns are the classes ['bearing', 'imbalance', 'ok'], the dataset's classes are "
            "['ok', 'imbalance', 'bearing'], in another order") in str(exc.value)
    assert_nothing_written(out)


def test_the_onnx_backend_runs_the_output_it_is_given_by_name_and_refuses_a_map(built):
    from agent.backends.onnx import OnnxRuntimeBackend
    from agent.errors import ModelLoadError

    x = built["x"][:5]
    labels = OnnxRuntimeBackend(built["model"], output="output_label")
    try:
        assert labels.output.name == "output_label"
        np.testing.assert_array_equal(labels.predict(x), built["clf"].predict(x).astype(np.float32))
    finally:
        labels.close()
    with pytest.raises(ModelLoadError, match="output 'output_probability' is seq"):
        OnnxRuntimeBackend(built["model"], output="output_probability")
    with pytest.raises(ModelLoadError, match="has no output 'scores', which its manifest declares; its outputs are: "
                                             "output_label"):
        OnnxRuntimeBackend(built["model"], output="scores")


def test_the_cli_takes_output_and_says_what_it_did_not_build(built, tmp_path):
    out = tmp_path / "cli-bundle"
    said = cli_build(tmp_path, "onnx", "--onnx", str(built["model"]), "--data", str(built["root"] / "iris.npz"),
                "--output", "output_probability", "--out", str(out), "--key", str(built["root"] / "signing.key"))
    assert said.exit_code == 0, said.output
    text = " ".join(said.output.split())
    assert "not built onnx-int8:" in text and f"bundle written to {out}" in text
    refused = cli_build(tmp_path, "onnx", "--onnx", str(built["model"]), "--data", str(built["root"] / "iris.npz"),
                   "--output", "scores", "--out", str(tmp_path / "never"), "--key", str(built["root"] / "signing.key"))
    assert refused.exit_code == 1 and "has no output 'scores'" in " ".join(refused.output.split())
    assert not (tmp_path / "never").exists()


def test_class_ids_no_classifier_bounds_are_refused(tmp_path):
    """An ArgMax head answers ids nothing bounds: an id past the dataset's classes would become an all-zero row,
    scored as class 0. Refused, saying how to export the scores instead."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["input"], ["label"], axis=1, keepdims=0)], "argmax",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 5])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None])])
    src = tmp_path / "argmax.onnx"
    src.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(ModelError, match="no classifier operator of the model says which"):
        prepare_onnx(src, tmp_path / "out.onnx", row_shape=(5,), classes=3)
    assert not (tmp_path / "out.onnx").exists()
