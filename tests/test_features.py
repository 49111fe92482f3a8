"""Registry features: definitions, one transformation in numpy and in the exported graph, and builds from them."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from agent.backends import open_backend
from agent.features import feature_values, model_columns
from protocol import generate_signing_key, manifest_digest, private_key_to_pem
from protocol.features import FeatureSet
from tests.features_helpers import DEFINITIONS, RAW, SCHEMA, sensor_rows, write_sensor_csv
from tests.server_helpers import server_dir
from toolchain.bundle import verify_bundle
from toolchain.errors import DataError
from toolchain.export import export_onnx
from toolchain.features import load_definitions, resolve, transform_module
from toolchain.pipeline import BuildSpec, ValidationFailed, build


@pytest.fixture
def defs_file(tmp_path):
    path = tmp_path / "features.toml"
    path.write_text(DEFINITIONS)
    return path


@pytest.fixture
def feature_set(defs_file):
    defs = resolve(load_definitions(defs_file), ["crest_factor", "load_log", "temp_scaled", "rms_clipped", "site"])
    return FeatureSet(inputs=RAW, definitions=defs)


def _awkward_rows(x: np.ndarray) -> np.ndarray:
    """The sensor rows plus the edges a transformation can trip on: missing values, a zero denominator,
    negative load, a category outside the set, values beyond the clip, infinities."""
    extra = np.array([
        [np.nan, 1.0, 10.0, 40.0, 0.0],
        [0.0, 1.0, 10.0, 40.0, 1.0],
        [1e-9, 2.0, -5.0, np.nan, 2.0],
        [9.0, 12.0, 0.0, 150.0, 7.0],
        [1.0, np.nan, np.nan, -40.0, np.nan],
        [np.inf, 1.0, np.inf, -np.inf, 1.0],  # infinities count as missing, in numpy and in the graph
    ], dtype=np.float32)
    return np.concatenate([x, extra])


def test_numpy_and_the_exported_onnx_graph_agree_on_every_row(feature_set, tmp_path):
    x, _ = sensor_rows()
    rows = _awkward_rows(x)
    path = tmp_path / "features.onnx"
    export_onnx(transform_module(feature_set), rows, path)
    onnx_out = open_backend(path, "onnxruntime").predict(rows)
    numpy_out = model_columns(feature_set, rows)
    assert onnx_out.shape == numpy_out.shape == (len(rows), 4 + 3)
    assert np.isfinite(numpy_out).all()  # missing values are filled for the model
    diff = np.abs(onnx_out - numpy_out).max(axis=1)
    assert diff.max() <= 1e-6, f"rows {np.flatnonzero(diff > 1e-6)[:10]} differ by up to {diff.max():.3g}"
    # and the statistic values: missing where the definition says so
    values = feature_values(feature_set, rows)
    n = len(x)
    assert np.isnan(values[n, 0]) and np.isnan(values[n + 1, 0])  # no rms; a zero denominator
    assert values[n + 2, 1] == 0.0 and np.isnan(values[n + 2, 2])  # negative load counts as 0; no temperature
    assert values[n + 3, 3] == 4.0 and np.isnan(values[n + 3, 4])  # clipped; category 7 is not in the set
    assert np.array_equal(values[:3, 4], x[:3, 4])  # categories 0, 1, 2 are their own indices


def test_window_summaries_agree_between_numpy_and_the_graph_to_the_last_bit(tmp_path):
    from protocol.features import FeatureDefinition

    samples = [f"s{i}" for i in range(16)]
    stats = ("mean", "std", "rms", "min", "max", "range")
    fs = FeatureSet(inputs=samples, definitions=[
        FeatureDefinition.model_validate({"name": f"vib_{stat}", "version": 1, "min": -50.0, "max": 50.0,
                                          "fill": -1.0, "transform": {"op": "window", "columns": samples,
                                                                      "stat": stat}})
        for stat in stats])
    rng = np.random.default_rng(11)
    rows = (rng.normal(0, 1, (2000, 16)) * rng.uniform(0.1, 20, (2000, 1)) + rng.uniform(-5, 5, (2000, 1)))
    rows = rows.astype(np.float32)
    rows[7, 3] = np.nan  # a missing sample: the whole window's value is missing
    path = tmp_path / "window.onnx"
    export_onnx(transform_module(fs), rows, path)
    onnx_out = open_backend(path, "onnxruntime").predict(rows)
    numpy_out = model_columns(fs, rows)
    assert np.array_equal(onnx_out, numpy_out), f"differ by up to {np.abs(onnx_out - numpy_out).max():.3g}"
    values = feature_values(fs, rows)
    assert np.isnan(values[7]).all() and (numpy_out[7] == -1.0).all()
    ok = np.delete(np.arange(len(rows)), 7)
    ref = rows[ok].astype(np.float64)
    expected = {"mean": ref.mean(1), "std": ref.std(1), "rms": np.sqrt((ref**2).mean(1)), "min": ref.min(1),
                "max": ref.max(1), "range": ref.max(1) - ref.min(1)}
    for j, stat in enumerate(stats):  # and they are the summaries they claim to be (float32 rounding aside)
        assert np.allclose(values[ok, j], expected[stat], rtol=1e-5, atol=1e-4), stat


def test_a_value_at_a_bound_not_exact_in_float32_is_in_range_and_in_the_end_bin():
    from protocol.features import FeatureDefinition
    from toolchain.features import check_features, reference_for

    d = FeatureDefinition.model_validate({"name": "duty", "version": 1, "min": 0.0, "max": 0.3,
                                          "transform": {"op": "clip", "column": "duty_raw", "min": 0.0, "max": 0.3}})
    fs = FeatureSet(inputs=["duty_raw"], definitions=[d])
    x = np.array([[0.1], [0.5], [0.3], [np.inf], [-1.0]], dtype=np.float32)  # 0.5 clips to float32(0.3)
    (check,) = check_features(fs, x)
    assert check.out_of_range_rate == 0.0 and check.missing_rate == 0.2  # inf is missing, as in the graph
    ref = reference_for(fs, x, np.zeros(len(x), dtype=np.int64), 1, np.ones((len(x), 1), dtype=np.float32))
    counts = ref.features[0].counts
    assert sum(counts) == 4 and counts[-1] == 2 and counts[0] == 1 and counts[3] == 1  # 0.3 twice at the top


def test_definitions_are_validated_with_the_file_feature_and_key_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFINITIONS.replace('min = 1.0\nmax = 10.0', 'min = 10.0\nmax = 1.0', 1))
    with pytest.raises(DataError, match=r"bad.toml: feature crest_factor: .*min 10.0 must be below max 1.0"):
        load_definitions(bad)
    bad.write_text(DEFINITIONS.replace('op = "log1p"', 'op = "sqrt"'))
    with pytest.raises(DataError, match=r"feature load_log: transform"):
        load_definitions(bad)
    first = DEFINITIONS.split("[[feature]]")[1]
    bad.write_text(DEFINITIONS + "[[feature]]" + first.replace("vibration-team", "someone-else"))
    with pytest.raises(DataError, match="crest_factor@1 is defined twice, differently"):
        load_definitions(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_definitions(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text(DEFINITIONS)
    with pytest.raises(DataError, match="has no version 3"):
        resolve(load_definitions(good), ["crest_factor@3"])
    with pytest.raises(DataError, match="'vibration' is not defined"):
        resolve(load_definitions(good), ["vibration"])


@pytest.fixture(scope="module")
def sensor_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sensor")
    key = generate_signing_key()
    (tmp / "signing.key").write_bytes(private_key_to_pem(key))
    (tmp / "features.toml").write_text(DEFINITIONS)
    (tmp / "schema.toml").write_text(SCHEMA)
    x, y = sensor_rows()
    data = write_sensor_csv(tmp / "sensors.csv", x, y)
    result = build(BuildSpec(recipe="tabular", out=tmp / "bundle", key=tmp / "signing.key", data=data,
                             schema=tmp / "schema.toml", features=tmp / "features.toml", epochs=25, tar=False,
                             tflite=True))
    return tmp, key, result, x, y


@pytest.mark.integration
def test_a_build_from_registry_features_bakes_them_into_the_graph(sensor_build):
    _, key, result, x, y = sensor_build
    m = verify_bundle(result.out, key.public_key())
    assert m.features is not None
    assert [d.ref for d in m.features.definitions] == ["crest_factor@1", "load_log@1", "temp_scaled@1",
                                                       "rms_clipped@1", "site@1"]
    assert m.features.inputs == RAW
    assert m.lineage["features"] == "crest_factor@1,load_log@1,temp_scaled@1,rms_clipped@1,site@1"
    assert len(m.lineage["features_sha256"]) == 64
    # the reference is per feature, on evenly split bins of each declared range
    assert m.reference is not None and m.reference.kind == "features"
    crest = m.reference.features[0]
    assert (crest.name, crest.version) == ("crest_factor", 1)
    assert crest.edges[0] == 1.0 and crest.edges[-1] == 10.0 and len(crest.edges) == 11
    # devices feed raw columns: the artifacts take the 5 raw columns and classify well
    fp32 = next(a for a in m.artifacts if a.name == "sensors-onnx-fp32")
    assert fp32.inputs[0].shape[-1] == len(RAW)
    assert fp32.metrics["accuracy"] >= 0.9
    model = open_backend(result.out / "artifacts" / fp32.sha256, "onnxruntime")
    assert (model.predict(x[:200]).argmax(1) == y[:200]).mean() >= 0.9
    report = json.loads((result.out / "build-report.json").read_text())
    assert report["onnx_parity_max_abs_diff"] < 1e-4
    rules = {f["rule"]: f["severity"] for f in report["validation"]["findings"]}
    assert rules["feature crest_factor@1"] == "ok"
    card = (result.out / "MODEL_CARD.md").read_text()
    assert "crest_factor@1" in card


@pytest.mark.integration
def test_data_that_breaks_a_definition_stops_the_build_or_warns_as_declared(tmp_path):
    key = generate_signing_key()
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(key))
    x, y = sensor_rows(300)
    x[:30, 3] = 200.0  # 10 % of temperatures far beyond temp_scaled's range
    data = write_sensor_csv(tmp_path / "sensors.csv", x, y)
    (tmp_path / "schema.toml").write_text(SCHEMA)
    (tmp_path / "features.toml").write_text(DEFINITIONS)
    spec = BuildSpec(recipe="tabular", out=tmp_path / "b", key=tmp_path / "signing.key", data=data,
                     schema=tmp_path / "schema.toml", features=tmp_path / "features.toml", epochs=2, tar=False,
                     tflite=False)
    with pytest.raises(ValidationFailed) as failed:
        build(spec)
    fatal = [f for f in failed.value.report.findings if f.severity == "fatal"]
    assert [f.rule for f in fatal] == ["feature temp_scaled@1"]
    assert "10.00% outside [-3, 3]" in fatal[0].message
    assert not (tmp_path / "b").exists()
    # declared a warning: the build goes on and the report keeps it
    (tmp_path / "features.toml").write_text(DEFINITIONS.replace(
        'offset = 50.0, factor = 0.05 }', 'offset = 50.0, factor = 0.05 }\non_violation = "warn"'))
    result = build(spec)
    rules = {f["rule"]: f["severity"] for f in result.report["validation"]["findings"]}
    assert rules["feature temp_scaled@1"] == "warning"


def test_a_schema_naming_features_needs_their_definitions(tmp_path):
    x, y = sensor_rows(60)
    data = write_sensor_csv(tmp_path / "sensors.csv", x, y)
    (tmp_path / "schema.toml").write_text(SCHEMA)
    key = generate_signing_key()
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(key))
    with pytest.raises(DataError, match="give their definitions with --features"):
        build(BuildSpec(recipe="tabular", out=tmp_path / "b", key=tmp_path / "signing.key", data=data,
                        schema=tmp_path / "schema.toml", tar=False))


# -- the registry on the server ---------------------------------------------------------------------------------

V2 = DEFINITIONS.replace('offset = 50.0, factor = 0.05 }', 'offset = 45.0, factor = 0.04 }')


@pytest.fixture(scope="module")
def registry(sensor_build):
    """A server with the sensor bundle (temp_scaled@1) and a second one built after temp_scaled changed (@2)."""
    from server.registry import Registry

    tmp, key, first, x, y = sensor_build
    data, _ = server_dir(tmp / "server", key)
    reg = Registry(data)
    (tmp / "features-v2.toml").write_text(V2.replace('name = "temp_scaled"\nversion = 1', 'name = "temp_scaled"\n'
                                                     'version = 2'))
    (tmp / "schema-v2.toml").write_text(SCHEMA.replace("temp_scaled@1", "temp_scaled@2"))
    second = build(BuildSpec(recipe="tabular", out=tmp / "bundle-v2", key=tmp / "signing.key",
                             data=tmp / "sensors.csv", schema=tmp / "schema-v2.toml",
                             features=tmp / "features-v2.toml", version="2.0.0", epochs=10, tar=False, tflite=False))
    yield reg, tmp, first, second, x, y
    reg.engine.dispose()


@pytest.mark.integration
def test_a_changed_definition_is_a_new_version_and_both_stay_known(registry):
    from sqlmodel import Session

    from server import audit, features
    from server.registry import RegistryError

    reg, tmp, first, second, _, _ = registry
    assert reg.push_features(tmp / "features.toml", actor="alice") == [
        ("crest_factor@1", "added"), ("load_log@1", "added"), ("temp_scaled@1", "added"), ("rms_clipped@1", "added"),
        ("site@1", "added")]
    edited = tmp / "edited.toml"
    edited.write_text(V2)  # temp_scaled changed, still called version 1
    with pytest.raises(RegistryError, match=r"temp_scaled@1 is already registered with another definition .* "
                                            r"give it version 2"):
        reg.push_features(edited, actor="alice")
    assert reg.push_features(tmp / "features-v2.toml", actor="alice") == [
        ("crest_factor@1", "unchanged"), ("load_log@1", "unchanged"), ("temp_scaled@2", "added"),
        ("rms_clipped@1", "unchanged"), ("site@1", "unchanged")]
    # the bundle built before still names the old version; the new one the new
    assert first.manifest.features is not None and second.manifest.features is not None
    assert [d.ref for d in first.manifest.features.definitions][2] == "temp_scaled@1"
    assert [d.ref for d in second.manifest.features.definitions][2] == "temp_scaled@2"
    reg.push_model(first.out, actor="alice")
    reg.push_model(second.out, actor="alice")
    with Session(reg.engine) as db:
        rows = features.definitions(db, "temp_scaled")
        used = {(c.feature, c.model) for c in features.consumers(db)}
        assert audit.verify(db).ok
        pushed = [e.subject for e in audit.entries(db, action="feature.push")]
    assert [(r.name, r.version) for r in rows] == [("temp_scaled", 1), ("temp_scaled", 2)]
    assert rows[0].definition["transform"]["offset"] == 50.0 and rows[1].definition["transform"]["offset"] == 45.0
    assert {("temp_scaled@1", "sensors:1.0.0"), ("temp_scaled@2", "sensors:2.0.0"),
            ("crest_factor@1", "sensors:1.0.0"), ("crest_factor@1", "sensors:2.0.0")} <= used
    assert sorted(pushed) == sorted(f"feature:{r}" for r in ("crest_factor@1", "load_log@1", "temp_scaled@1",
                                                             "rms_clipped@1", "site@1", "temp_scaled@2"))

    # the operator sees both, and who consumes each
    from typer.testing import CliRunner

    from server.cli import app

    out = CliRunner().invoke(app, ["features", "list", "--data-dir", str(reg.data)], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if "temp_scaled" in line]
    assert len(lines) == 2 and "sensors:1.0.0" in lines[0] and "sensors:2.0.0" in lines[1]
    shown = CliRunner().invoke(app, ["features", "show", "temp_scaled", "--data-dir", str(reg.data)])
    assert shown.exit_code == 0 and "temp_scaled@1" in shown.output and "temp_scaled@2" in shown.output

    # a bundle whose definition contradicts the registry is refused
    contradicting = tmp / "contradicting.toml"
    contradicting.write_text(DEFINITIONS.replace("vibration-team", "other-team"))
    bad = build(BuildSpec(recipe="tabular", out=tmp / "bundle-bad", key=tmp / "signing.key", data=tmp / "sensors.csv",
                          schema=tmp / "schema.toml", features=contradicting, version="3.0.0", epochs=2, tar=False,
                          tflite=False))
    with pytest.raises(RegistryError, match="crest_factor@1 is already registered with another definition"):
        reg.push_model(bad.out, actor="alice")


def _two_devices_report(registry) -> None:
    """Both versions pushed (pushing again changes nothing), and three windows of statistics ingested from a
    device on each: pump-1 runs 1.0.0 on the training data, pump-2 runs 2.0.0 on data whose crest factor
    drifted. Once per module."""
    from sqlmodel import Session

    from agent.window import WindowStats
    from protocol import TopicKind, device_topic, encode
    from server.db.models import Device
    from server.ingest import Ingestor

    reg, tmp, first, second, x, _ = registry
    for defs in ("features.toml", "features-v2.toml"):
        reg.push_features(tmp / defs, actor="alice")
    for bundle in (first, second):
        reg.push_model(bundle.out, actor="alice")
    with Session(reg.engine) as db:
        if db.get(Device, "pump-1") is not None:
            return
        for device in ("pump-1", "pump-2"):
            db.add(Device(id=device, profile="x86-64-cpu"))
        db.commit()
    shifted = x.copy()
    shifted[:, 1] *= 2.5  # peaks far higher: the crest factor drifts on the device running 2.0.0
    ingest = Ingestor(reg.engine)
    t0 = datetime.now(timezone.utc)
    for device, result, rows in (("pump-1", first, x), ("pump-2", second, shifted)):
        m = result.manifest
        stats = WindowStats(m.reference, 3, m.features)
        for i in range(3):
            part = rows[i * 300:(i + 1) * 300]
            stats.add_rows(part, np.zeros((len(part), 3), dtype=np.float32))
            _, window = stats.close(device_id=device, session=1, window_seq=i, start=t0, end=t0 + timedelta(seconds=1),
                                    manifest_sha256=manifest_digest(m))
            assert window is not None and window.features[0].name == "crest_factor"
            assert window.features[0].version == 1
            assert ingest.handle(device_topic(device, TopicKind.STATS), encode(window)) == "ok"


@pytest.mark.integration
def test_drift_of_a_feature_adds_up_across_the_model_versions_that_consume_it(registry):
    from sqlmodel import Session

    from server import features

    reg, *_, x, _ = registry
    _two_devices_report(registry)
    with Session(reg.engine) as db:
        rows = {(r.feature, r.model): r for r in features.drift(db, "crest_factor")}
        temp = {(r.feature, r.model) for r in features.drift(db, "temp_scaled")}
    assert set(rows) == {("crest_factor@1", "sensors:1.0.0"), ("crest_factor@1", "sensors:2.0.0"),
                         ("crest_factor@1", "all")}
    one, two, both = (rows[("crest_factor@1", m)] for m in ("sensors:1.0.0", "sensors:2.0.0", "all"))
    assert one.windows == two.windows == 3 and both.windows == 6
    assert both.drift.n == one.drift.n + two.drift.n == 2 * len(x)
    assert not one.drift.drifted and two.drift.drifted and both.drift.drifted
    # two versions of temp_scaled have different bins: each is its own row, never summed together
    assert temp == {("temp_scaled@1", "sensors:1.0.0"), ("temp_scaled@2", "sensors:2.0.0")}
    from typer.testing import CliRunner

    from server.cli import app

    out = CliRunner().invoke(app, ["features", "drift", "crest_factor", "--json", "--data-dir", str(reg.data)])
    assert out.exit_code == 0, out.output
    assert [r["model"] for r in json.loads(out.output)] == ["sensors:1.0.0", "sensors:2.0.0", "all"]



@pytest.mark.integration
def test_the_tui_drift_screen_shows_a_feature_across_model_versions(registry):
    import asyncio

    from textual.widgets import DataTable

    from server.app import ServerApp
    from server.tui.app import make_app
    from tests.tui_state import settle

    reg, *_ = registry
    _two_devices_report(registry)
    assert ServerApp(reg.data, metrics_port=0, drift_interval=0, rollout_interval=0).evaluate_drift() > 0

    async def run() -> None:
        app = make_app(reg.data, "alice", refresh_s=0)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.press("d")
            await settle(pilot)
            drift = app.screen.query_one("#drift", DataTable)
            keys = [str(k.value) for k in drift.rows]
            drift.move_cursor(row=keys.index("sensors:2.0.0|crest_factor"))
            await settle(pilot, 4)
            versions = app.screen.query_one("#versions", DataTable)
            assert versions.display
            cells = [[str(c) for c in versions.get_row_at(i)] for i in range(versions.row_count)]
            assert [(c[0], c[1], c[6]) for c in cells] == [("crest_factor@1", "sensors:1.0.0", "no"),
                                                           ("crest_factor@1", "sensors:2.0.0", "yes"),
                                                           ("crest_factor@1", "all", "yes")]
            drift.move_cursor(row=keys.index("sensors:1.0.0|temp_scaled"))  # two versions, one model each
            await settle(pilot, 4)
            assert [(str(versions.get_row_at(i)[0]), str(versions.get_row_at(i)[1]))
                    for i in range(versions.row_count)] == [("temp_scaled@1", "sensors:1.0.0"),
                                                            ("temp_scaled@2", "sensors:2.0.0")]

    asyncio.run(run())

