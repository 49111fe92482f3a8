"""A regression model end to end: build from a CSV with ``task = "regression"``, push, deploy to a real agent over
a real Mosquitto, ask its ``/v1/predict``. The agent's values equal ONNX Runtime's own on the same artifact file,
and the bundle's MAE equals scikit-learn's on ONNX Runtime's outputs for the test split (recomputed here and
matched to the split digest the bundle records). The build runs with ``--max-drop 0``: what the MAE gate keeps
has no higher MAE than fp32, what it leaves out says why in the target's units.

One build (the tabular recipe, about 20 s on two CPU cores) and one server + agent: about 45 s in all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.metrics import mean_absolute_error
from sqlmodel import Session, select

from protocol import (
    FeatureStats,
    Precision,
    Target,
    decode_model,
    generate_signing_key,
    manifest_digest,
    private_key_to_pem,
)
from protocol.manifest import MANIFEST_SCHEMA_3
from server.db.models import StatsWindow
from server.drift import score
from tests.byom_helpers import deployed_agent
from tests.server_helpers import wait_for
from tests.test_toolchain_regression import FEATURES, regression_data, write_regression
from toolchain import data as datamod
from toolchain.bundle import verify_bundle
from toolchain.pipeline import BuildSpec, build
from toolchain.validate import validate

pytestmark = pytest.mark.integration


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Training a 64-unit MLP on one thread is several times faster than on oversubscribed small CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _stats(app, m) -> FeatureStats | None:
    """The device's statistics windows for ``m``, added up, once they hold all 65 predicted rows."""
    with Session(app.registry.engine) as db:
        rows = db.exec(select(StatsWindow).where(StatsWindow.manifest_sha256 == manifest_digest(m))).all()
    windows = [decode_model(FeatureStats, r.payload) for r in rows]
    if sum(w.n for w in windows) < 65:
        return None
    counts = np.sum([w.class_counts for w in windows], axis=0)
    return windows[0].model_copy(update={"n": sum(w.n for w in windows), "class_counts": counts.tolist()})


def _ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})
    return np.asarray(out)


def test_a_regression_model_built_deployed_and_answering(tmp_path, one_thread):
    x, y = regression_data(2500)
    data, schema = write_regression(tmp_path, x, y)
    key = generate_signing_key()
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(key))
    bundle = tmp_path / "bundle"
    result = build(BuildSpec(recipe="tabular", data=data, schema=schema, key=tmp_path / "signing.key", out=bundle,
                             name="power", epochs=25, tflite=False, tar=False, device="cpu", max_drop=0.0))
    m = result.manifest
    assert verify_bundle(bundle, key.public_key()) == result.manifest
    assert m.task == "regression" and m.labels is None and m.schema_ == MANIFEST_SCHEMA_3
    assert m.golden is not None and m.golden.labels is None
    assert m.reference is not None and m.reference.output_edges is not None
    assert len(m.reference.class_counts or []) == len(m.reference.output_edges) - 1
    # --max-drop 0: no artifact may have a higher MAE than fp32's (in the target's units); int8 ones rarely pass
    names = {a.name for a in m.artifacts}
    assert names | set(result.rejected) == {f"power-{t}" for t in ("onnx-fp32", "onnx-int8", "tensorrt-fp16",
                                                                   "tensorrt-int8")}
    assert all("in the target's units" in why for why in result.rejected.values()), result.rejected
    assert all(a.metrics["mae_rise"] <= 0 for a in m.artifacts), [a.metrics for a in m.artifacts]
    fp32 = m.artifact("power-onnx-fp32")
    assert fp32.metrics["r2"] > 0.9, fp32.metrics  # the model learned the target, in its own units
    assert fp32.smoke is not None and fp32.smoke.atol < 0.05 * float(np.std(y))
    report = json.loads((bundle / "build-report.json").read_text())
    assert report["slices"]["metric"] == "mae" and report["importance"]["features"][0]["name"] == "load"
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "| MAE | RMSE | R² |" in card and f"{fp32.metrics['mae']:.4g}" in card

    # the test split, recomputed outside the build and checked against the digest the bundle records
    ds = datamod.load_table(data, datamod.load_schema(schema))
    _, kept = validate(ds)
    splits = {k: kept[v] for k, v in datamod.split_indices(datamod.strata(ds)[kept], 0).items()}
    digest = hashlib.sha256(b"".join(splits[k].astype("<i8").tobytes() for k in datamod.SPLITS)).hexdigest()
    assert digest == m.lineage["split_sha256"]
    x_test, y_test = ds.x[splits["test"]], ds.y[splits["test"]]

    with deployed_agent(tmp_path, key) as fleet:
        served = fleet.deploy(bundle)  # installed, smoke-tested against the golden values, switched
        assert (served.target, served.precision) in {(Target.ONNX, Precision.FP32), (Target.ONNX, Precision.INT8)}
        path = fleet.artifact_file(bundle, served)
        rows = x_test[:64]
        got = fleet.predict(rows)
        single = fleet.predict(rows[0])  # one sample, not a batch
        window = wait_for(lambda: _stats(fleet.app, m), 30, "a statistics window with the predictions")

    # the device counted its predictions on the reference's output bins; the server scores their drift there
    assert window.n == 65 and window.confidence_counts is None
    assert window.class_counts is not None and len(window.class_counts) == len(m.reference.class_counts or [])
    assert sum(window.class_counts) == 65
    drift = score(m.reference, [window])
    assert drift.output is not None and drift.output.name == "output.value" and drift.output.n == 65

    own = _ort(path, rows)[:, 0]
    assert set(got) == {"model", "version", "outputs", "values"}
    values = np.asarray(got["values"], dtype=np.float32)
    diff = float(np.abs(values - own).max())
    assert diff == 0.0, f"agent vs ONNX Runtime max abs diff {diff}"
    assert single["values"] == [got["values"][0]]
    np.testing.assert_array_equal(np.asarray(got["outputs"], np.float32)[:, 0], values)

    # the bundle's evaluated MAE is scikit-learn's on ONNX Runtime's outputs for the test split
    for artifact in m.artifacts:
        if artifact.target is Target.TENSORRT:
            continue
        ort_mae = mean_absolute_error(y_test, _ort(bundle / "artifacts" / artifact.sha256, x_test)[:, 0])
        assert abs(artifact.metrics["mae"] - ort_mae) <= 1e-6, (artifact.name, artifact.metrics["mae"], ort_mae)
    assert len(FEATURES) == x_test.shape[1]
