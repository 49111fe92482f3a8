"""The smoke test: a model must reproduce the manifest's golden outputs before the device serves it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.errors import AgentError

if TYPE_CHECKING:
    from agent.predictor import Predictor

__all__ = ["smoke_test"]


def smoke_test(pred: Predictor) -> str | None:
    """Run the manifest's golden inputs; why the model fails, or None when it passes."""
    golden, smoke = pred.manifest.golden, pred.artifact.smoke
    if golden is None or smoke is None:
        return None
    import numpy as np  # loaded with the model already (agent.predictor); kept out of the idle agent's imports

    shape = [d if d > 0 else 1 for d in pred.input_shape[1:]]
    try:
        x = np.asarray(golden.inputs, dtype=np.float32).reshape(len(golden.inputs), *shape)
        out = pred.backend.predict(x)
    except (ValueError, AgentError) as exc:
        return f"smoke test could not run the golden inputs: {exc}"
    expected = np.asarray(smoke.outputs, dtype=np.float32)
    if expected.shape != out.shape:
        return f"smoke test: outputs shaped {out.shape}, the manifest expects {expected.shape}"
    bad = ~np.isfinite(out)
    if bad.any():  # NaN compares false with everything: a tolerance check alone would let it through
        rows = np.flatnonzero(bad.any(axis=1))  # outputs are (golden inputs, classes), as expected's shape says
        return (f"smoke test: the model output {int(np.isnan(out).sum())} NaN and {int(np.isinf(out).sum())} "
                f"infinite values on golden input(s) {rows[:5].tolist()}; a model that outputs non-finite "
                "values is broken (check its export and quantisation)")
    diff = float(np.abs(out - expected).max())
    if not diff <= smoke.atol:
        return f"smoke test: outputs differ from the manifest's by {diff:.4g} (tolerance {smoke.atol:.4g})"
    if golden.labels is not None:
        agreement = float((out.argmax(1) == np.asarray(golden.labels)).mean())
        if agreement + 1e-9 < smoke.min_agreement:
            return f"smoke test: top-1 agreement {agreement:.2f} is below the required {smoke.min_agreement:.2f}"
    return None

