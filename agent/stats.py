"""Counting values on reference bins: the core of drift statistics.

A reference profile gives, per feature, K+1 increasing edges. A value ``v``
falls in bin ``i`` when ``edges[i] <= v < edges[i+1]`` (the last bin also
takes ``v == edges[-1]``); finite values outside the edges count as
``below``/``above``, NaN and ±inf as ``nan``. So for every feature
``sum(counts) + below + above + nan == n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BinCounts", "bin_counts"]


@dataclass(frozen=True)
class BinCounts:
    counts: np.ndarray
    below: int
    above: int
    nan: int

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.below + self.above + self.nan


def bin_counts(values: np.ndarray, edges: np.ndarray) -> BinCounts:
    """Count a 1-D array of values on ``edges``."""
    values = np.asarray(values, dtype=np.float64).ravel()
    edges = np.asarray(edges, dtype=np.float64)
    finite = np.isfinite(values)
    v = values[finite]
    low, high = edges[0], edges[-1]
    below = int(np.count_nonzero(v < low))
    above = int(np.count_nonzero(v > high))
    inside = v[(v >= low) & (v <= high)]
    idx = np.searchsorted(edges, inside, side="right") - 1
    np.minimum(idx, len(edges) - 2, out=idx)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    return BinCounts(counts=counts, below=below, above=above, nan=int(values.size - v.size))
