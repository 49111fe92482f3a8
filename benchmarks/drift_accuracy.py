"""Drift decisions on public tabular data sets and one image set: false alarms and detection, beside KS.

The pipeline under test is the one a deployment runs: the reference profile is built by
``toolchain.profile`` from the reference rows (:func:`build_reference`, the one place that says how), each
window is counted by the agent's :class:`agent.window.WindowStats` into a ``protocol.FeatureStats`` message
and decided by ``server.drift.score``. A window the server calls undecidable (``report.decidable`` false,
too few rows) is held and the next windows of the same stream are added to it until the sum is decidable,
as the server accumulates a device's windows; those that never become decidable are counted as
*insufficient*, not as decisions. Beside it, in the same run and on the same windows, the two-sample
Kolmogorov–Smirnov test on each raw column (the 64 pixels for the image set), Bonferroni-corrected at the
same family rate ``server.drift.ALPHA``: a window alarms when any column has ``p < ALPHA / columns``. Its
statistic and p-value are those of ``scipy.stats.ks_2samp(ref, win, method="asymp")`` on the finite values,
computed in bulk; ks_2samp itself is called on the first windows of every cell and must agree.

Data sets, all shipped inside PyPI packages (nothing is downloaded at run time): statsmodels' ``randhie``
(20,190 rows: binary, a 5-level coinsurance, skewed continuous) and ``fair`` (6,366 rows: ordinal levels),
plotnine's ``diamonds`` (53,940 rows: ordered categories, continuous, skewed price) and ``txhousing``
(8,602 rows: 46 cities as a nominal code, month, skewed counts with their own missing values), and
scikit-learn's ``digits`` (1,797 8×8 images, through the toolchain's image summaries). A tabular set's
features are the columns a model would take; the label (or time) stays out and defines the segment.

Each replicate draws a fresh random split: ``min(n / 2, n - 1000)`` reference rows, the rest held out;
windows are drawn without replacement from the held-out rows. Cells are data set × shift × window size
(20, 50, 200, 1,000); a shift changes one column (the whole image for digits):

- ``control``: held-out rows as they are (false alarms; ``--windows`` per cell, 1,000 by default);
- ``segment``: held-out rows of one segment only (a label value or a time span);
- ``offset +0.5 sd``, ``gain x1.5``, ``noise 1 sd``: a continuous column moved by half its reference
  standard deviation, multiplied by 1.5, or given Gaussian noise of one standard deviation (digits: +2 on
  every pixel, pixels ×1.5, noise of σ 2);
- ``neighbour``: a discrete column's highest reference value replaced by the next lower one (digits:
  pixels at 16 read 15);
- ``tail x10``: the window's largest 10 % of values moved beyond the reference maximum,
  ``max + sd / 2 + 10 · (v − q90)`` (digits: 10 % of the images ×3);
- ``NaN 5 %``, ``NaN 30 %``, ``NaN 100 %``: that share of the window's rows missing in one column (digits:
  whole images NaN).

Run: ``python -m benchmarks.drift_accuracy [--windows 1000] [--shift-windows 200] [--replicates 200]``
(``--quick`` for a short run; ``--strict`` exits 1 when a target fails).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from typing import Literal

import numpy as np
from scipy.stats import ks_2samp, kstwo

from agent.window import WindowStats
from protocol import FeatureStats, ReferenceProfile
from server.drift import ALPHA, score
from toolchain.profile import reference_profile

SIZES = (20, 50, 200, 1000)
SHIFTS = ("control", "segment", "offset +0.5 sd", "gain x1.5", "noise 1 sd", "neighbour", "tail x10", "NaN 5 %",
          "NaN 30 %", "NaN 100 %")
NAN_RATES = {"NaN 5 %": 0.05, "NaN 30 %": 0.30, "NaN 100 %": 1.0}
DATASETS = ("randhie", "fair", "diamonds", "txhousing", "digits")
_T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# --- data sets -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One data set: the model's inputs ``x``, what KS sees (``raw``), and the columns the shifts touch."""

    name: str
    kind: Literal["raw", "image"]
    x: np.ndarray  # (n, m) float64, or (n, 1, h, w) float32 images
    names: list[str] | None
    segment: np.ndarray  # bool (n,)
    segment_what: str
    numeric: int = 0  # offset / gain / noise / tail
    discrete: int = 0  # neighbour
    missing: int = 0  # NaN
    kinds: str = ""

    @property
    def raw(self) -> np.ndarray:
        return self.x.reshape(len(self.x), -1).astype(np.float64)


