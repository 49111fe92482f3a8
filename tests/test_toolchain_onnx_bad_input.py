"""A bad ``--onnx`` model through the CLI: a file that is not ONNX, an input the dataset's rows cannot fill, an
``--output`` that is not there. Each is refused with one message naming the problem and what to do, exit 1,
and nothing written: no bundle directory, no tar, nothing in the working directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protocol import generate_signing_key, private_key_to_pem
from tests.test_toolchain_sklearn import assert_nothing_written, cli_build
from toolchain.errors import ModelError
from toolchain.onnx_input import prepare_onnx

skl2onnx = pytest.importorskip("skl2onnx", reason="exporting the models needs skl2onnx (edgeherd[toolchain])")

pytestmark = pytest.mark.integration

FEATURES = 4


def _export(clf, shape: list[object], path: Path) -> Path:
    """``clf`` exported with one float input named "input" of ``shape`` (None: a dynamic dimension; a string: a
    symbolic one, named so)."""
    from skl2onnx.common.data_types import FloatTensorType

    plain = [None if isinstance(d, str) else d for d in shape]
    onx = skl2onnx.convert_sklearn(clf, initial_types=[("input", FloatTensorType(plain))])
    for dim, wanted in zip(onx.graph.input[0].type.tensor_type.shape.dim, shape, strict=True):
        if isinstance(wanted, str):
            dim.dim_param = wanted
    path.write_bytes(onx.SerializeToString())
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("onnx-bad")
    (root / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(root / "data.npz", x=x, y=y)
    clf = LogisticRegression().fit(x, y)
    wide = LogisticRegression().fit(np.hstack([x, x[:, :1]]), y)
    models = {
        "good": _export(clf, [None, FEATURES], root / "good.onnx"),
        "symbolic": _export(clf, ["N", FEATURES], root / "symbolic.onnx"),
        "fixed-batch": _export(clf, [1, FEATURES], root / "fixed-batch.onnx"),
        "wide": _export(wide, [None, FEATURES + 1], root / "wide.onnx"),
        "wide-dynamic": _export(wide, [None, None], root / "wide-dynamic.onnx"),
    }
    return {"root": root, "models": models}


def _build(env, tmp_path: Path, model: Path, *extra: str):
    """``edgeherd build onnx`` of ``model`` on the dataset, in an empty working directory under ``tmp_path``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out" / "bundle"
    result = cli_build(cwd, "onnx", "--onnx", str(model), "--data", str(env["root"] / "data.npz"), "--out", str(out),
                       "--key", str(env["root"] / "signing.key"), *extra)
    return result, " ".join(result.output.split()), out, cwd


def _refused(result, out: Path, cwd: Path) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert_nothing_written(out)
    assert list(cwd.iterdir()) == []


def _not_onnx(env) -> dict[str, tuple[bytes, str]]:
    real = env["models"]["good"].read_bytes()
    return {
        "random": (np.random.default_rng(1).bytes(4096), "its bytes do not parse as an ONNX protobuf"),
        "text": (b"name,value\nthreshold,0.5\n" * 20, "it holds text (it begins 'name,value threshold,0.5"),
        "empty": (b"", "the file is empty (0 bytes)"),
        "truncated": (real[: len(real) // 2], "its bytes do not parse as an ONNX protobuf (a file cut short"),
    }


@pytest.mark.parametrize("kind", ["random", "text", "empty", "truncated"])
def test_a_file_that_is_not_onnx_is_refused(env, tmp_path, kind):
    content, why = _not_onnx(env)[kind]
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    result, said, out, cwd = _build(env, tmp_path, bad)
    _refused(result, out, cwd)
    assert f"error: {bad} cannot run: it is not an ONNX model: {why}" in said
    assert "give the .onnx file an exporter wrote" in said


def test_a_symbolic_batch_dimension_builds(env, tmp_path):
    result, said, out, _ = _build(env, tmp_path, env["models"]["symbolic"], "--no-tar")
    assert result.exit_code == 0, result.output
    assert f"bundle written to {out}" in said


def test_a_fixed_batch_size_is_refused_with_the_export_that_fixes_it(env, tmp_path):
    result, said, out, cwd = _build(env, tmp_path, env["models"]["fixed-batch"])
    _refused(result, out, cwd)
    assert ("input 'input' is a float tensor (1, 4): it has a fixed batch size of 1, and the build evaluates "
            "batches of rows") in said
    assert "onnxmltools: initial_types=[('input', FloatTensorType([None, 4]))]" in said


def test_an_input_wider_than_the_datasets_rows_is_refused(env, tmp_path):
    model = env["models"]["wide"]
    result, said, out, cwd = _build(env, tmp_path, model)
    _refused(result, out, cwd)
    assert str(model) in said and "'input'" in said and "(batch, 5)" in said
    # the model checked against one row of the data, before anything is built
    with pytest.raises(ModelError) as exc:
        prepare_onnx(model, tmp_path / "prepared.onnx", row_shape=(FEATURES,))
    assert ("input 'input' is a float tensor (batch, 5), and the dataset's rows are shaped (4,) (4 values each): "
            "the data cannot fill it") in str(exc.value)
    assert not (tmp_path / "prepared.onnx").exists()


def test_a_dynamic_feature_dimension_the_rows_do_not_fill_is_refused(env, tmp_path):
    """Declared (batch, ?): the declaration fits any rows, while the LinearClassifier's weights read 5 values (ONNX
    Runtime would run it on rows of 4 and answer nonsense): the prepared model declares the 5, rows of 4 are refused."""
    model = env["models"]["wide-dynamic"]
    result, said, out, cwd = _build(env, tmp_path, model)
    _refused(result, out, cwd)
    flat = " ".join(said.split())  # the CLI wraps long messages
    assert str(model) in flat and "its LinearClassifier reads 5 values per row" in flat
    assert "the data cannot fill it" in flat
    with pytest.raises(ModelError) as exc:
        prepare_onnx(model, tmp_path / "prepared.onnx", row_shape=(FEATURES,))
    assert ("its LinearClassifier reads 5 values per row (input 'input'), and the dataset's rows are shaped (4,): the "
            "data cannot fill it") in str(exc.value)


def test_an_output_that_does_not_exist_is_refused_with_the_outputs_there_are(env, tmp_path):
    result, said, out, cwd = _build(env, tmp_path, env["models"]["good"], "--output", "scores")
    _refused(result, out, cwd)
    assert (f"{env['models']['good']} has no output 'scores'; its outputs are: output_label (int64 tensor (batch,)), "
            "output_probability (ZipMap of 'probabilities': a sequence of maps)") in said


def test_no_batch_dimension_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["scores"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [FEATURES])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [FEATURES])])
    model = helper.make_model(graph)
    path = tmp_path / "flat.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=r"input 'input' is a float tensor \(4,\): it has no batch dimension.*"
                                         r"FloatTensorType\(\[None, 4\]\)"):
        prepare_onnx(path, path.with_name("prepared.onnx"))
    assert not path.with_name("prepared.onnx").exists()
