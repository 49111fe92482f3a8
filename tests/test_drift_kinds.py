"""Drift on the features real tables have: integers, categories, rare values, values beyond the training range,
missing values and small windows. Windows are counted by the agent's own code on the profile the toolchain
builds; every reference is a fresh sample, as in a deployment."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timezone

import numpy as np
import pytest

from agent.stats import bin_counts
from agent.window import WindowStats
from protocol import FeatureReference, ReferenceProfile
from protocol.manifest import MAX_BINS
from server.drift import ALPHA, MIN_WINDOW, pool_bins, score, score_feature, sum_stats
from toolchain.profile import feature_edges, feature_kind, quantile_edges, reference_profile

T0 = datetime(2026, 11, 28, tzinfo=timezone.utc)
N_REF = 5000
M = 3
CATEGORY_P = [0.4, 0.25, 0.15, 0.1, 0.07, 0.03]


def _continuous(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.normal(size=shape)


def _integer(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.poisson(2.0, size=shape).astype(np.float64)  # rare high values: P(x ≥ 8) ≈ 0.1 %


def _categorical(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.choice(len(CATEGORY_P), size=shape, p=CATEGORY_P).astype(np.float64)


KINDS = {"continuous": _continuous, "integer": _integer, "categorical": _categorical}


def _profile(x: np.ndarray, rng: np.random.Generator) -> ReferenceProfile:
    y = rng.integers(0, 3, len(x))
    return reference_profile(x.astype(np.float32), "raw", [f"f{i}" for i in range(x.shape[1])], y, 3, np.eye(3)[y])


def _window(ref: ReferenceProfile, x: np.ndarray, seq: int = 0, rng: np.random.Generator | None = None):
    """The agent's statistics of rows ``x``; the model's outputs are uniform over the 3 classes, as in training."""
    classes = (rng or np.random.default_rng(seq)).integers(0, 3, len(x))
    w = WindowStats(ref, 3)
    w.add_rows(x.astype(np.float32), np.eye(3, dtype=np.float32)[classes])
    _, stats = w.close(device_id="d", session=1, window_seq=seq, start=T0, end=T0, manifest_sha256="a" * 64)
    return stats


# -- profiles ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "kind", "edges"),
    [
        (np.array([0.0] * 60 + [1.0] * 40), "discrete", [-0.5, 0.5, 1.5]),
        (np.array([1.0, 2.0, 2.0, 3.0, 5.0]), "discrete", [0.5, 1.5, 2.5, 4.0, 6.0]),
        (np.array([0.5, 1.0, 1.5] * 10), "discrete", [0.25, 0.75, 1.25, 1.75]),  # half-star ratings
        (np.full(50, 3.0), "discrete", [2.5, 3.0, 3.5]),  # constant: any other integer is out of range
        (np.array([np.nan, np.inf]), "continuous", [-1.0, 0.0, 1.0]),  # nothing finite
    ],
)
def test_discrete_features_get_one_bin_per_value(values, kind, edges):
    got, got_kind = feature_edges(values, 10)
    assert got_kind == kind and got == pytest.approx(edges)
    if kind == "discrete" and np.isfinite(values).any():
        counts = bin_counts(values, np.asarray(got)).counts
        distinct = np.unique(values[np.isfinite(values)])
        assert sorted(counts[counts > 0].tolist()) == sorted(np.unique(values, return_counts=True)[1].tolist())
        assert np.count_nonzero(counts) == len(distinct)


def test_the_top_two_values_no_longer_share_the_last_bin():
    """Quantile edges put a discrete feature's two highest values in one (closed) bin; the new edges do not."""
    v = np.random.default_rng(0).choice(6, size=5000, p=CATEGORY_P).astype(np.float64)
    old = bin_counts(np.array([4.0, 5.0]), np.asarray(quantile_edges(v, 10))).counts
    assert old.max() == 2  # 4 and 5 in one bin: the shift 5 → 4 is invisible on those edges
    new = bin_counts(v, np.asarray(feature_edges(v, 10)[0])).counts
    assert new.tolist() == np.bincount(v.astype(np.int64)).tolist()


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).integers(0, 500, 5000).astype(np.float64),  # integral, too many values to list
        np.random.default_rng(2).zipf(2.0, 5000).clip(max=300).astype(np.float64),  # heavy low values
        np.concatenate([np.random.default_rng(3).uniform(0, 1, 4000), np.ones(1000)]),  # 20 % saturated at 1
        np.random.default_rng(4).lognormal(0, 2, 5000),
    ],
    ids=["int500", "zipf", "saturated", "lognormal"],
)
def test_quantile_bins_never_merge_distinct_values_with_mass(values):
    edges, _ = feature_edges(values, 10)
    assert 3 <= len(edges) <= MAX_BINS + 1 and all(b > a for a, b in itertools.pairwise(edges))
    counted = bin_counts(values, np.asarray(edges))
    assert counted.counts.sum() == len(values)  # the training data is inside the range
    inner = np.asarray(edges[1:-1])
    assert not np.isin(inner, values).any()  # every edge lies between two distinct values
    u, cnt = np.unique(values, return_counts=True)
    for value in u[cnt >= len(values) / 10]:  # a value with ≥ 1/10 of the mass has its own bin
        b = np.searchsorted(edges, value, side="right") - 1
        assert counted.counts[min(b, len(counted.counts) - 1)] == cnt[u == value][0]


