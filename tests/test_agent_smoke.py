"""The smoke test's verdict on each way a model can fail its golden inputs, one real tiny ONNX model each.

``smoke_test`` runs the manifest's golden inputs through the loaded artifact (a real ONNX Runtime session)
before the device switches to it. Each row of the table is one branch: the inputs cannot run, the outputs
have the wrong shape, are not finite, differ beyond the tolerance, or agree on too few top-1 classes; and
the rows that must pass, so that a smoke test refusing everything fails here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.predictor import Predictor
from agent.runtime import smoke_test
from protocol import GoldenSet, SmokeExpectation
from tests.model_helpers import ROWS, _save, lookup_onnx, onnx_manifest, sqrt_onnx


def log_onnx(path: Path) -> Path:
    """Logits = log(x) over 3 features: -inf where an input is 0, NaN where it is negative."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Log", ["x"], ["logits"])], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])])
    return _save(graph, path)


MODELS = {"sqrt": (sqrt_onnx, 3), "log": (log_onnx, 3), "lookup": (lookup_onnx, 2)}


@dataclass(frozen=True)
class Case:
    model: str
    golden: list[list[float]]
    outputs: list[list[float]]  # what the manifest says the artifact outputs on the golden inputs
    problem: str | None  # a fragment of the smoke test's verdict; None: it passes
    labels: list[int] | None = None
    atol: float = 0.01
    min_agreement: float = 1.0


CASES = {
    # sqrt: outputs (1, 2, 3) for (1, 4, 9), top-1 class 2; (3, 2, 1) for (9, 4, 1), class 0
    "passes": Case("sqrt", [[1, 4, 9], [9, 4, 1]], [[1, 2, 3], [3, 2, 1]], None, labels=[2, 0]),
    "passes within the tolerance": Case("sqrt", [[1, 4, 9]], [[1.005, 2, 2.995]], None, labels=[2]),
    "differs beyond the tolerance": Case(
        "sqrt", [[1, 4, 9]], [[1, 2, 3.5]], "outputs differ from the manifest's by 0.5 (tolerance 0.01)"),
    # one expected row for two golden inputs: without the shape check it would broadcast and pass
    "fewer expected rows than golden inputs": Case(
        "sqrt", [[1, 4, 9], [1, 4, 9]], [[1, 2, 3]], "outputs shaped (2, 3), the manifest expects (1, 3)"),
    "a class fewer than the model outputs": Case(
        "sqrt", [[1, 4, 9]], [[1, 2]], "outputs shaped (1, 3), the manifest expects (1, 2)"),
    # outputs within the tolerance, but the top-1 class of the second input is 0, not the labelled 2
    "agreement below min_agreement": Case(
        "sqrt", [[1, 4, 9], [9, 4, 1]], [[1, 2, 3], [3, 2, 1]], "top-1 agreement 0.50 is below the required 1.00",
        labels=[2, 2]),
    "agreement exactly at min_agreement": Case(
        "sqrt", [[1, 4, 9], [9, 4, 1]], [[1, 2, 3], [3, 2, 1]], None, labels=[2, 2], min_agreement=0.5),
    "golden inputs of the wrong length": Case(
        "sqrt", [[1, 4]], [[1, 2, 3]], "could not run the golden inputs: cannot reshape array of size 2"),
    "a golden input the runtime refuses": Case(
        "lookup", [[float(ROWS + 3), 0.5]], [[0, 0, 0]],
        "could not run the golden inputs: onnxruntime failed while running the model", atol=100),
    # NaN compares false with any tolerance, and a NaN row's argmax is 0, the label: only the check for
    # non-finite outputs catches these
    "NaN outputs": Case("sqrt", [[1, 4, 9], [-1, 4, 9]], [[1, 2, 3], [1, 2, 3]],
                        "1 NaN and 0 infinite values on golden input(s) [1]", labels=[2, 0], atol=100),
    "infinite outputs": Case("log", [[0, 1, 1], [1, 1, 1], [0, 0, 1]], [[0, 0, 0]] * 3,
                             "0 NaN and 3 infinite values on golden input(s) [0, 2]", atol=100),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_smoke_test_verdict(tmp_path, case):
    make, features = MODELS[case.model]
    smoke = SmokeExpectation(outputs=case.outputs, atol=case.atol, min_agreement=case.min_agreement)
    manifest = onnx_manifest(make(tmp_path / f"{case.model}.onnx"), model=case.model, features=features,
                             golden=case.golden, smoke=smoke)
    manifest = manifest.model_copy(update={"golden": GoldenSet(inputs=case.golden, labels=case.labels)})
    pred = Predictor(tmp_path / f"{case.model}.onnx", manifest, manifest.artifacts[0], stats=False)
    try:
        problem = smoke_test(pred)
    finally:
        pred.close()
    if case.problem is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith("smoke test") and case.problem in problem, problem

