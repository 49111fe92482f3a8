"""Statistics of one reporting window: what the model saw and how it behaved.

Per feature of the manifest's reference profile: counts on the reference bins,
below/above-range and NaN/inf counts, and Welford mean/M2, min and max of the
finite values. Per window: output class counts and a confidence histogram (a
regression model: its first output's values counted on the reference's
``output_edges``, :func:`output_bin_counts`, in ``class_counts``), and a
latency histogram (from which p50/p95/p99 are read). Memory is
O(features × bins) whatever the traffic; updates are vectorised over a batch
of rows (see :class:`agent.predictor.Predictor`, which batches them off the
request path).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from agent.features import feature_values
from agent.summaries import image_summaries
from protocol import FeatureStats, FeatureWindow, LatencySummary, ReferenceProfile, TelemetryWindow
from protocol.features import FeatureSet

__all__ = ["LATENCY_EDGES_MS", "WindowStats", "feature_rows", "output_bin_counts"]

#: Latency histogram edges in milliseconds (values above the last edge land in the last bin).
LATENCY_EDGES_MS = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
                    2000.0, 5000.0, 10000.0, 60000.0]
#: The inner edges: ``bisect_right`` on them is the bin of a latency, values beyond the ends in the end bins.
_LATENCY_INNER = tuple(LATENCY_EDGES_MS[1:-1])
_MAX_RAW = 1024


def feature_rows(x: np.ndarray, kind: str, features: FeatureSet | None = None) -> np.ndarray:
    """The drift features of a batch of model inputs, exactly as the toolchain computed them: image
    summaries, registry features' values (``features``), or the raw columns."""
    if kind == "image":
        return image_summaries(x)
    if kind == "features":
        if features is None:
            raise ValueError("a 'features' reference profile needs the manifest's feature set")
        return feature_values(features, x.reshape(len(x), -1))
    return x.reshape(len(x), -1)[:, :_MAX_RAW].astype(np.float64)