def _columns(df: object, features: list[str]) -> np.ndarray:
    import pandas as pd

    assert isinstance(df, pd.DataFrame)
    cols = []
    for c in features:
        s = df[c]
        cols.append(s.cat.codes.to_numpy(np.float64) if isinstance(s.dtype, pd.CategoricalDtype)
                    else s.to_numpy(np.float64))
    return np.stack(cols, axis=1)


@cache
def load(name: str) -> Table:
    """A data set by name (each loads from files its package ships)."""
    if name == "randhie":
        import statsmodels.api as sm

        df = sm.datasets.randhie.load_pandas().data
        feats = ["lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf", "hlthp"]
        return Table(name, "raw", _columns(df, feats), feats, (df["mdvis"] == 0).to_numpy(),
                     "no doctor visits (label mdvis = 0)", numeric=feats.index("disea"),
                     discrete=feats.index("lncoins"), missing=feats.index("lpi"),
                     kinds="binary, 5 levels, skewed continuous")
    if name == "fair":
        import statsmodels.api as sm

        df = sm.datasets.fair.load_pandas().data
        feats = ["rate_marriage", "age", "yrs_married", "children", "religious", "educ", "occupation",
                 "occupation_husb"]
        return Table(name, "raw", _columns(df, feats), feats, (df["affairs"] > 0).to_numpy(),
                     "label affairs > 0", numeric=feats.index("yrs_married"), discrete=feats.index("religious"),
                     missing=feats.index("educ"), kinds="ordinal levels (4–7 values)")
    if name == "diamonds":
        from plotnine.data import diamonds

        feats = ["carat", "color", "clarity", "depth", "table", "price", "x", "y", "z"]
        return Table(name, "raw", _columns(diamonds, feats), feats, (diamonds["cut"] == "Ideal").to_numpy(),
                     "label cut = Ideal", numeric=feats.index("carat"), discrete=feats.index("color"),
                     missing=feats.index("depth"), kinds="ordered categories, continuous, skewed")
    if name == "txhousing":
        import pandas as pd
        from plotnine.data import txhousing

        df = txhousing.assign(city=txhousing["city"].astype(pd.CategoricalDtype()))
        feats = ["city", "month", "sales", "volume", "median", "listings", "inventory"]
        return Table(name, "raw", _columns(df, feats), feats, (df["year"] >= 2010).to_numpy(),
                     "years 2010–2015 (year is not a feature)", numeric=feats.index("median"),
                     discrete=feats.index("month"), missing=feats.index("sales"),
                     kinds="nominal (46 cities), month, skewed counts with missing values")
    if name == "digits":
        from toolchain.data import load_digits

        ds = load_digits()
        return Table(name, "image", ds.x.astype(np.float32), None, ds.y <= 4, "digits 0–4",
                     kinds="image, 64 integer pixels 0–16")
    raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


def build_reference(table: Table, rows: np.ndarray) -> ReferenceProfile:
    """The reference profile of ``rows`` exactly as ``edgeherd build`` makes one (one class, no model)."""
    n = len(rows)
    return reference_profile(table.x[rows], table.kind, table.names, np.zeros(n, dtype=np.int64), 1, np.ones((n, 1)))


def count_window(stats: WindowStats, x: np.ndarray) -> FeatureStats:
    """One window's counts as the agent reports them."""
    stats.add_rows(x, np.zeros((len(x), 1), dtype=np.float32))
    _, msg = stats.close(device_id="bench", session=1, window_seq=0, start=_T0, end=_T0, manifest_sha256="0" * 64)
    assert msg is not None
    return msg


# --- shifts ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefFacts:
    """What the shifts need to know about this replicate's reference rows (per raw column)."""

    sd: np.ndarray
    q90: np.ndarray
    hi: np.ndarray
    top: float  # the discrete column's highest value
    below_top: float  # and the next lower one


