"""Pure pieces of the toolchain and the statistics it shares with the agent."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.stats import bin_counts
from agent.summaries import image_summaries, image_summary_names
from tests.toolchain_helpers import blobs
from toolchain.data import Dataset, FeatureSpec, Rules, Schema, split_indices
from toolchain.errors import TrainingError
from toolchain.evaluate import gate
from toolchain.models import TabularMLP
from toolchain.profile import quantile_edges
from toolchain.train import TrainConfig, train
from toolchain.validate import check_leakage, validate


@given(values=hnp.arrays(np.float64, st.integers(0, 200),
                         elements=st.floats(allow_nan=True, allow_infinity=True, width=32)))
@settings(deadline=None, max_examples=200)
def test_bin_counts_account_for_every_value(values):
    edges = np.array([-1.0, 0.0, 0.5, 2.0])
    c = bin_counts(values, edges)
    assert c.total == values.size
    finite = values[np.isfinite(values)]
    assert c.below == int((finite < -1).sum()) and c.above == int((finite > 2).sum())


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.25, 0.5, 1.99, 2.0], [0, 2, 3]),  # [lo, hi) bins; the last one includes its upper edge
        ([-1.0, -0.5], [2, 0, 0]),
    ],
)
def test_bin_edges_semantics(values, expected):
    assert bin_counts(np.array(values), np.array([-1.0, 0.0, 0.5, 2.0])).counts.tolist() == expected


@pytest.mark.parametrize(
    ("values", "edges"),
    [
        (np.full(50, 3.0), [2.0, 3.0, 4.0]),  # constant feature: two bins around it
        (np.array([0.0] * 90 + [1.0] * 10), [0.0, 0.1, 1.0]),  # heavy ties collapse to few bins
        (np.array([np.nan, np.inf]), [-1.0, 0.0, 1.0]),  # nothing finite
    ],
)
def test_quantile_edges_degenerate_columns(values, edges):
    assert quantile_edges(values, 10) == pytest.approx(edges)


def test_quantile_edges_are_increasing_and_cover_the_data():
    v = np.random.default_rng(0).normal(size=1000)
    edges = quantile_edges(v, 10)
    assert len(edges) == 11 and all(b > a for a, b in itertools.pairwise(edges))
    assert bin_counts(v, np.array(edges)).counts.sum() == 1000


def test_image_summaries():
    x = np.zeros((2, 1, 4, 4))
    x[1, 0, :, 2:] = 10.0  # a vertical edge
    s = image_summaries(x)
    names = image_summary_names(1)
    assert s.shape == (2, 5) and names == ["c0_mean", "c0_std", "c0_min", "c0_max", "c0_grad"]
    assert s[0].tolist() == [0, 0, 0, 0, 0]
    assert s[1, 0] == 5.0 and s[1, 3] == 10.0 and s[1, 4] > 0
    with pytest.raises(ValueError, match="channels"):
        image_summaries(np.zeros((2, 4, 4)))


@pytest.mark.parametrize(
    ("acc", "base", "max_drop", "passes"),
    [(0.95, 0.96, 1.0, True), (0.949, 0.96, 1.0, False), (0.97, 0.96, 0.0, True), (0.96, 0.96, 0.0, True),
     (0.959, 0.96, 0.0, False)],
)
def test_accuracy_gate(acc, base, max_drop, passes):
    why = gate(acc, base, max_drop)
    assert (why is None) == passes
    if why:
        assert "points below fp32" in why


def test_splits_are_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), 50)
    a, b = split_indices(y, 1), split_indices(y, 1)
    assert all((a[k] == b[k]).all() for k in a)
    assert sum(len(v) for v in a.values()) == 200 and len(np.unique(np.concatenate(list(a.values())))) == 200
    assert np.bincount(y[a["test"]]).tolist() == [10, 10, 10, 10]
    assert not (split_indices(y, 2)["test"] == a["test"]).all()


def _dataset(x, y, rules=None):
    schema = Schema(label="y", features=[FeatureSpec(name=f"f{i}", min=-5, max=5) for i in range(x.shape[1])],
                    rules=rules or Rules())
    return Dataset("t", "tabular", x.astype(np.float32), y, ["a", "b", "c"], schema, "0" * 64, "test")


def _rule(report, name):
    return next(f for f in report.findings if f.rule == name)


def test_validation_rules():
    x, y = blobs(300)
    report, kept = validate(_dataset(x, y))
    assert report.ok and len(kept) == 300
    # a few NaN rows under the limit are dropped with a warning
    x2 = x.copy()
    x2[:3, 0] = np.nan
    report, kept = validate(_dataset(x2, y, Rules(max_nan_fraction=0.05)))
    assert _rule(report, "nan_inf").severity == "warning" and len(kept) == 297
    # out-of-range values beyond the limit are fatal and named
    x3 = x.copy()
    x3[:30, 2] = 50
    report, _ = validate(_dataset(x3, y))
    assert _rule(report, "ranges").severity == "fatal" and "f2" in _rule(report, "ranges").message
    # exact duplicates are dropped
    report, kept = validate(_dataset(np.concatenate([x, x[:10]]), np.concatenate([y, y[:10]])))
    assert _rule(report, "duplicates").severity == "warning" and len(kept) == 300
    # too few rows of a class
    y4 = y.copy()
    y4[y4 == 2] = 1
    y4[:2] = 2
    report, _ = validate(_dataset(x, y4))
    balance = _rule(report, "class_balance")
    assert balance.severity == "fatal" and "only 2 rows" in balance.message


def test_leakage_rule_fires_on_shared_rows():
    x, y = blobs(100)
    ds = _dataset(x, y)
    report, _ = validate(ds)
    check_leakage(report, ds, np.arange(0, 80), np.arange(70, 100))
    assert _rule(report, "leakage").severity == "fatal" and "10 test rows" in _rule(report, "leakage").message


def _train(tmp_path, epochs, *, resume=False, crash_at=None, seed=0):
    x, y = blobs(120)
    torch.manual_seed(seed)
    model = TabularMLP(4, 3, hidden=8)

    def on_epoch(res):
        if crash_at is not None and res.epoch == crash_at:
            raise KeyboardInterrupt("power cut")

    result = train(model, (x, y), (x[:30], y[:30]), TrainConfig(epochs=epochs, batch_size=16, seed=seed),
                   tmp_path / "ckpt", data_digest="d", resume=resume, on_epoch=on_epoch)
    return model, result


def test_resume_continues_an_interrupted_run_exactly(tmp_path):
    straight, full = _train(tmp_path / "a", 5)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", 5, crash_at=3)
    resumed, result = _train(tmp_path / "b", 5, resume=True)
    assert result.resumed_from == 3
    assert [h.epoch for h in result.history] == [1, 2, 3, 4, 5]
    for (k, v), (_, w) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert result.history[-1].loss == full.history[-1].loss


def test_checkpoint_is_not_silently_discarded_or_reused(tmp_path):
    _train(tmp_path, 2)
    with pytest.raises(TrainingError, match="pass --resume"):
        _train(tmp_path, 2)
    with pytest.raises(TrainingError, match="other settings or data"):
        _train(tmp_path, 3, resume=True)
