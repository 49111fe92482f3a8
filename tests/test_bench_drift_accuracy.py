"""The drift accuracy benchmark (benchmarks/drift_accuracy.py) on a few windows of one data set."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp

from benchmarks import drift_accuracy as bench

SIZES = (20, 200)


@pytest.fixture(scope="module")
def fair() -> bench.Table:
    return bench.load("fair")


def test_bulk_ks_is_scipys_ks_2samp_with_ties_and_missing_values():
    rng = np.random.default_rng(3)
    ref = np.concatenate([rng.integers(0, 5, (500, 2)).astype(np.float64), rng.normal(size=(500, 1))], axis=1)
    ref_sorted = [np.sort(c[np.isfinite(c)]) for c in ref.T]
    for w in (5, 20, 200):
        win = np.concatenate([rng.integers(0, 6, (w, 2)).astype(np.float64), rng.normal(0.3, 1, (w, 1))], axis=1)
        win[rng.choice(w, w // 5, replace=False), 1] = np.nan
        d, _ = bench.ks_statistics(ref_sorted, win)
        for j in range(3):
            col = win[:, j][np.isfinite(win[:, j])]
            assert d[j] == pytest.approx(ks_2samp(ref_sorted[j], col).statistic, abs=1e-12)
        worst, differ = bench.ks_check(ref_sorted, win, 0.05)
        assert worst < 1e-9 and differ == 0


def test_shifts_do_what_they_say(fair):
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(fair.x))
    facts = bench.ref_facts(fair, fair.raw[rows[:3000]])
    win = fair.x[rows[3000:3200]]
    c, d, miss = fair.numeric, fair.discrete, fair.missing

    tail = bench.shift_window(fair, "tail x10", win.copy(), facts, rng)
    assert np.count_nonzero(tail[:, c] > facts.hi[c]) == 20  # 10 % of 200 rows, all beyond the reference max
    moved = bench.shift_window(fair, "neighbour", win.copy(), facts, rng)
    assert np.count_nonzero(win[:, d] == facts.top) > 0 and np.count_nonzero(moved[:, d] == facts.top) == 0
    assert np.count_nonzero(moved[:, d] == facts.below_top) == np.count_nonzero(np.isin(win[:, d], [
        facts.top, facts.below_top]))
    for shift, share in bench.NAN_RATES.items():
        nan = bench.shift_window(fair, shift, win.copy(), facts, rng)
        assert np.count_nonzero(np.isnan(nan[:, miss])) == round(share * 200)
        assert not np.isnan(np.delete(nan, miss, axis=1)).any()
    offset = bench.shift_window(fair, "offset +0.5 sd", win.copy(), facts, rng)
    assert np.allclose(offset[:, c] - win[:, c], 0.5 * facts.sd[c])


def test_a_small_run_counts_every_cell_and_agrees_across_processes(fair):
    kwargs = dict(windows=6, shift_windows=2, replicates=2, sizes=SIZES, seed=5)
    one = bench.run(("fair",), jobs=1, **kwargs)
    two = bench.run(("fair",), jobs=2, chunk=1, **kwargs)
    assert one.cells == two.cells  # fresh splits are seeded per replicate, not per process
    assert set(one.cells) == {("fair", s, w) for s in bench.SHIFTS for w in SIZES}
    for (_, shift, _), cell in one.cells.items():
        assert cell.windows == (6 if shift == "control" else 2)
        assert cell.decisions + cell.insufficient <= cell.windows
    assert one.ks_checked > 0 and one.ks_worst < 1e-9 and one.ks_differ == 0
    # gross shifts are caught by both tests at 200 rows
    for shift in ("gain x1.5", "offset +0.5 sd"):
        cell = one.cells[("fair", shift, 200)]
        assert cell.decisions == 2 and cell.alarms == 2 and cell.ks_alarms == 2, (shift, cell)
    targets = bench.targets(one, SIZES)
    assert [t.what.split(" ")[0] for t in targets] == ["false-alarm", "mean", "every"]


def test_main_prints_the_table_and_the_targets(capsys):
    rc = bench.main(["--datasets", "fair", "--windows", "4", "--shift-windows", "2", "--replicates", "2",
                     "--sizes", "20", "1000", "--jobs", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| data set | shift | 20 rows | 1000 rows |" in out
    for shift in bench.SHIFTS:
        label = "control (false alarms)" if shift == "control" else shift
        assert f"| fair | {label} |" in out
    assert "mean detection ≥ 0.95 at 1000 rows" in out and "neighbour shift detected" in out
    assert out.count("**PASS**") + out.count("**FAIL**") == 3
