"""Registry features in numpy (definitions: protocol/features.py): what the model's graph computes from raw
input columns (:func:`model_columns`), and the value of each feature that is validated at build time and
counted on devices (:func:`feature_values`), in float32 with the same operations in the same order as the
torch module the toolchain exports (toolchain/features.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from protocol.features import Clip, FeatureDefinition, FeatureSet, Identity, Log1p, OneHot, Ratio, Scale, Window

__all__ = ["feature_values", "model_columns", "reference_edges", "window_summary"]


def _column(inputs: list[str], x: np.ndarray, name: str) -> np.ndarray:
    """A raw column; ±inf counts as missing (NaN), as in the graph."""
    v = x[:, inputs.index(name)]
    out: np.ndarray = np.where(np.isinf(v), np.float32(np.nan), v)
    return out


def _value(d: FeatureDefinition, inputs: list[str], x: np.ndarray) -> np.ndarray:
    """The feature's value per row (float32; NaN where missing). For onehot, the category index."""
    t = d.transform
    if isinstance(t, Ratio):
        num, den = _column(inputs, x, t.numerator), _column(inputs, x, t.denominator)
        ok = np.abs(den) >= np.float32(t.eps)
        out = np.full(len(x), np.nan, dtype=np.float32)
        np.divide(num, den, out=out, where=ok)
        return out
    if isinstance(t, Window):
        summary: np.ndarray = window_summary(np, t, [_column(inputs, x, c) for c in t.columns], np.float32(0),
                                             np.float32(np.nan)).astype(np.float32)
        return summary
    v: np.ndarray = _column(inputs, x, t.column)
    if isinstance(t, Identity):
        copied: np.ndarray = v.copy()
        return copied
    if isinstance(t, Scale):
        scaled: np.ndarray = (v - np.float32(t.offset)) * np.float32(t.factor)
        return scaled
    if isinstance(t, Clip):
        clipped: np.ndarray = np.clip(v, np.float32(t.min), np.float32(t.max))
        return clipped
    if isinstance(t, Log1p):
        with np.errstate(invalid="ignore"):
            logged: np.ndarray = np.log1p(np.maximum(v, np.float32(0)))
        return logged
    idx = np.full(len(x), np.nan, dtype=np.float32)
    for i, c in enumerate(t.categories):
        idx[v == np.float32(c)] = i
    return idx


def window_summary(xp: Any, t: Window, cols: list[Any], zero: Any, missing: Any) -> Any:
    """A window's summary over columns of numpy arrays or torch tensors (``xp`` is ``numpy`` or ``torch``):
    accumulated sample by sample in float32, in one order for both, so the statistics here and the exported
    graph (toolchain/features.py) agree to the last bit. Rows with a missing sample get ``missing``; no NaN
    enters min/max, whose NaN handling differs between runtimes."""
    absent = xp.isnan(cols[0])
    for c in cols[1:]:
        absent = absent | xp.isnan(c)
    cols = [xp.where(xp.isnan(c), zero, c) for c in cols]
    k = len(cols)
    if t.stat in ("min", "max", "range"):
        lo, hi = cols[0], cols[0]
        for c in cols[1:]:
            lo, hi = xp.minimum(lo, c), xp.maximum(hi, c)
        out = lo if t.stat == "min" else hi if t.stat == "max" else hi - lo
    elif t.stat == "rms":
        acc = cols[0] * cols[0]
        for c in cols[1:]:
            acc = acc + c * c
        out = xp.sqrt(acc / k)
    else:
        total = cols[0]
        for c in cols[1:]:
            total = total + c
        mean = total / k
        if t.stat == "mean":
            out = mean
        else:
            acc = (cols[0] - mean) * (cols[0] - mean)
            for c in cols[1:]:
                acc = acc + (c - mean) * (c - mean)
            out = xp.sqrt(acc / k)
    return xp.where(absent, missing, out)


def _as_float32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"raw inputs must be shaped (rows, columns), got {x.shape}")
    return x


def feature_values(fs: FeatureSet, x: np.ndarray) -> np.ndarray:
    """One value per feature and row, shaped (rows, features), float64; NaN where missing. What is
    validated at build time and counted on devices."""
    x = _as_float32(x)
    if x.shape[1] != len(fs.inputs):
        raise ValueError(f"expected {len(fs.inputs)} raw columns ({', '.join(fs.inputs[:8])}), got {x.shape[1]}")
    return np.stack([_value(d, fs.inputs, x) for d in fs.definitions], axis=1).astype(np.float64)


def model_columns(fs: FeatureSet, x: np.ndarray) -> np.ndarray:
    """The model's input computed from raw columns, shaped (rows, sum of widths), float32."""
    x = _as_float32(x)
    if x.shape[1] != len(fs.inputs):
        raise ValueError(f"expected {len(fs.inputs)} raw columns ({', '.join(fs.inputs[:8])}), got {x.shape[1]}")
    cols: list[np.ndarray] = []
    for d in fs.definitions:
        t = d.transform
        if isinstance(t, OneHot):
            v = _column(fs.inputs, x, t.column)
            cols += [(v == np.float32(c)).astype(np.float32) for c in t.categories]
            continue
        v = _value(d, fs.inputs, x)
        cols.append(np.where(np.isnan(v), np.float32(d.fill), v).astype(np.float32))
    return np.stack(cols, axis=1)


def reference_edges(d: FeatureDefinition) -> list[float]:
    """The drift bins of a feature: its valid range in ``bins`` equal parts (for onehot, one bin per
    category), the same for every model version that consumes it."""
    if isinstance(d.transform, OneHot):
        k = len(d.transform.categories)
        return [i - 0.5 for i in range(k + 1)]
    lo, hi = d.bounds
    # float32 edges: the values are float32, so a value at a bound (a clip to 0.3) is not "above" 0.3 in float64
    return [float(np.float32(v)) for v in np.linspace(lo, hi, d.bins + 1)]