def ref_facts(table: Table, raw_ref: np.ndarray) -> RefFacts:
    with np.errstate(all="ignore"):
        sd = np.nanstd(raw_ref, axis=0)
        q90 = np.nanquantile(raw_ref, 0.9, axis=0)
        hi = np.nanmax(raw_ref, axis=0)
    values = np.unique(raw_ref[:, table.discrete][np.isfinite(raw_ref[:, table.discrete])])
    return RefFacts(sd, q90, hi, float(values[-1]), float(values[-2]) if len(values) > 1 else float(values[-1]))


def shift_window(table: Table, shift: str, x: np.ndarray, f: RefFacts, rng: np.random.Generator) -> np.ndarray:
    """``x`` (a copy of the window's rows) with ``shift`` applied."""
    w = len(x)
    if table.kind == "image":
        match shift:
            case "offset +0.5 sd":
                x += 2.0
            case "gain x1.5":
                x *= 1.5
            case "noise 1 sd":
                x += rng.normal(0.0, 2.0, x.shape).astype(x.dtype)
            case "neighbour":
                x[x == 16.0] = 15.0
            case "tail x10":
                x[rng.choice(w, max(1, round(0.1 * w)), replace=False)] *= 3.0
            case _ if shift in NAN_RATES:
                x[rng.choice(w, max(1, round(NAN_RATES[shift] * w)), replace=False)] = np.nan
        return x
    c = table.numeric
    match shift:
        case "offset +0.5 sd":
            x[:, c] += 0.5 * f.sd[c]
        case "gain x1.5":
            x[:, c] *= 1.5
        case "noise 1 sd":
            x[:, c] += rng.normal(0.0, f.sd[c], w)
        case "neighbour":
            d = x[:, table.discrete]
            d[d == f.top] = f.below_top
        case "tail x10":
            v = x[:, c]
            order = np.lexsort((rng.random(w), np.nan_to_num(v, nan=-np.inf)))  # ties in random order
            tail = order[w - max(1, round(0.1 * w)):]
            v[tail] = f.hi[c] + 0.5 * f.sd[c] + 10.0 * np.maximum(v[tail] - f.q90[c], 0.0)
        case _ if shift in NAN_RATES:
            x[rng.choice(w, max(1, round(NAN_RATES[shift] * w)), replace=False), table.missing] = np.nan
    return x


# --- KS, in bulk -----------------------------------------------------------------------------------------


