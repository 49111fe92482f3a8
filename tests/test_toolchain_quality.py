"""Model quality in the build: permutation importance, per-class metrics, slices and the slice gate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from protocol import generate_signing_key, private_key_to_pem
from tests.toolchain_helpers import SCHEMA, blobs, write_csv, write_schema
from toolchain.card import render_card
from toolchain.data import Schema, load_schema, load_table
from toolchain.errors import DataError, QualityGateFailed
from toolchain.quality import (
    MIN_SLICE_COUNT,
    confusion_matrix,
    per_class_metrics,
    permutation_importance,
    slice_gate,
    slice_metrics,
)

# ---------------------------------------------------------------- pure functions


def test_confusion_matrix_rows_are_true_classes():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0],
                           [0, 1, 1],
                           [1, 0, 3]]
    assert cm.dtype == np.int64 and cm.sum() == len(y_true)


def test_confusion_matrix_rejects_unknown_class_ids():
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)


def test_per_class_metrics_against_hand_computed_numbers():
    cm = np.array([[2, 1, 0],
                   [0, 1, 1],
                   [1, 0, 3]])
    m = {c.name: c for c in per_class_metrics(cm, ["a", "b", "c"])}
    # a: tp 2, predicted 3 (column), present 3 (row)
    assert m["a"].precision == pytest.approx(2 / 3) and m["a"].recall == pytest.approx(2 / 3)
    assert m["a"].f1 == pytest.approx(2 / 3) and m["a"].support == 3
    # b: tp 1, predicted 2, present 2
    assert m["b"].precision == pytest.approx(0.5) and m["b"].recall == pytest.approx(0.5) and m["b"].support == 2
    # c: tp 3, predicted 4, present 4
    assert m["c"].precision == pytest.approx(0.75) and m["c"].recall == pytest.approx(0.75)
    assert m["c"].f1 == pytest.approx(0.75) and m["c"].support == 4


def test_per_class_metrics_zero_division_is_zero():
    cm = np.array([[3, 0], [2, 0]])  # class 1 is present but never predicted
    a, b = per_class_metrics(cm, ["a", "b"])
    assert (b.precision, b.recall, b.f1, b.support) == (0.0, 0.0, 0.0, 2)
    assert a.precision == pytest.approx(0.6) and a.recall == 1.0 and a.f1 == pytest.approx(0.75)


def test_permutation_importance_with_a_fake_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = (x[:, 1] > 0).astype(np.int64)  # only column "b" matters

    def predict(a: np.ndarray) -> np.ndarray:
        return (a[:, 1] > 0).astype(np.int64)

    original = x.copy()
    imp = permutation_importance(x, y, predict, ["a", "b", "c"], repeats=4, seed=1)
    assert imp.baseline == 1.0 and imp.repeats == 4 and imp.rows == 400
    assert imp.features[0].name == "b"
    assert 0.35 < imp.features[0].mean < 0.65  # a shuffled sign is wrong about half the time
    assert imp.features[0].std > 0
    assert {f.name: (f.mean, f.std) for f in imp.features[1:]} == {"a": (0.0, 0.0), "c": (0.0, 0.0)}
    again = permutation_importance(x, y, predict, ["a", "b", "c"], repeats=4, seed=1)
    assert again == imp  # seeded
    np.testing.assert_array_equal(x, original)  # the inputs were not changed in place


def test_permutation_importance_checks_its_inputs():
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="2 columns"):
        permutation_importance(x, np.zeros(4), lambda a: np.zeros(len(a)), ["only-one"])
    with pytest.raises(ValueError, match="features"):
        permutation_importance(np.zeros((4, 1, 2)), np.zeros(4), lambda a: np.zeros(len(a)), ["a", "b"])


def test_slice_metrics_and_gate():
    y_true = np.array([1] * 30 + [1] * 30 + [1] * 5)
    y_pred = np.array([1] * 27 + [0] * 3 + [1] * 15 + [0] * 15 + [0] * 5)
    site = np.array(["A"] * 30 + ["C"] * 30 + ["tiny"] * 5)
    rep = slice_metrics(y_true, y_pred, {"site": site})
    got = {(s.value, s.n): s.accuracy for s in rep.slices}
    assert got == {("A", 30): 0.9, ("C", 30): 0.5, ("tiny", 5): 0.0}
    assert [s.value for s in rep.slices] == ["tiny", "C", "A"]  # lowest accuracy first
    assert rep.min_count == MIN_SLICE_COUNT
    assert rep.worst is not None and (rep.worst.value, rep.worst.n) == ("C", 30)  # "tiny" is under the minimum
    assert slice_gate(rep, 0.4) is None
    why = slice_gate(rep, 0.6)
    assert why is not None and "site='C'" in why and "0.5000" in why and "30" in why and "0.6000" in why
    none = slice_metrics(y_true[:5], y_pred[:5], {"site": site[:5]})
    assert none.worst is None
    why = slice_gate(none, 0.1)
    assert why is not None and f"at least {MIN_SLICE_COUNT}" in why


# ---------------------------------------------------------------- schema and loading


QUALITY_SCHEMA = """\
label = "state"
classes = ["ok", "fault"]
segments = ["site"]

