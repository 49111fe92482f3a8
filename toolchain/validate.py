"""Data validation before anything trains.

Each rule yields a :class:`Finding` (``ok``, ``warning`` or ``fatal``) with the
numbers behind it. :func:`validate` also returns the cleaned data (rows with
NaN/inf and exact duplicates removed, when those stay under their limits);
:func:`check_leakage` runs after the split. A report with a fatal finding
stops the build before anything is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from toolchain.data import Dataset

__all__ = ["Finding", "ValidationReport", "check_leakage", "validate"]

Severity = Literal["ok", "warning", "fatal"]
MIN_ROWS_PER_CLASS = 5
#: A regression dataset needs this many rows (after cleaning) to fill four splits.
MIN_REGRESSION_ROWS = 50


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Severity
    message: str
    value: float | None = None


@dataclass
class ValidationReport:
    rows_in: int
    rows_kept: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def fatal(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "fatal"]

    @property
    def ok(self) -> bool:
        return not self.fatal

    def add(self, rule: str, severity: Severity, message: str, value: float | None = None) -> None:
        self.findings.append(Finding(rule, severity, message, value))

    def to_dict(self) -> dict[str, object]:
        return {"rows_in": self.rows_in, "rows_kept": self.rows_kept, "findings": [asdict(f) for f in self.findings]}

    def summary(self) -> str:
        return "; ".join(f"{f.rule}: {f.message}" for f in self.fatal)


def _row_keys(table: np.ndarray) -> np.ndarray:
    t = np.ascontiguousarray(table)
    return t.view(np.dtype((np.void, t.dtype.itemsize * t.shape[1]))).ravel()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def validate(ds: Dataset) -> tuple[ValidationReport, np.ndarray]:
    """Check ``ds`` against its schema's rules; return the report and the indices of rows kept."""
    rules = ds.schema.rules
    table = ds.table().astype(np.float64)
    n = len(table)
    report = ValidationReport(rows_in=n)
    keep = np.ones(n, dtype=bool)

    # NaN / inf
    bad = ~np.isfinite(table)
    bad_rows = bad.any(axis=1)
    frac = bad_rows.mean() if n else 0.0
    if frac > rules.max_nan_fraction:
        cols = np.argsort(-bad.sum(axis=0))[:3]
        worst = ", ".join(f"{ds.schema.features[c].name if c < len(ds.schema.features) else c} ({int(bad[:, c].sum())})"
                          for c in cols if bad[:, c].any())
        report.add("nan_inf", "fatal", f"{_pct(frac)} of rows hold NaN or inf (limit {_pct(rules.max_nan_fraction)}); "
                   f"worst columns: {worst}", frac)
    elif frac > 0:
        report.add("nan_inf", "warning", f"dropped {int(bad_rows.sum())} rows holding NaN or inf", frac)
    else:
        report.add("nan_inf", "ok", "no NaN or inf", 0.0)
    keep &= ~bad_rows

    # declared ranges
    worst_frac, offenders = 0.0, []
    for j, spec in enumerate(ds.schema.features[: table.shape[1]]):
        col = table[keep, j]
        out = np.zeros(col.shape, dtype=bool)
        if spec.min is not None:
            out |= col < spec.min
        if spec.max is not None:
            out |= col > spec.max
        f = float(out.mean()) if col.size else 0.0
        if f > 0:
            offenders.append(f"{spec.name} {_pct(f)} outside [{spec.min}, {spec.max}]")
        worst_frac = max(worst_frac, f)
    if worst_frac > rules.max_out_of_range_fraction:
        report.add("ranges", "fatal", f"values outside the declared range: {'; '.join(offenders[:3])} "
                   f"(limit {_pct(rules.max_out_of_range_fraction)})", worst_frac)
    elif offenders:
        report.add("ranges", "warning", "; ".join(offenders[:3]), worst_frac)
    else:
        report.add("ranges", "ok", "all values within declared ranges", 0.0)

    # exact duplicates (features and label)
    idx = np.flatnonzero(keep)
    full = np.concatenate([table[idx], ds.y[idx, None].astype(np.float64)], axis=1)
    _, first = np.unique(_row_keys(full), return_index=True)
    dup = len(idx) - len(first)
    dup_frac = dup / max(len(idx), 1)
    if dup_frac > rules.max_duplicate_fraction:
        report.add("duplicates", "fatal", f"{_pct(dup_frac)} of rows are exact duplicates "
                   f"(limit {_pct(rules.max_duplicate_fraction)})", dup_frac)
    elif dup:
        report.add("duplicates", "warning", f"dropped {dup} exact duplicate rows", dup_frac)
    else:
        report.add("duplicates", "ok", "no duplicate rows", 0.0)
    dropped = np.setdiff1d(idx, idx[first])
    keep[dropped] = False

    # same features, different labels
    idx = np.flatnonzero(keep)
    keys = _row_keys(table[idx])
    uniq = np.unique(keys)
    conflicts = len(idx) - len(uniq)
    if conflicts:
        report.add("label_conflicts", "warning", f"{conflicts} rows repeat another row's features with another label",
                   conflicts / max(len(idx), 1))

    if ds.task == "regression":
        _target(report, ds.y[keep], ds.schema.label)
        report.rows_kept = int(keep.sum())
        return report, np.flatnonzero(keep)

    # class balance
    y = ds.y[keep]
    counts = np.bincount(y, minlength=len(ds.classes))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        only = ds.classes[present[0]] if len(present) else "none"
        report.add("class_balance", "fatal", f"the label column has a single class ({only!r}); "
                   "a classifier needs at least two", float(len(present)))
    else:
        smallest = counts[present].min() / counts.sum()
        missing = [ds.classes[i] for i in np.flatnonzero(counts == 0)]
        if counts[present].min() < MIN_ROWS_PER_CLASS:
            c = ds.classes[present[np.argmin(counts[present])]]
            report.add("class_balance", "fatal", f"class {c!r} has only {counts[present].min()} rows "
                       f"(at least {MIN_ROWS_PER_CLASS} are needed to split and evaluate)", float(smallest))
        elif smallest < ds.schema.rules.min_class_fraction or missing:
            msg = f"smallest class is {_pct(smallest)} of rows"
            if missing:
                msg += f"; declared classes without rows: {missing[:5]}"
            report.add("class_balance", "warning", msg, float(smallest))
        else:
            report.add("class_balance", "ok", f"{len(present)} classes, smallest {_pct(smallest)}", float(smallest))

    report.rows_kept = int(keep.sum())
    return report, np.flatnonzero(keep)