def ks_statistics(ref_sorted: list[np.ndarray], win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, ``ks_2samp``'s statistic D on the finite values and the effective size ``round(n·w / (n + w))``
    its asymptotic p-value uses (D = 0 where a side is empty). ``ref_sorted``: each column's finite reference
    values, sorted."""
    d = np.zeros(len(ref_sorted))
    en = np.ones(len(ref_sorted))
    for j, ref in enumerate(ref_sorted):
        col = win[:, j]
        s = np.sort(col[np.isfinite(col)])
        nw, nr = len(s), len(ref)
        if nw == 0 or nr == 0:
            continue
        i = np.arange(1, nw + 1)
        # the two-sided sup |F_ref − F_win| is reached at a window value (from the right) or just before one
        above = i / nw - np.searchsorted(ref, s, side="right") / nr
        below = np.searchsorted(ref, s, side="left") / nr - (i - 1) / nw
        d[j] = max(float(above.max()), float(below.max()), 0.0)
        en[j] = round(nr * nw / (nr + nw))
    return d, en


@cache
def _critical(en: float, level: float) -> float:
    return float(kstwo.isf(level, en))


def ks_alarms(d: np.ndarray, en: np.ndarray, level: float) -> np.ndarray:
    """Per column, ``p < level`` for ``ks_2samp(method="asymp")``: D beyond the critical value of its size
    (the p-value itself where D is within 1e-9 of it)."""
    crit = np.array([_critical(float(e), level) for e in en])
    out: np.ndarray = d > crit
    near = np.abs(d - crit) < 1e-9
    if near.any():
        out[near] = kstwo.sf(d[near], en[near]) < level
    return out


def ks_check(ref_sorted: list[np.ndarray], win: np.ndarray, level: float) -> tuple[float, int]:
    """Against ``scipy.stats.ks_2samp`` itself on this window: the largest |Δp| and how many columns' decisions
    differ."""
    d, en = ks_statistics(ref_sorted, win)
    alarms = ks_alarms(d, en, level)
    worst, differ = 0.0, 0
    for j, ref in enumerate(ref_sorted):
        col = win[:, j][np.isfinite(win[:, j])]
        if len(col) and len(ref):
            p = float(ks_2samp(ref, col, method="asymp").pvalue)
            worst = max(worst, abs(p - float(np.clip(kstwo.sf(d[j], en[j]), 0.0, 1.0))))
            differ += (p < level) != bool(alarms[j])
    return worst, differ


# --- one data set's replicates ---------------------------------------------------------------------------


@dataclass
class Cell:
    windows: int = 0
    decisions: int = 0
    alarms: int = 0
    insufficient: int = 0  # windows never decided
    ks_alarms: int = 0

    def add(self, other: Cell) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def rate(self) -> float | None:
        return self.alarms / self.decisions if self.decisions else None

    @property
    def ks_rate(self) -> float | None:
        return self.ks_alarms / self.windows if self.windows else None


@dataclass
class Result:
    cells: dict[tuple[str, str, int], Cell] = field(default_factory=dict)
    ks_checked: int = 0
    ks_worst: float = 0.0
    ks_differ: int = 0

    def merge(self, other: Result) -> None:
        for key, cell in other.cells.items():
            self.cells.setdefault(key, Cell()).add(cell)
        self.ks_checked += other.ks_checked
        self.ks_differ += other.ks_differ
        self.ks_worst = max(self.ks_worst, other.ks_worst)


def _per_replicate(total: int, replicates: int, r: int) -> int:
    return total // replicates + (r < total % replicates)


def run_replicates(name: str, first: int, last: int, replicates: int, windows: int, shift_windows: int,
                   sizes: tuple[int, ...], shifts: tuple[str, ...], seed: int) -> Result:
    """Replicates ``first .. last - 1`` of data set ``name``: each a fresh split, reference and windows."""
    table = load(name)
    raw = table.raw
    n = len(table.x)
    n_ref = min(n // 2, n - max(sizes))
    out = Result()
    alpha_ks = ALPHA / raw.shape[1]
    for r in range(first, last):
        rng = np.random.default_rng([seed, DATASETS.index(name) if name in DATASETS else 99, r])
        perm = rng.permutation(n)
        ref_rows, held = perm[:n_ref], perm[n_ref:]
        reference = build_reference(table, ref_rows)
        stats = WindowStats(reference, 1)
        facts = ref_facts(table, raw[ref_rows])
        ref_sorted = [np.sort(col[np.isfinite(col)]) for col in raw[ref_rows].T]
        segment = held[table.segment[held]]
        for shift in shifts:
            k = _per_replicate(windows if shift == "control" else shift_windows, replicates, r)
            pool = segment if shift == "segment" else held
            for w in sizes:
                cell = out.cells.setdefault((name, shift, w), Cell())
                if len(pool) < w:
                    continue  # this split holds too few rows of the segment for a window this large
                pending: list[FeatureStats] = []
                for i in range(k):
                    x = shift_window(table, shift, table.x[rng.choice(pool, w, replace=False)].copy(), facts, rng)
                    pending.append(count_window(stats, x))
                    report = score(reference, pending)
                    cell.windows += 1
                    if getattr(report, "decidable", True):
                        cell.decisions += 1
                        cell.alarms += bool(report.drifted)
                        pending = []
                    xr = x.reshape(w, -1).astype(np.float64)
                    cell.ks_alarms += bool(ks_alarms(*ks_statistics(ref_sorted, xr), alpha_ks).any())
                    if r == first and i == 0:
                        worst, differ = ks_check(ref_sorted, xr, alpha_ks)
                        out.ks_worst = max(out.ks_worst, worst)
                        out.ks_differ += differ
                        out.ks_checked += 1
                cell.insufficient += len(pending)
    return out


# --- the report ------------------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _cell_text(c: Cell | None) -> str:
    if c is None or c.windows == 0:
        return "n/a"
    text = f"{_fmt(c.rate) if c.decisions else 'insufficient'} / {_fmt(c.ks_rate)}"
    if c.insufficient and c.decisions:
        text += f" ({c.insufficient / c.windows:.0%} insufficient)"
    return text


def table_markdown(res: Result, datasets: Iterable[str], shifts: Iterable[str], sizes: tuple[int, ...]) -> str:
    head = "| data set | shift | " + " | ".join(f"{w} rows" for w in sizes) + " |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for name in datasets:
        for shift in shifts:
            label = "control (false alarms)" if shift == "control" else shift
            lines.append(f"| {name} | {label} | "
                         + " | ".join(_cell_text(res.cells.get((name, shift, w))) for w in sizes) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    what: str
    ok: bool
    ours: str
    ks: str


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def targets(res: Result, sizes: tuple[int, ...]) -> list[Target]:
    """The issue's "Done when" figures, for edgeherd (KS beside it for scale)."""
    out = []
    controls = [(k, c) for k, c in res.cells.items() if k[1] == "control" and c.decisions]
    bad = [f"{k[0]}@{k[2]}: {c.rate:.3f}" for k, c in controls if (c.rate or 0.0) > 0.01]
    worst = max((c.rate or 0.0 for _, c in controls), default=0.0)
    worst_ks = max((c.ks_rate or 0.0 for _, c in controls), default=0.0)
    out.append(Target("false-alarm rate ≤ 1 % in every decidable control cell", not bad and bool(controls),
                      f"worst {worst:.3f}" + (f" ({'; '.join(bad)})" if bad else ""), f"worst {worst_ks:.3f}"))
    for w, goal in ((200, 0.80), (1000, 0.95)):
        if w not in sizes:
            continue
        shifted = [c for k, c in res.cells.items() if k[1] != "control" and k[2] == w and c.decisions]
        ours = _mean([c.rate or 0.0 for c in shifted])
        ks = _mean([c.ks_rate or 0.0 for c in shifted])
        out.append(Target(f"mean detection ≥ {goal:.2f} at {w} rows", ours is not None and ours >= goal,
                          f"{_fmt(ours)} over {len(shifted)} cells", _fmt(ks)))
    if 200 in sizes:
        named = ("NaN 30 %", "NaN 100 %", "tail x10")
        cells = [(k, c) for k, c in res.cells.items() if k[1] in named and k[2] == 200 and c.windows]
        bad = [f"{k[0]} {k[1]}: {_fmt(c.rate)}" for k, c in cells if (c.rate or 0.0) < 0.95]
        out.append(Target("every NaN (30 %, 100 %) and out-of-range (≈10 % tail) shift detected ≥ 0.95 at 200 rows",
                          not bad and bool(cells), "; ".join(bad) if bad else f"all {len(cells)} cells",
                          f"lowest {min((c.ks_rate or 0.0 for _, c in cells), default=0.0):.3f}"))
    if 1000 in sizes:
        cells = [(k, c) for k, c in res.cells.items() if k[1] == "neighbour" and k[2] == 1000 and c.windows]
        lowest = min((c.rate or 0.0 for _, c in cells), default=0.0)
        out.append(Target("discrete neighbour shift detected ≥ 0.95 at 1000 rows", bool(cells) and lowest >= 0.95,
                          f"lowest {lowest:.3f} ({', '.join(f'{k[0]} {_fmt(c.rate)}' for k, c in cells)})",
                          f"lowest {min((c.ks_rate or 0.0 for _, c in cells), default=0.0):.3f}"))
    return out


def summary(res: Result, sizes: tuple[int, ...]) -> str:
    lines = ["| rows | edgeherd worst false alarms | KS worst false alarms | edgeherd mean detection | "
             "KS mean detection |", "|---|---|---|---|---|"]
    for w in sizes:
        ctrl = [c for k, c in res.cells.items() if k[1] == "control" and k[2] == w and c.windows]
        shifted = [c for k, c in res.cells.items() if k[1] != "control" and k[2] == w and c.windows]
        lines.append(f"| {w} | {_fmt(max((c.rate or 0.0 for c in ctrl if c.decisions), default=None))} | "
                     f"{_fmt(max((c.ks_rate or 0.0 for c in ctrl), default=None))} | "
                     f"{_fmt(_mean([c.rate or 0.0 for c in shifted if c.decisions]))} | "
                     f"{_fmt(_mean([c.ks_rate or 0.0 for c in shifted]))} |")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------------


def run(datasets: tuple[str, ...], *, windows: int, shift_windows: int, replicates: int, sizes: tuple[int, ...],
        shifts: tuple[str, ...] = SHIFTS, seed: int = 0, jobs: int = 1, chunk: int = 25,
        progress: Callable[[str], None] | None = None) -> Result:
    """Every cell of ``datasets`` × ``shifts`` × ``sizes``; replicates are spread over ``jobs`` processes."""
    tasks = [(name, lo, min(lo + chunk, replicates)) for name in datasets for lo in range(0, replicates, chunk)]
    total = Result()
    args = (replicates, windows, shift_windows, sizes, shifts, seed)
    if jobs <= 1:
        for name, lo, hi in tasks:
            total.merge(run_replicates(name, lo, hi, *args))
            if progress:
                progress(f"{name} replicates {lo}–{hi - 1}")
        return total
    # spawned, not forked: the parent may run threads (a test process with JAX loaded does), and a forked child
    # of a threaded process can deadlock
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(t, pool.submit(run_replicates, t[0], t[1], t[2], *args)) for t in tasks]
        for (name, lo, hi), fut in futures:
            total.merge(fut.result())
            if progress:
                progress(f"{name} replicates {lo}–{hi - 1}")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=1000, help="control windows per cell (default 1000)")
    ap.add_argument("--shift-windows", type=int, default=200, help="shifted windows per cell (default 200)")
    ap.add_argument("--replicates", type=int, default=200, help="fresh reference/held-out splits per data set")
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="100 control and 40 shifted windows per cell")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = ap.parse_args(argv)
    if args.quick:
        args.windows, args.shift_windows, args.replicates = 100, 40, 20
    if min(args.windows, args.shift_windows, args.replicates) < 1 or min(args.sizes) < 2:
        ap.error("--windows, --shift-windows and --replicates must be at least 1, --sizes at least 2")
    sizes = tuple(sorted(set(args.sizes)))
    t0 = time.monotonic()
    res = run(tuple(args.datasets), windows=args.windows, shift_windows=args.shift_windows,
              replicates=args.replicates, sizes=sizes, seed=args.seed, jobs=args.jobs,
              progress=lambda s: print(f"  done: {s}", file=sys.stderr, flush=True))
    seconds = time.monotonic() - t0
    print(f"{args.windows} control and {args.shift_windows} shifted windows per cell over {args.replicates} fresh "
          f"reference/held-out splits per data set; family rate ALPHA = {ALPHA}; {seconds:.0f} s on {args.jobs} "
          f"process(es).\n")
    print("Data sets:\n")
    for name in args.datasets:
        t = load(name)
        feats = f"{len(t.names)} columns" if t.names else "image summaries (KS: 64 pixels)"
        print(f"- `{name}`: {len(t.x):,} rows, {feats}; {t.kinds}; segment: {t.segment_what}")
    print("\nEach cell: **edgeherd / KS** — the share of decisions that alarmed (false alarms in the control row, "
          "detection in the others); KS is `ks_2samp` per raw column, Bonferroni at ALPHA. *insufficient*: "
          "windows still held for more rows when the stream ended; n/a: the split had too few segment rows.\n")
    print(table_markdown(res, args.datasets, SHIFTS, sizes))
    print()
    print(summary(res, sizes))
    print(f"\nKS cross-check: `scipy.stats.ks_2samp` itself on {res.ks_checked} windows: largest |Δp| "
          f"{res.ks_worst:.1e}, {res.ks_differ} column decisions differ.\n")
    print("Targets (issue #19, \"Done when\"), edgeherd; KS beside it for scale:\n")
    failed = 0
    for target in targets(res, sizes):
        failed += not target.ok
        print(f"- **{'PASS' if target.ok else 'FAIL'}** {target.what}: {target.ours} (KS: {target.ks})")
    if res.ks_worst > 1e-6 or res.ks_differ:
        print(f"\nKS in bulk disagrees with scipy.stats.ks_2samp: |Δp| up to {res.ks_worst:.1e}, "
              f"{res.ks_differ} decisions", file=sys.stderr)
        return 2
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