[[features]]
name = "signal"

[[features]]
name = "noise"

[[features]]
name = "weak"
"""


def quality_csv(path: Path, n: int = 3000, seed: int = 11) -> Path:
    """``signal`` decides the label, ``weak`` nudges it, ``noise`` is unrelated; site C's labels are random."""
    rng = np.random.default_rng(seed)
    signal, noise, weak = rng.normal(size=(3, n))
    site = rng.choice(["A", "B", "C"], size=n)
    y = (3.0 * signal + 1.0 * weak + rng.normal(0, 0.3, size=n) > 0).astype(int)
    y = np.where(site == "C", rng.integers(0, 2, size=n), y)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["site", "signal", "noise", "weak", "state"])
        for row in zip(site, signal, noise, weak, y, strict=True):
            w.writerow([row[0], f"{row[1]:.6f}", f"{row[2]:.6f}", f"{row[3]:.6f}", ("ok", "fault")[row[4]]])
    return path


def test_segments_are_loaded_as_strings_aligned_with_rows(tmp_path):
    ds = load_table(quality_csv(tmp_path / "q.csv", n=50), load_schema(write_schema(tmp_path / "s.toml",
                                                                                    QUALITY_SCHEMA)))
    assert list(ds.segments) == ["site"] and ds.segments["site"].dtype.kind == "U"
    assert len(ds.segments["site"]) == len(ds.x) == 50 and set(ds.segments["site"]) <= {"A", "B", "C"}
    rows = np.array([3, 1, 40])
    x, y, segs = ds.take(rows)
    assert y.tolist() == [int(ds.y[i]) for i in rows]
    with (tmp_path / "q.csv").open() as fh:
        lines = list(csv.reader(fh))[1:]
    assert segs["site"].tolist() == [lines[i][0] for i in rows]
    np.testing.assert_allclose(x[:, 0], [float(lines[i][1]) for i in rows], atol=1e-5)
    assert ds.x.shape == (50, 3)  # the segment is not a model input


def test_segment_column_must_exist(tmp_path):
    schema = load_schema(write_schema(tmp_path / "s.toml", QUALITY_SCHEMA.replace('["site"]', '["line"]')))
    with pytest.raises(DataError, match=r"lacks the segment column\(s\) line"):
        load_table(quality_csv(tmp_path / "q.csv", n=20), schema)


@pytest.mark.parametrize(("segments", "message"), [
    ('["signal"]', "also listed as a feature"),
    ('["state"]', "is the label column"),
    ('["site", "site"]', "must be unique"),
])
def test_segment_column_must_not_be_a_feature_or_the_label(tmp_path, segments, message):
    path = write_schema(tmp_path / "s.toml", QUALITY_SCHEMA.replace('["site"]', segments))
    with pytest.raises(DataError, match=message):
        load_schema(path)


def test_schema_without_segments_still_loads():
    assert Schema.model_validate({"label": "y", "features": [{"name": "a"}]}).segments == []