def test_kind_detection():
    rng = np.random.default_rng(0)
    assert feature_kind(rng.normal(size=500)) == "continuous"
    assert feature_kind(rng.integers(0, 10_000, 500).astype(np.float64)) == "discrete"
    assert feature_kind(np.round(rng.uniform(0, 5, 500), 1)) == "discrete"  # 51 values, each ~10 times
    assert feature_kind(rng.uniform(0, 5, 60)) == "continuous"  # 60 values, none repeated


def test_profile_records_kinds_and_missing_values_and_keeps_old_bytes():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=400), rng.poisson(2.0, 400), rng.normal(size=400)], 1)
    x[:40, 2] = np.nan
    ref = _profile(x, rng)
    a, b, c = ref.features
    assert (a.kind, a.nan, b.kind, b.nan, c.kind, c.nan) == (None, None, "discrete", None, None, 40)
    assert sum(c.counts) == 360 and sum(a.counts) == 400
    # a continuous feature without missing values serialises exactly as before these fields existed
    dumped = a.model_dump(mode="json", exclude_none=True)
    assert set(dumped) == {"name", "edges", "counts", "mean", "std"}
    assert FeatureReference.model_validate_json(json.dumps(dumped)) == a


# -- pooling ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "n_win", "ordered", "groups"),
    [
        ([100, 100, 100, 100], 1000, True, [0, 1, 2, 3]),  # enough everywhere: nothing pooled
        ([400, 250, 150, 100, 70, 30], 50, True, [0, 1, 2, 3, 4, 4]),  # 3.5 + 1.5 expected: pooled
        ([1, 300, 300, 300, 98, 1], 20, True, [0, 0, 1, 2, 2, 2]),  # expected 6, 6, 6, 2: the tail joins
        ([900, 50, 30, 20], 20, True, [0, 0, 0, 0]),  # 18 + 1 + 0.6 + 0.4: one bin, not decidable
        ([400, 60, 350, 50, 140], 50, False, [0, 3, 1, 3, 2]),  # unordered: small ones into "other"
        ([400, 20, 350, 10, 220], 50, False, [0, 2, 1, 2, 2]),  # "other" (1.5) takes the smallest big bin
        ([0, 0, 100, 0], 100, True, [0, 0, 0, 0]),
    ],
)
def test_pool_bins(ref, n_win, ordered, groups):
    assert pool_bins(np.asarray(ref), n_win, ordered=ordered).tolist() == groups