def output_bin_counts(values: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """A regression model's output values counted on its reference's ``output_edges``: bin ``i`` holds
    ``edges[i] <= v < edges[i+1]`` (the last bin closed), values below or above the edges count in the end bins,
    NaN/±inf values are not counted. The toolchain counts the training predictions with this same function."""
    e = np.asarray(edges, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    idx = np.searchsorted(e[1:-1], v, side="right")
    out: np.ndarray = np.bincount(idx, minlength=len(e) - 1).astype(np.int64)
    return out


@dataclass
class _Moments:
    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


class WindowStats:
    """Accumulates one window; :meth:`close` returns the messages and starts a new one."""

    def __init__(self, reference: ReferenceProfile | None, classes: int, features: FeatureSet | None = None) -> None:
        self.reference = reference
        self.features = features
        self.classes = classes
        self._lock = threading.Lock()
        if reference is not None:
            self.kind = reference.kind
            m = len(reference.features)
            self._kmax = max(len(f.counts) for f in reference.features)
            self._inner = np.full((m, max(self._kmax - 1, 1)), np.inf)
            self._lo = np.empty(m)
            self._hi = np.empty(m)
            self._k = np.empty(m, dtype=np.int64)
            for j, f in enumerate(reference.features):
                self._inner[j, : len(f.edges) - 2] = f.edges[1:-1]
                self._lo[j], self._hi[j], self._k[j] = f.edges[0], f.edges[-1], len(f.counts)
            self._conf_edges = np.asarray(reference.confidence_edges or [0.0, 1.0])
        #: A regression model's output bins (None: a classifier, counted by top-1 class); one count per bin.
        self._out_edges = np.asarray(reference.output_edges) if reference and reference.output_edges else None
        if self._out_edges is not None:
            self.classes = len(self._out_edges) - 1
        # closed windows' totals; the lifetime_* properties add the open window's
        self._closed_requests = 0
        self._closed_errors = 0
        self._closed_latency_counts = [0] * (len(LATENCY_EDGES_MS) - 1)
        self._closed_latency_sum = 0.0
        self._reset()

    @property
    def lifetime_requests(self) -> int:
        with self._lock:
            return self._closed_requests + self.requests

    @property
    def lifetime_errors(self) -> int:
        with self._lock:
            return self._closed_errors + self.errors

    @property
    def lifetime_latency_counts(self) -> list[int]:
        with self._lock:
            return [a + b for a, b in zip(self._closed_latency_counts, self.latency_counts, strict=True)]

    @property
    def lifetime_latency_sum(self) -> float:
        with self._lock:
            return self._closed_latency_sum + self.latency_sum

    def _reset(self) -> None:
        m = len(self.reference.features) if self.reference else 0
        self.n = 0
        self.requests = 0
        self.errors = 0
        self.latency_counts = [0] * (len(LATENCY_EDGES_MS) - 1)
        self.latency_sum = 0.0
        self.latency_max = 0.0
        self.counts = np.zeros((m, getattr(self, "_kmax", 1)), dtype=np.int64)
        self.below = np.zeros(m, dtype=np.int64)
        self.above = np.zeros(m, dtype=np.int64)
        self.nan = np.zeros(m, dtype=np.int64)
        self.mom = _Moments(np.zeros(m), np.zeros(m), np.zeros(m), np.full(m, np.inf), np.full(m, -np.inf))
        self.class_counts = np.zeros(self.classes, dtype=np.int64)
        self.conf_counts = np.zeros(max(len(getattr(self, "_conf_edges", [0, 1])) - 1, 1), dtype=np.int64)

    # -- request path: O(1) per request ----------------------------------------

    def record_request(self, latency_ms: float, error: bool = False) -> None:
        i = bisect.bisect_right(_LATENCY_INNER, latency_ms)
        with self._lock:
            self.requests += 1
            if error:
                self.errors += 1
            self.latency_counts[i] += 1
            self.latency_sum += latency_ms
            if latency_ms > self.latency_max:
                self.latency_max = latency_ms

    # -- batched: vectorised over rows -----------------------------------------

    def add_rows(self, x: np.ndarray, outputs: np.ndarray) -> None:
        """Count a batch of model inputs and their outputs (logits)."""
        if self.reference is None or len(x) == 0:
            return
        feats = feature_rows(x, self.kind, self.features)
        m = self._inner.shape[0]
        feats = feats[:, :m]
        finite = np.isfinite(feats)
        below = finite & (feats < self._lo)
        above = finite & (feats > self._hi)
        inside = finite & ~below & ~above
        with np.errstate(invalid="ignore"):
            idx = (feats[:, :, None] >= self._inner[None, :, :]).sum(axis=2)
        np.minimum(idx, self._k - 1, out=idx)
        flat = (np.arange(m) * self._kmax)[None, :] + idx
        binned = np.bincount(flat[inside], minlength=m * self._kmax).reshape(m, self._kmax)
        # Welford / Chan: merge this batch's moments into the window's
        cnt_b = finite.sum(axis=0).astype(np.float64)
        safe = np.where(finite, feats, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = np.where(cnt_b > 0, safe.sum(axis=0) / np.maximum(cnt_b, 1), 0.0)
            m2_b = (np.where(finite, feats - mean_b, 0.0) ** 2).sum(axis=0)
        lo_b = np.where(finite, feats, np.inf).min(axis=0)
        hi_b = np.where(finite, feats, -np.inf).max(axis=0)
        if self._out_edges is not None:
            out_counts = output_bin_counts(outputs.reshape(len(outputs), -1)[:, 0], self._out_edges)[: self.classes]
            conf_idx = np.empty(0, dtype=np.int64)
        else:
            out_counts = np.bincount(outputs.argmax(axis=1), minlength=self.classes)[: self.classes]
            probs = _softmax(outputs)
            conf_idx = np.clip(np.searchsorted(self._conf_edges, probs.max(axis=1), side="right") - 1, 0,
                               len(self.conf_counts) - 1)
        with self._lock:
            self.n += len(x)
            self.counts += binned
            self.below += below.sum(axis=0)
            self.above += above.sum(axis=0)
            self.nan += (~finite).sum(axis=0)
            mom = self.mom
            total = mom.count + cnt_b
            delta = mean_b - mom.mean
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.where(total > 0, cnt_b / np.maximum(total, 1), 0.0)
            mom.m2 = mom.m2 + m2_b + delta**2 * mom.count * frac
            mom.mean = mom.mean + delta * frac
            mom.count = total
            mom.lo = np.minimum(mom.lo, lo_b)
            mom.hi = np.maximum(mom.hi, hi_b)
            self.class_counts += out_counts
            self.conf_counts += np.bincount(conf_idx, minlength=len(self.conf_counts))

    # -- closing a window --------------------------------------------------------

    def _quantile(self, q: float) -> float:
        total = sum(self.latency_counts)
        if total == 0:
            return 0.0
        target, seen = q * total, 0
        for i, c in enumerate(self.latency_counts):
            if seen + c >= target and c:
                lo, hi = LATENCY_EDGES_MS[i], LATENCY_EDGES_MS[i + 1]
                return min(lo + (hi - lo) * (target - seen) / c, self.latency_max)
            seen += c
        return self.latency_max

    def close(self, *, device_id: str, session: int, window_seq: int, start: datetime, end: datetime,
              manifest_sha256: str | None) -> tuple[TelemetryWindow, FeatureStats | None]:
        with self._lock:
            latency = None
            if self.requests:
                latency = LatencySummary(p50=self._quantile(0.5), p95=self._quantile(0.95), p99=self._quantile(0.99),
                                         max=self.latency_max, mean=self.latency_sum / self.requests)
            telemetry = TelemetryWindow(
                device_id=device_id, session=session, window_seq=window_seq, start=start, end=end,
                manifest_sha256=manifest_sha256, requests=self.requests, errors=self.errors, latency_ms=latency,
                latency_edges_ms=LATENCY_EDGES_MS, latency_counts=list(self.latency_counts),
            )
            stats = None
            if self.reference is not None and manifest_sha256 is not None and self.n:
                feats = []
                for j, f in enumerate(self.reference.features):
                    cnt = self.mom.count[j]
                    feats.append(FeatureWindow(
                        name=f.name, version=f.version, counts=[int(c) for c in self.counts[j, : self._k[j]]],
                        below=int(self.below[j]), above=int(self.above[j]), nan=int(self.nan[j]),
                        mean=float(self.mom.mean[j]) if cnt else None, m2=float(max(self.mom.m2[j], 0.0)) if cnt
                        else None, min=float(self.mom.lo[j]) if cnt else None,
                        max=float(self.mom.hi[j]) if cnt else None,
                    ))
                stats = FeatureStats(
                    device_id=device_id, session=session, window_seq=window_seq, start=start, end=end,
                    manifest_sha256=manifest_sha256, n=self.n, features=feats,
                    class_counts=[int(c) for c in self.class_counts],
                    confidence_counts=[int(c) for c in self.conf_counts] if self._out_edges is None else None,
                )
            # the closing window's requests join the lifetime totals
            self._closed_requests += self.requests
            self._closed_errors += self.errors
            self._closed_latency_counts = [a + b for a, b in zip(self._closed_latency_counts, self.latency_counts,
                                                                 strict=True)]
            self._closed_latency_sum += self.latency_sum
            self._reset()
        return telemetry, stats


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out