# ---------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("quality")
    (ws / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    quality_csv(ws / "plant.csv")
    write_schema(ws / "plant.toml", QUALITY_SCHEMA)
    return ws


def _spec(ws: Path, out: str, **kw):
    from toolchain.pipeline import BuildSpec

    return BuildSpec(recipe="tabular", out=ws / out, key=ws / "signing.key", data=ws / "plant.csv",
                     schema=ws / "plant.toml", epochs=12, tflite=False, tar=False, **kw)


#: The planted weak slice (site C, random labels) sits near 0.5; sites A and B near 0.95.
GATE_FAILS_AT = 0.75
GATE_PASSES_AT = 0.3


@pytest.fixture(scope="module")
def built(ws):
    from toolchain.pipeline import build

    return build(_spec(ws, "pass", min_slice_metric=GATE_PASSES_AT))


@pytest.mark.integration
def test_importance_ranks_the_informative_feature_first(built):
    imp = built.report["importance"]
    means = {f["name"]: f["mean"] for f in imp["features"]}
    print("importance", {f["name"]: (f["mean"], f["std"]) for f in imp["features"]})
    assert [f["name"] for f in imp["features"]] == ["signal", "weak", "noise"]
    assert imp["split"] == "validation" and imp["repeats"] == 5 and imp["rows"] == built.report["splits"]["validation"]
    assert means["signal"] > 0.2 > means["weak"] > means["noise"]
    assert abs(means["noise"]) < 0.02
    assert built.manifest.lineage["top_feature"].startswith("signal ")


@pytest.mark.integration
def test_slices_show_the_planted_weak_site(built):
    sl = built.report["slices"]
    acc = {r["value"]: r["accuracy"] for r in sl["columns"]["site"]}
    n = {r["value"]: r["n"] for r in sl["columns"]["site"]}
    print("slices", {v: (acc[v], n[v]) for v in acc})
    assert sl["worst"]["column"] == "site" and sl["worst"]["value"] == "C"
    assert sl["min_count"] == MIN_SLICE_COUNT and sum(n.values()) == built.report["splits"]["test"]
    assert acc["C"] < min(acc["A"], acc["B"]) - 0.25
    assert GATE_PASSES_AT < acc["C"] < GATE_FAILS_AT < min(acc["A"], acc["B"])
    assert built.manifest.lineage["worst_slice"].startswith("site=C accuracy ")


@pytest.mark.integration
def test_per_class_metrics_and_confusion_in_report_and_card(built):
    per_class = {c["class"]: c for c in built.report["per_class"]["classes"]}
    conf = built.report["confusion"]
    assert conf["labels"] == ["ok", "fault"]
    matrix = np.array(conf["matrix"])
    assert matrix.sum() == built.report["splits"]["test"]
    assert [per_class[c]["support"] for c in ("ok", "fault")] == matrix.sum(axis=1).tolist()
    fp32 = next(a for a in built.manifest.artifacts if a.name == "plant-onnx-fp32")
    assert np.trace(matrix) / matrix.sum() == pytest.approx(fp32.metrics["accuracy"], abs=1e-6)
    card = (built.out / "MODEL_CARD.md").read_text()
    for heading in ("## Feature importance", "## Per-class metrics", "## Slices"):
        assert heading in card
    assert "**Worst slice: site = C**" in card and f"at least {MIN_SLICE_COUNT} rows" in card
    on_disk = json.loads((built.out / "build-report.json").read_text())
    assert {"importance", "per_class", "confusion", "slices"} <= set(on_disk)


@pytest.mark.integration
def test_slice_gate_fails_the_build_and_writes_nothing(ws):
    from toolchain.pipeline import build

    spec = _spec(ws, "fail", min_slice_metric=GATE_FAILS_AT)
    with pytest.raises(QualityGateFailed) as info:
        build(spec)
    msg = str(info.value)
    print("gate", msg)
    assert "site='C'" in msg and f"{GATE_FAILS_AT:.4f}" in msg and "test rows" in msg
    assert not spec.out.exists()
    assert not [p.name for p in ws.iterdir() if p.name.endswith(".partial")]


def test_gate_without_segments_says_to_declare_them(tmp_path):
    from toolchain.pipeline import BuildSpec, build

    (tmp_path / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    data = write_csv(tmp_path / "vib.csv", *blobs(120))
    spec = BuildSpec(recipe="tabular", out=tmp_path / "b", key=tmp_path / "signing.key", data=data,
                     schema=write_schema(tmp_path / "s.toml", SCHEMA), min_slice_metric=0.5, tflite=False, tar=False)
    with pytest.raises(DataError, match="declare `segments`"):
        build(spec)
    assert not spec.out.exists()


def test_cli_min_slice_metric_option(tmp_path):
    from typer.testing import CliRunner

    from server.cli import app

    (tmp_path / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    data = write_csv(tmp_path / "vib.csv", *blobs(120))
    args = ["build", "tabular", "--data", str(data), "--schema", str(write_schema(tmp_path / "s.toml", SCHEMA)),
            "--out", str(tmp_path / "b"), "--key", str(tmp_path / "signing.key"), "--no-tar"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--min-slice-metric", "0.9"], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "declare `segments`" in result.output
    result = runner.invoke(app, [*args, "--min-slice-metric", "1.5"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert not (tmp_path / "b").exists()


@pytest.mark.integration
def test_card_renders_skipped_sections(built):
    card = render_card(built.manifest, {"slices": {"skipped": "no segments"}, "importance": {"skipped": "image"}})
    assert "## Slices\n\nNot computed: no segments." in card
    assert "## Feature importance\n\nNot computed: image." in card
    assert "## Per-class metrics" not in card


def test_image_inputs_skip_importance_and_no_segments_skip_slices(tmp_path):
    from agent.backends import IOSpec
    from toolchain.data import Dataset, FeatureSpec
    from toolchain.evaluate import Evaluation
    from toolchain.quality_report import classification_quality

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 8, 8)).astype(np.float32)
    y = np.arange(40) % 2
    schema = Schema(label="y", features=[FeatureSpec(name=f"px{i}") for i in range(64)])
    ds = Dataset("img", "image", x, y, ["a", "b"], schema, "0" * 64, "test")
    logits = np.eye(2, dtype=np.float32)[y[:20]]
    io = IOSpec(name="input", shape=(1, 1, 8, 8), dtype="float32")
    base = Evaluation(1.0, 1, 0.1, logits, io, io)
    split = {"validation": slice(20, 40), "test": slice(0, 20)}
    q = classification_quality(_spec(tmp_path, "x"), ds, "img-onnx-fp32", tmp_path / "missing.onnx", base,
                 {k: x[v] for k, v in split.items()}, {k: y[v] for k, v in split.items()},
                 {k: {} for k in split})
    assert "table columns only" in q["importance"]["skipped"]
    assert "no segment columns" in q["slices"]["skipped"]
    assert q["confusion"]["matrix"] == [[10, 0], [0, 10]]
    assert [c["recall"] for c in q["per_class"]["classes"]] == [1.0, 1.0]