# -- false alarms -----------------------------------------------------------------------------------------------


def _false_alarms(kind: str, size: int, references: int) -> list[list[str]]:
    """The reasons of every alarm in ``references`` × 100 windows without drift, each reference a fresh sample."""
    gen, alarms = KINDS[kind], []
    for rep in range(references):
        rng = np.random.default_rng(10_000 * rep + size)
        ref = _profile(gen(rng, (N_REF, M)), rng)
        for _ in range(100):
            report = score(ref, [_window(ref, gen(rng, (size, M)), rng=rng)])
            assert report.decidable
            if report.drifted:
                alarms.append(report.reasons)
    return alarms


@pytest.mark.parametrize("size", [20, 50, 200, 1000])
@pytest.mark.parametrize("kind", list(KINDS))
def test_no_drift_false_alarms_stay_below_one_percent(kind, size):
    """500 windows per cell (5 fresh references × 100 windows), three features each: the family-wise
    false-alarm rate of one window's decision, nominally ALPHA = 0.5 %."""
    alarms = _false_alarms(kind, size, 5)
    assert len(alarms) <= 5, f"{len(alarms)} false alarms in 500 windows of {size}: {alarms}"


@pytest.mark.slow
@pytest.mark.parametrize("size", [20, 50, 200, 1000])
@pytest.mark.parametrize("kind", list(KINDS))
def test_no_drift_false_alarms_in_2000_windows(kind, size):
    """The same, on 2,000 windows per cell (20 fresh references)."""
    alarms = _false_alarms(kind, size, 20)
    assert len(alarms) <= 20, f"{len(alarms)} false alarms in 2000 windows of {size}: {alarms}"


@pytest.mark.parametrize("size", [5, 10, MIN_WINDOW - 1])
def test_windows_below_the_minimum_are_not_decided(size):
    rng = np.random.default_rng(size)
    ref = _profile(_categorical(rng, (N_REF, M)), rng)
    x = _categorical(rng, (size, M))
    x[:, 0] = np.nan  # even a feature that is all NaN waits for enough rows
    rep = score(ref, [_window(ref, x)])
    assert not rep.decidable and not rep.drifted and rep.reasons == []
    assert rep.to_dict()["decidable"] is False and rep.to_dict()["min_window"] == MIN_WINDOW


def test_small_windows_add_up_until_decidable():
    rng = np.random.default_rng(0)
    ref = _profile(_continuous(rng, (N_REF, M)), rng)
    windows = []
    for seq in range(4):
        x = _continuous(rng, (8, M))
        x[:, 1] = np.nan
        windows.append(_window(ref, x, seq))
        rep = score(ref, sum_stats(windows))
        assert rep.decidable == (8 * (seq + 1) >= MIN_WINDOW)
        assert rep.drifted == rep.decidable
    assert rep.reasons == ["f1: 100 % NaN (training 0 %)"]


# -- detection --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["top", "bottom"])
def test_a_value_moved_to_its_neighbour_is_detected(end):
    """Every row of the highest (lowest) category moves to the one next to it: 3 % (40 %) of the rows."""
    caught = 0
    for rep in range(10):
        rng = np.random.default_rng(rep)
        ref = _profile(_categorical(rng, (N_REF, M)), rng)
        for _ in range(10):
            x = _categorical(rng, (1000, M))
            col = x[:, 1]
            if end == "top":
                col[col == 5] = 4
            else:
                col[col == 0] = 1
            r = score(ref, [_window(ref, x, rng=rng)])
            caught += r.drifted and r.worst == "f1"
            if r.drifted:
                assert any(s.startswith("f1: distribution (chi-square p=") for s in r.reasons)
    assert caught >= 95, f"caught {caught}/100"