def _target(report: ValidationReport, y: np.ndarray, label: str) -> None:
    """A regression target needs rows and spread: a constant target leaves nothing to learn (and no scale)."""
    if len(y) < MIN_REGRESSION_ROWS:
        report.add("target", "fatal", f"{len(y)} rows with a target; at least {MIN_REGRESSION_ROWS} are needed to "
                   "split, train and evaluate", float(len(y)))
        return
    std = float(np.std(y))
    if not std > 0:
        report.add("target", "fatal", f"the target {label!r} is constant ({float(y[0]):g}); a regression model needs "
                   "a target that varies", 0.0)
        return
    report.add("target", "ok", f"target {label!r}: mean {float(np.mean(y)):.4g}, std {std:.4g}, range "
               f"[{float(np.min(y)):.4g}, {float(np.max(y)):.4g}]", std)


def check_leakage(report: ValidationReport, ds: Dataset, train: np.ndarray, test: np.ndarray) -> None:
    """Record how many test rows also appear (same features) in the training split."""
    table = ds.table().astype(np.float64)
    train_keys = set(_row_keys(table[train]).tolist())
    leaked = sum(1 for k in _row_keys(table[test]).tolist() if k in train_keys)
    frac = leaked / max(len(test), 1)
    limit = ds.schema.rules.max_leakage_fraction
    if frac > limit:
        report.add("leakage", "fatal", f"{leaked} test rows ({_pct(frac)}) also appear in the training split "
                   f"(limit {_pct(limit)})", frac)
    elif leaked:
        report.add("leakage", "warning", f"{leaked} test rows also appear in the training split", frac)
    else:
        report.add("leakage", "ok", "no test row appears in the training split", 0.0)
