"""Bad input to `edgeherd build`: one clear error, non-zero exit, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from protocol import generate_signing_key, private_key_to_pem
from server.cli import app
from tests.toolchain_helpers import SCHEMA, blobs, write_csv, write_schema

pytestmark = pytest.mark.integration


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    return tmp_path


def run_build(ws, *args):
    out = ws / "out" / "bundle"
    result = CliRunner().invoke(app, ["build", *args, "--out", str(out), "--key", str(ws / "signing.key"),
                                      "--epochs", "2"], env={"COLUMNS": "200"})
    return result, out


def assert_nothing_written(ws, out):
    assert not out.exists()
    assert not out.with_name(out.name + ".tar").exists()
    parent = out.parent
    leftovers = [p.name for p in parent.iterdir()] if parent.exists() else []
    assert [n for n in leftovers if n.endswith(".partial")] == []
    assert not any(n.endswith(".work") and any((parent / n).rglob("*.onnx")) for n in leftovers)


def _csv(ws, x, y, **kw):
    return write_csv(ws / "data.csv", x, y, **kw), write_schema(ws / "schema.toml")


CASES = {
    "missing dataset": lambda ws: (["tabular", "--data", str(ws / "nope.csv"), "--schema",
                                    str(write_schema(ws / "schema.toml"))], "nope.csv does not exist"),
    "malformed dataset": lambda ws: ((ws / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 50) and None) or (
        ["tabular", "--data", str(ws / "bin.csv"), "--schema", str(write_schema(ws / "schema.toml"))], "not UTF-8"),
    "ragged csv": lambda ws: ((ws / "r.csv").write_text("rms,peak_hz,kurtosis,temp,fault\n1,2,3,4,ok\n1,2\n")
                              and None) or (["tabular", "--data", str(ws / "r.csv"), "--schema",
                                             str(write_schema(ws / "schema.toml"))], "line 3: 2 fields"),
    "wrong schema": lambda ws: (["tabular", "--data", str(_csv(ws, *blobs())[0]), "--schema",
                                 str(write_schema(ws / "s2.toml", SCHEMA.replace('"temp"', '"humidity"')))],
                                "lacks the column(s) humidity"),
    "schema not toml": lambda ws: (["tabular", "--data", str(_csv(ws, *blobs())[0]), "--schema",
                                    str(write_schema(ws / "s3.toml", "label = [unclosed"))], "not valid TOML"),
    "non-numeric value": lambda ws: ((ws / "t.csv").write_text("rms,peak_hz,kurtosis,temp,fault\n1,2,abc,4,ok\n")
                                     and None) or (["tabular", "--data", str(ws / "t.csv"), "--schema",
                                                    str(write_schema(ws / "schema.toml"))],
                                                   "'abc' is not a number"),
    "nan storm": lambda ws: (["tabular", "--data", str(_nan_storm(ws)), "--schema",
                              str(write_schema(ws / "schema.toml"))], "hold NaN or inf"),
    "one class": lambda ws: (["tabular", "--data", str(_csv(ws, blobs()[0], np.zeros(600, dtype=int))[0]),
                              "--schema", str(write_schema(ws / "schema.toml"))], "single class ('ok')"),
    "leakage": lambda ws: (["tabular", "--data", str(_leaky(ws)), "--schema", str(write_schema(ws / "schema.toml"))],
                           "also appear in the training split"),
    "onnx does not load": lambda ws: ((ws / "bad.onnx").write_bytes(b"not a model") and None) or (
        ["--onnx", str(ws / "bad.onnx"), "--data", str(_npz(ws))], "bad.onnx cannot run"),
    "torch class does not import": lambda ws: (["--model", "no_such_pkg.nets:Net", "--weights", str(ws / "w.pt"),
                                                "--data", str(_npz(ws))], "cannot import module 'no_such_pkg.nets'"),
}


def _nan_storm(ws):
    x, y = blobs()
    x[::3, 1] = np.nan
    return write_csv(ws / "nan.csv", x, y)


def _leaky(ws):
    x, y = blobs()
    x = np.concatenate([x, x[:300]])
    y = np.concatenate([y, (y[:300] + 1) % 3])  # same features, other label: not exact duplicates
    return write_csv(ws / "leaky.csv", x, y)


def _npz(ws):
    x, y = blobs()
    np.savez(ws / "d.npz", x=x, y=y)
    return ws / "d.npz"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_and_nothing_is_written(ws, case):
    args, message = CASES[case](ws)
    result, out = run_build(ws, *args)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()), result.output
    assert_nothing_written(ws, out)


def test_fatal_validation_prints_the_report(ws):
    result, _ = run_build(ws, "tabular", "--data", str(_nan_storm(ws)), "--schema",
                          str(write_schema(ws / "schema.toml")))
    assert "data validation" in result.output and "fatal" in result.output and "nothing was written" in result.output


def test_output_holding_another_bundle_is_refused(ws):
    x, y = blobs(90)
    data, schema = _csv(ws, x, y)
    first, out = run_build(ws, "tabular", "--data", str(data), "--schema", str(schema), "--no-tar")
    assert first.exit_code == 0, first.output
    before = sorted(p.name for p in (out / "artifacts").iterdir())
    again, _ = run_build(ws, "tabular", "--data", str(data), "--schema", str(schema), "--no-tar")
    assert again.exit_code == 1
    assert "already holds a bundle of data 1.0.0" in " ".join(again.output.split())
    assert sorted(p.name for p in (out / "artifacts").iterdir()) == before


def test_missing_signing_key_is_refused_before_any_work(ws):
    out = ws / "out" / "bundle"
    result = CliRunner().invoke(app, ["build", "digits", "--out", str(out), "--key", str(ws / "missing.key")])
    assert result.exit_code == 1
    assert "create one with `edgeherd keys generate" in " ".join(result.output.split())
    assert_nothing_written(ws, out)


def test_unknown_recipe(ws):
    result, out = run_build(ws, "resnet")
    assert result.exit_code == 2 and "unknown recipe 'resnet'" in result.output
    assert_nothing_written(ws, out)
