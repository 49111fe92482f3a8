"""Drift decisions measured on data without drift (false alarms) and with it (detection)."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from agent.window import WindowStats
from server.drift import Hysteresis, chi_square, psi, score, sum_stats
from toolchain.profile import reference_profile

T0 = datetime(2026, 11, 28, tzinfo=timezone.utc)


def _window(ref, x, logits, seq=0, device="d"):
    w = WindowStats(ref, logits.shape[1])
    w.add_rows(x, logits)
    _, stats = w.close(device_id=device, session=1, window_seq=seq, start=T0, end=T0, manifest_sha256="a" * 64)
    return stats


def _gaussian_reference(seed=0, n=20_000, m=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, m)).astype(np.float32)
    y = rng.integers(0, 3, n)
    ref = reference_profile(x, "raw", [f"f{i}" for i in range(m)], y, 3, np.eye(3)[y])
    return ref


def _logits(rng, n):
    return rng.normal(size=(n, 3)).astype(np.float32)


@pytest.mark.parametrize("size", [50, 200, 1000])
def test_no_drift_window_decisions_stay_near_alpha(size):
    """One window's decision: measured false-alarm rate over 600 windows (6 seeds × 100)."""
    ref = _gaussian_reference()
    alarms = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        for _ in range(100):
            x = rng.normal(size=(size, 8)).astype(np.float32)
            alarms += score(ref, [_window(ref, x, _logits(rng, size))]).drifted
    assert alarms / 600 <= 0.01, f"{alarms} false alarms in 600 windows of {size}"


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_no_drift_raises_no_alert_in_100_windows(seed):
    ref = _gaussian_reference()
    rng = np.random.default_rng(seed)
    alert = Hysteresis()
    raised = 0
    for _ in range(100):
        x = rng.normal(size=(200, 8)).astype(np.float32)
        raised += alert.update(score(ref, [_window(ref, x, _logits(rng, 200))]).drifted) == "raised"
    assert raised <= 1


def test_fixed_psi_thresholds_would_not_hold_up():
    """Why the decision is not PSI > 0.1: on small windows without drift it fires constantly."""
    ref = _gaussian_reference()
    rng = np.random.default_rng(7)
    fired = 0
    for _ in range(100):
        rep = score(ref, [_window(ref, rng.normal(size=(50, 8)).astype(np.float32), _logits(rng, 50))])
        fired += any(f.psi > 0.1 for f in rep.features)
        assert all(f.psi_threshold > 0.1 for f in rep.features)  # the size-aware threshold is higher
    assert fired > 50


@pytest.mark.parametrize(
    ("shift", "size"),
    [("mean+1", 200), ("scale2", 200), ("dead", 200), ("mean+0.5", 1000)],
)
def test_shifted_windows_alarm(shift, size):
    ref = _gaussian_reference()
    rng = np.random.default_rng(11)
    caught = 0
    for _ in range(20):
        x = rng.normal(size=(size, 8)).astype(np.float32)
        if shift == "mean+1":
            x[:, 3] += 1.0
        elif shift == "mean+0.5":
            x[:, 3] += 0.5
        elif shift == "scale2":
            x[:, 5] *= 2.0
        elif shift == "dead":
            x[:, 0] = 0.0  # a stuck sensor
        rep = score(ref, [_window(ref, x, _logits(rng, size))])
        caught += rep.drifted
        if rep.drifted:
            assert rep.worst in ("f0", "f3", "f5")
    assert caught >= 19, f"caught {caught}/20"


@pytest.fixture(scope="module")
def digits_reference():
    from toolchain.data import load_digits, split_indices

    ds = load_digits()
    split = split_indices(ds.y, 0)
    train, test = split["train"], split["test"]
    ref = reference_profile(ds.x[train], "image", None, ds.y[train], 10, np.eye(10)[ds.y[train]])
    return ref, ds.x[test], ds.y[test], ds.x[train], ds.y[train]


def test_digits_windows_sampled_from_the_reference_raise_no_alert(digits_reference):
    ref, _, _, x, y = digits_reference
    rng = np.random.default_rng(0)
    alert, raised, alarms = Hysteresis(), 0, 0
    for _ in range(100):
        idx = rng.choice(len(x), 100)
        drifted = score(ref, [_window(ref, x[idx], np.eye(10, dtype=np.float32)[y[idx]])]).drifted
        alarms += drifted
        raised += alert.update(drifted) == "raised"
    assert raised == 0 and alarms <= 1


@pytest.mark.parametrize("shift", ["brighter", "noise", "two-classes"])
def test_digits_with_drift(digits_reference, shift):
    ref, x, y, _, _ = digits_reference
    rng = np.random.default_rng(1)
    caught, alert, raised = 0, Hysteresis(), False
    for _ in range(10):
        idx = rng.choice(len(x), 100)
        xs, ys = x[idx].copy(), y[idx]
        if shift == "brighter":
            xs = np.clip(xs + 3.0, 0, 16)
        elif shift == "noise":
            xs = np.clip(xs + rng.normal(0, 2.0, xs.shape), 0, 16).astype(np.float32)
        else:
            keep = np.flatnonzero(y < 2)
            idx = rng.choice(keep, 100)
            xs, ys = x[idx], y[idx]
        drifted = score(ref, [_window(ref, xs, np.eye(10, dtype=np.float32)[ys])]).drifted
        caught += drifted
        raised |= alert.update(drifted) == "raised"
    assert caught >= 9 and raised


def test_fleet_score_is_the_score_of_the_summed_counts():
    ref = _gaussian_reference()
    rng = np.random.default_rng(3)
    windows = []
    for i, dev in enumerate(["a", "b", "c"]):
        x = rng.normal(size=(150, 8)).astype(np.float32)
        x[:, 2] += 0.3 * i
        windows.append(_window(ref, x, _logits(rng, 150), seq=i, device=dev))
    fleet = score(ref, windows)
    summed = sum_stats(windows)
    assert fleet.n == 450 == summed.n
    for f, refeat in zip(fleet.features, ref.features, strict=True):
        stat, df, p = chi_square(np.asarray(refeat.counts), summed.counts[f.name])
        assert (f.chi2, f.df, f.p_value) == (stat, df, p)
        assert f.psi == psi(np.asarray(refeat.counts), summed.counts[f.name])
        mine = [w.features[[g.name for g in w.features].index(f.name)] for w in windows]
        assert summed.counts[f.name].tolist() == sum(np.asarray(g.counts) for g in mine).tolist()
        assert summed.below[f.name] == sum(g.below for g in mine)
        assert summed.above[f.name] == sum(g.above for g in mine)
        assert summed.nan[f.name] == sum(g.nan for g in mine)


def test_output_drift_from_class_counts():
    ref = _gaussian_reference()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    logits = np.zeros((300, 3), dtype=np.float32)
    logits[:, 0] = 5.0  # the model now always says class 0
    rep = score(ref, [_window(ref, x, logits)])
    assert rep.output is not None and rep.output.drifted and not rep.drifted


@pytest.mark.parametrize(
    ("seq", "events"),
    [
        ([True, True, False, False, False], [None, "raised", None, None, "cleared"]),
        ([True, False, True, True, False, True, False, False, False],
         [None, None, None, "raised", None, None, None, None, "cleared"]),
        ([False, True, False], [None, None, None]),
    ],
)
def test_alert_hysteresis(seq, events):
    h = Hysteresis(raise_after=2, clear_after=3)
    assert [h.update(d) for d in seq] == events
