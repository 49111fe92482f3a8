"""Regression models, piece by piece: a schema with ``task = "regression"``, its refused labels, the target's
validation and stratified splits, the error metrics against scikit-learn's, the MAE gate in the target's units,
the output bins the toolchain and the device count on, the server's output drift on those bins (what the
rollout's ``predictions`` gate reads), the manifest's schema for them, and the local API's answer.

The whole path (build, push, deploy, a real agent answering ``/v1/predict``) is tests/test_regression_e2e.py.
"""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from typer.testing import CliRunner

from agent.api import answer
from agent.window import WindowStats, output_bin_counts
from protocol import (
    FeatureReference,
    FeatureStats,
    FeatureWindow,
    ReferenceProfile,
    generate_signing_key,
    private_key_to_pem,
)
from protocol.manifest import MANIFEST_SCHEMA_3, schema_for
from server.drift import MIN_WINDOW, misfit, score
from server.orchestrator import OUTPUT_ALPHA
from tests.samples import manifest
from toolchain import data as datamod
from toolchain.errors import DataError
from toolchain.evaluate import error_gate, error_metrics
from toolchain.regression import golden_rows, smoke_atol, with_output_bins
from toolchain.validate import validate

FEATURES = ("load", "speed", "temp", "humidity")


def regression_data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth target of four features plus noise, far from zero (its mean near 100)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, len(FEATURES)))
    y = 100 + 10 * np.sin(x[:, 0]) + 5 * x[:, 1] ** 2 - 3 * x[:, 2] + rng.normal(0, 0.5, n)
    return x, y


def write_regression(folder: Path, x: np.ndarray, y: np.ndarray | list[str], *, label: str = "power_kw",
                     extra_schema: str = "") -> tuple[Path, Path]:
    """The table as CSV (a ``site`` segment column too) and its schema TOML with ``task = "regression"``."""
    data, schema = folder / "power.csv", folder / "power.toml"
    with data.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*FEATURES, "site", label])
        for i, (row, target) in enumerate(zip(x, y, strict=True)):
            w.writerow([*(f"{v:.6f}" for v in row), f"site{i % 3}", target if isinstance(target, str) else
                        f"{target:.6f}"])
    schema.write_text(f'label = "{label}"\ntask = "regression"\nsegments = ["site"]\n{extra_schema}' + "".join(
        f'[[features]]\nname = "{f}"\nmin = -3.0\nmax = 3.0\n' for f in FEATURES))
    return data, schema


# -- data: schema, loading, validation, splits ----------------------------------------------------------------


def test_a_regression_table_loads_its_label_as_numbers(tmp_path):
    x, y = regression_data(200)
    data, schema = write_regression(tmp_path, x, y)
    ds = datamod.load_table(data, datamod.load_schema(schema))
    assert ds.task == "regression" and ds.classes == []
    assert ds.y.dtype == np.float64
    np.testing.assert_allclose(ds.y, y, atol=1e-6)


def test_a_regression_schema_with_classes_is_refused(tmp_path):
    x, y = regression_data(60)
    _, schema = write_regression(tmp_path, x, y, extra_schema='classes = ["a", "b"]\n')
    with pytest.raises(DataError, match="a regression schema has no classes"):
        datamod.load_schema(schema)


@pytest.mark.parametrize(("bad", "needle"), [("nan", "1 missing, NaN or infinite"), ("", "1 missing, NaN"),
                                             ("inf", "1 missing, NaN or infinite"), ("lots", "is not a number")])
def test_a_label_that_is_not_a_finite_number_is_refused_naming_the_row(tmp_path, bad, needle):
    x, y = regression_data(60)
    labels = [f"{v:.6f}" for v in y]
    labels[7] = bad
    data, schema = write_regression(tmp_path, x, labels)
    with pytest.raises(DataError, match="row 8") as err:
        datamod.load_table(data, datamod.load_schema(schema))
    assert needle in str(err.value) and "'power_kw'" in str(err.value)