@pytest.mark.parametrize(("kind", "size"), [("continuous", 200), ("continuous", 50), ("integer", 200)])
def test_a_tail_scaled_beyond_the_reference_maximum_is_detected(kind, size):
    """The top 10 % of the window's values ×10 (integers: +10), all beyond the training maximum."""
    caught = 0
    for rep in range(5):
        rng = np.random.default_rng(rep)
        ref = _profile(KINDS[kind](rng, (N_REF, M)), rng)
        for _ in range(20):
            x = KINDS[kind](rng, (size, M))
            col = x[:, 2]
            top = col >= np.quantile(col, 0.9)
            col[top] = np.abs(col[top]) * 10 + 10 if kind == "continuous" else col[top] + 10
            r = score(ref, [_window(ref, x, rng=rng)])
            caught += r.drifted
            if r.drifted:
                assert any(s.startswith("f2: ") and "above the reference maximum" in s for s in r.reasons), r.reasons
    assert caught >= 95, f"caught {caught}/100"


@pytest.mark.parametrize("rate", [0.05, 0.30, 1.0])
@pytest.mark.parametrize("kind", list(KINDS))
def test_missing_values_are_detected_at_200_rows(kind, rate):
    caught = 0
    for rep in range(5):
        rng = np.random.default_rng(rep)
        ref = _profile(KINDS[kind](rng, (N_REF, M)), rng)
        for _ in range(20):
            x = KINDS[kind](rng, (200, M))
            x[rng.permutation(200)[: round(200 * rate)], 0] = np.nan
            r = score(ref, [_window(ref, x, rng=rng)])
            caught += r.drifted
            assert r.features[0].nan_rate == pytest.approx(rate)
    assert caught == 100
    assert f"f0: {round(rate * 100)} % NaN (training 0 %)" in r.reasons


def test_missing_values_are_tested_against_the_training_rate():
    """Training had 5 % NaN in f0: windows with 5 % raise nothing, windows with 30 % are caught."""
    rng = np.random.default_rng(0)
    x = _continuous(rng, (N_REF, M))
    x[rng.random(N_REF) < 0.05, 0] = np.nan
    ref = _profile(x, rng)
    assert ref.features[0].nan is not None and 200 < ref.features[0].nan < 300
    same = shifted = 0
    for _ in range(200):
        w = _continuous(rng, (200, M))
        w[rng.random(200) < 0.05, 0] = np.nan
        same += score(ref, [_window(ref, w)]).drifted
        w[rng.random(200) < 0.30, 0] = np.nan
        shifted += score(ref, [_window(ref, w)]).drifted
    assert same <= 2 and shifted >= 190, (same, shifted)


def test_registry_features_fold_the_range_into_the_end_bins_and_test_its_rate():
    """A declared range: the reference counts its values beyond it in the end bins and records how many."""
    ref = np.array([30, 400, 400, 170])  # 20 of the 1000 training values were beyond the range
    win = np.array([3, 40, 40, 10])
    same = score_feature("r", ref, win, 1000, 0, 1, ALPHA, below=1, above=2, ref_outside=20, fold=True)
    assert not same.drifted and same.n == 96 and same.out_of_range_rate == pytest.approx(3 / 96)
    many = score_feature("r", ref, win, 1000, 0, 1, ALPHA, below=0, above=40, ref_outside=20, fold=True)
    assert many.drifted and many.reason is not None and "30 % above the reference maximum" in many.reason


def test_output_classes_pool_their_rare_classes():
    classes = np.array([5000, 3000, 1900, 60, 40])
    fine = score_feature("output.class", classes, np.array([26, 14, 10, 0, 0]), 10_000, 0, 1, ALPHA,
                         ordered=False)
    assert fine.bins == 3 and fine.decidable and not fine.drifted
    moved = score_feature("output.class", classes, np.array([45, 3, 2, 0, 0]), 10_000, 0, 1, ALPHA, ordered=False)
    assert moved.drifted and moved.reason is not None and moved.reason.startswith("output.class: distribution")
