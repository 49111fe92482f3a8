"""Bring your own model, end to end: a scikit-learn LogisticRegression exported by skl2onnx (with its ZipMap) and a
LightGBM classifier exported by onnxmltools, each built with ``edgeherd build onnx``, pushed, deployed to a real
agent over a real Mosquitto, and asked through ``POST /v1/predict``. The agent answers what ONNX Runtime answers on
the supplied file, and the accuracy the bundle declares is the one computed outside edgeherd on the build's test
split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protocol import generate_signing_key, private_key_to_pem
from tests.test_toolchain_sklearn import build_splits, cli_build
from toolchain.bundle import verify_bundle

skl2onnx = pytest.importorskip("skl2onnx", reason="exporting the model needs skl2onnx (edgeherd[toolchain])")
lightgbm = pytest.importorskip("lightgbm", reason="the LightGBM model needs lightgbm (edgeherd[dev])")
onnxmltools = pytest.importorskip("onnxmltools", reason="exporting it needs onnxmltools (edgeherd[dev])")

from tests.byom_helpers import deployed_agent  # noqa: E402  (the server stack: only where the exporters are)
from tests.test_toolchain_gbm import export_lightgbm, noisy_classes  # noqa: E402

pytestmark = pytest.mark.integration


def _ort_probabilities(model: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's class probabilities on the supplied file: its probabilities output, a ZipMap's maps read in
    class order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (name,) = [o.name for o in session.get_outputs() if "prob" in o.name]
    (out,) = session.run([name], {session.get_inputs()[0].name: x})
    if isinstance(out, list):  # ZipMap: one {class: probability} dict per row
        return np.array([[row[c] for c in sorted(row)] for row in out], dtype=np.float32)
    return np.asarray(out, dtype=np.float32)


def _models(root: Path) -> dict[str, tuple[Path, Path]]:
    """name: (the supplied .onnx, its dataset), each trained on the training split of the build that follows."""
    from sklearn.linear_model import LogisticRegression

    out = {}
    x, y = noisy_classes(3)
    data = root / "three.npz"
    np.savez(data, x=x, y=y)
    train = build_splits(data)["train"]
    logreg = LogisticRegression(max_iter=500).fit(x[train], y[train])
    path = root / "logreg.onnx"  # ZipMap on, as skl2onnx exports by default
    path.write_bytes(skl2onnx.to_onnx(logreg, x[:1]).SerializeToString())
    out["logreg"] = (path, data)
    gbm = lightgbm.LGBMClassifier(n_estimators=30, num_leaves=8, verbose=-1, random_state=0, n_jobs=1)
    out["lightgbm"] = (export_lightgbm(gbm.fit(x[train], y[train]), x.shape[1], root / "lightgbm.onnx"), data)
    return out


def test_the_agent_answers_what_onnx_runtime_answers_and_the_bundle_accuracy_is_the_one_computed_outside(tmp_path):
    from sklearn.metrics import accuracy_score

    key = generate_signing_key()
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(key))
    work = tmp_path / "work"
    work.mkdir()
    models = _models(work)
    bundles = {}
    for name, (model, data) in models.items():
        out = work / "bundles" / name
        result = cli_build(work, "onnx", "--onnx", str(model), "--data", str(data), "--name", name, "--out", str(out),
                           "--key", str(tmp_path / "signing.key"), "--no-tar")
        assert result.exit_code == 0, result.output
        bundles[name] = out

    with deployed_agent(tmp_path, key) as fleet:
        for name, (model, data) in models.items():
            served = fleet.deploy(bundles[name])
            assert served.name == f"{name}-onnx-fp32", served.name
            splits = build_splits(data)
            with np.load(data) as arrays:
                x, y = arrays["x"].astype(np.float32), arrays["y"]
            x_test, y_test = x[splits["test"]], y[splits["test"]]
            supplied = _ort_probabilities(model, x_test)

            answer = fleet.predict(x_test)
            assert (answer["model"], answer["version"]) == (name, "1.0.0")
            outputs = np.asarray(answer["outputs"], dtype=np.float32)
            assert outputs.shape == supplied.shape == (len(x_test), 3)
            diff = float(np.abs(outputs - supplied).max())
            assert diff <= 1e-6, f"{name}: max abs diff between the agent and ONNX Runtime {diff:.2e}"
            assert answer["labels"] == [str(c) for c in supplied.argmax(1)]

            accuracy = float(accuracy_score(y_test, supplied.argmax(1)))
            assert 0.5 < accuracy < 1.0, (name, accuracy)  # one wrong row more or less would show
            m = verify_bundle(bundles[name], key.public_key())
            assert m.artifacts[0].metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6), name