def test_the_cli_refuses_a_nan_label_with_exit_1_and_writes_nothing(tmp_path):
    from server.cli import app

    x, y = regression_data(100)
    labels = [f"{v:.6f}" for v in y]
    labels[3] = labels[40] = "NaN"
    data, schema = write_regression(tmp_path, x, labels)
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    out = tmp_path / "out" / "bundle"
    result = CliRunner().invoke(app, ["build", "tabular", "--data", str(data), "--schema", str(schema), "--out",
                                      str(out), "--key", str(tmp_path / "signing.key"), "--epochs", "1"],
                                env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "label column 'power_kw' has 2 missing, NaN or infinite value(s) (first at row 4" in text
    assert "drop or fill those rows" in text
    assert not out.exists() and not out.with_name("bundle.tar").exists()
    assert not (out.parent.exists() and any(out.parent.rglob("*.onnx")))


def test_a_constant_target_fails_validation(tmp_path):
    x, _ = regression_data(100)
    data, schema = write_regression(tmp_path, x, np.full(100, 4.2))
    report, _ = validate(datamod.load_table(data, datamod.load_schema(schema)))
    assert [(f.rule, f.severity) for f in report.fatal] == [("target", "fatal")]
    assert "constant" in report.summary()


def test_regression_splits_span_the_target_range(tmp_path):
    x, y = regression_data(1000)
    data, schema = write_regression(tmp_path, x, y)
    ds = datamod.load_table(data, datamod.load_schema(schema))
    splits = datamod.split_indices(datamod.strata(ds), seed=0)
    assert sum(len(v) for v in splits.values()) == len(y)
    deciles = np.quantile(y, np.linspace(0, 1, 11))
    for name, rows in splits.items():  # every split has rows in every decile of the target
        assert len(np.unique(np.searchsorted(deciles[1:-1], y[rows]))) == 10, name


# -- metrics, gate, golden rows, smoke tolerance -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_metrics_equal_sklearns(seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(50, 10, 500)
    pred = y + rng.normal(0, 2, 500)
    m = error_metrics(y, pred.astype(np.float32))
    p64 = pred.astype(np.float32).astype(np.float64)
    assert m.mae == pytest.approx(mean_absolute_error(y, p64), abs=1e-12)
    assert m.rmse == pytest.approx(np.sqrt(mean_squared_error(y, p64)), abs=1e-12)
    assert m.r2 == pytest.approx(r2_score(y, p64), abs=1e-12)


@pytest.mark.parametrize(("mae", "base", "allowed", "fails"), [
    (1.05, 1.0, 0.1, False), (1.2, 1.0, 0.1, True), (0.9, 1.0, 0.0, False), (1.0, 1.0, 0.0, False),
    (1000.6, 1000.0, 0.5, True), (1000.4, 1000.0, 0.5, False)])
def test_the_mae_gate_is_in_the_targets_units(mae, base, allowed, fails):
    why = error_gate(mae, base, allowed)
    assert (why is not None) == fails
    if why:
        assert "in the target's units" in why and "--max-drop" in why


def test_golden_rows_spread_over_the_target():
    y = np.random.default_rng(0).normal(0, 1, 400)
    rows = golden_rows(y)
    assert len(rows) == 8 and y[rows].min() == y.min() and y[rows].max() == y.max()


def test_the_smoke_tolerance_follows_the_spread_and_the_precision():
    from protocol import Precision, Target

    y = np.random.default_rng(0).normal(1000, 20, 300)
    out = np.full((8, 1), 1000.0)
    fp32 = smoke_atol(y, out, Target.ONNX, Precision.FP32)
    int8 = smoke_atol(y, out, Target.ONNX, Precision.INT8)
    trt = smoke_atol(y, out, Target.TENSORRT, Precision.FP32)
    assert fp32 == pytest.approx(1e-3 * y.std() + 1e-2)
    assert int8 == trt == pytest.approx(0.05 * y.std() + 1e-2)


# -- output bins: toolchain, device, server -------------------------------------------------------------------


@pytest.mark.parametrize(("values", "counts"), [
    ([0.5, 1.5, 2.5], [1, 1, 1]), ([-5.0, 0.0, 3.0, 9.0], [2, 0, 2]), ([1.0, 2.0], [0, 1, 1]),
    ([np.nan, np.inf, 1.2], [0, 1, 0]), ([], [0, 0, 0])])
def test_output_bins_count_beyond_the_edges_in_the_end_bins(values, counts):
    assert output_bin_counts(np.asarray(values), [0.0, 1.0, 2.0, 3.0]).tolist() == counts


def _profile(predictions: np.ndarray) -> ReferenceProfile:
    base = ReferenceProfile(kind="raw", n=len(predictions), features=[
        FeatureReference(name="f0", edges=[-1.0, 0.0, 1.0], counts=[len(predictions) // 2,
                                                                      len(predictions) - len(predictions) // 2],
                         mean=0.0, std=0.5)], class_counts=[len(predictions)], confidence_edges=[0.0, 1.0],
        confidence_counts=[len(predictions)])
    return with_output_bins(base, predictions[:, None])


def _window(profile: ReferenceProfile, outputs: np.ndarray) -> FeatureStats:
    stats = WindowStats(profile, classes=1)
    stats.add_rows(np.random.default_rng(1).uniform(-1, 1, (len(outputs), 1)).astype(np.float32),
                   outputs[:, None].astype(np.float32))
    now = datetime.now(timezone.utc)
    _, fs = stats.close(device_id="d1", session=1, window_seq=1, start=now, end=now, manifest_sha256="ab" * 32)
    assert fs is not None
    return fs


def test_the_reference_and_the_device_count_outputs_on_the_same_bins():
    preds = np.random.default_rng(0).normal(100, 10, 2000)
    profile = _profile(preds)
    assert profile.output_edges is not None and len(profile.output_edges) == 11
    assert profile.confidence_edges is None and sum(profile.class_counts or []) == 2000
    assert max(profile.class_counts or []) - min(profile.class_counts or []) <= 2  # quantile bins
    fs = _window(profile, preds)  # the training predictions themselves, counted by the device's code
    assert fs.class_counts == profile.class_counts
    assert fs.confidence_counts is None


def test_output_drift_is_scored_on_value_bins():
    rng = np.random.default_rng(0)
    profile = _profile(rng.normal(100, 10, 2000))
    same = score(profile, [_window(profile, rng.normal(100, 10, 400))])
    shifted = score(profile, [_window(profile, rng.normal(108, 10, 400))])
    assert same.output is not None and shifted.output is not None
    assert same.output.name == shifted.output.name == "output.value"
    assert same.output.n == 400 >= MIN_WINDOW
    # what the rollout's predictions gate counts (server/orchestrator.py): a window whose output p < OUTPUT_ALPHA
    assert same.output.p_value >= OUTPUT_ALPHA
    assert shifted.output.p_value < OUTPUT_ALPHA and shifted.output.drifted


def test_a_window_with_other_output_bins_is_a_misfit():
    profile = _profile(np.random.default_rng(0).normal(0, 1, 500))
    fs = _window(profile, np.zeros(50))
    wrong = fs.model_copy(update={"class_counts": [1, 2, 3]})
    assert misfit(profile, fs) is None
    assert "3 bins, the reference has 10 output bins" in (misfit(profile, wrong) or "")


def test_output_bins_make_a_manifest_schema_3_for_regression_only():
    profile = _profile(np.random.default_rng(0).normal(0, 1, 500))
    assert schema_for(profile) == MANIFEST_SCHEMA_3
    fields = manifest().model_dump(by_alias=True) | {"reference": profile.model_dump(), "task": "regression",
                                                     "labels": None, "golden": None}
    from protocol import Manifest

    assert Manifest.model_validate(fields | {"schema": MANIFEST_SCHEMA_3}, strict=False).schema_ == MANIFEST_SCHEMA_3
    with pytest.raises(ValidationError, match=r"has output_edges has schema edgeherd\.manifest/3"):
        Manifest.model_validate(fields | {"schema": "edgeherd.manifest/1"}, strict=False)
    with pytest.raises(ValidationError, match="task is classification"):
        Manifest.model_validate(fields | {"schema": MANIFEST_SCHEMA_3, "task": "classification"}, strict=False)
    with pytest.raises(ValidationError, match="output bins"):
        ReferenceProfile.model_validate(profile.model_dump() | {"class_counts": [1, 2]})


# -- the local API's answer --------------------------------------------------------------------------------------


def test_the_api_answers_a_regression_model_with_values():
    pred = SimpleNamespace(manifest=SimpleNamespace(model="power", version="1.0.0", task="regression", labels=None))
    out = np.array([[101.5], [99.25]], dtype=np.float32)
    assert answer(pred, out) == {"model": "power", "version": "1.0.0", "outputs": [[101.5], [99.25]],  # type: ignore[arg-type]
                                 "values": [101.5, 99.25]}
    clf = SimpleNamespace(manifest=SimpleNamespace(model="m", version="1", task="classification", labels=["a", "b"]))
    assert answer(clf, np.array([[0.1, 0.9]], np.float32))["labels"] == ["b"]  # type: ignore[arg-type]


def test_feature_windows_are_unchanged_by_output_bins():
    profile = _profile(np.random.default_rng(0).normal(0, 1, 500))
    fs = _window(profile, np.zeros(50))
    assert isinstance(fs.features[0], FeatureWindow) and sum(fs.features[0].counts) == 50


def test_a_regression_table_from_sql_reads_the_same_targets_and_digest_as_the_csv(tmp_path):
    import sqlite3

    x, y = regression_data(120)
    data, schema = write_regression(tmp_path, x, y)
    s = datamod.load_schema(schema)
    from_csv = datamod.load_table(data, s)
    db = tmp_path / "power.db"
    with sqlite3.connect(db) as con:
        con.execute(f"CREATE TABLE t (i INTEGER, {', '.join(f'{f} REAL' for f in FEATURES)}, site TEXT, power_kw REAL)")
        with data.open() as fh:
            rows = list(csv.reader(fh))[1:]
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(i, *map(float, r[:4]), r[4], float(r[5])) for i, r in enumerate(rows)])
    query = "SELECT load, speed, temp, humidity, site, power_kw FROM t ORDER BY i"
    from_sql = datamod.load_sql(f"sqlite:///{db}", query, s)
    assert from_sql.classes == [] and from_sql.y.dtype == np.float64
    np.testing.assert_array_equal(from_sql.y, from_csv.y)
    assert from_sql.sha256 == from_csv.sha256
    with sqlite3.connect(db) as con:
        con.execute("UPDATE t SET power_kw = NULL WHERE i = 5")
    with pytest.raises(DataError, match="power_kw"):
        datamod.load_sql(f"sqlite:///{db}", query, s)
