"""``Predictor``: an installed model, ready to answer, with statistics captured on the side.

``predict`` runs the backend and records the request's latency (O(1)); the
inputs and outputs are copied into reused batch buffers that a background
thread turns into window statistics a buffer at a time, so the vectorised
counting stays off the request path. A buffer holds 64 rows, or more when
rows are small (up to 1,024 rows in 256 KiB), so the counting's fixed cost per
call is spread over many rows. Of an image larger than 64 × 64, only the
strided pixels the image summaries read are copied
(:func:`agent.summaries.summary_view`): the same statistics from a fraction
of the copy. Buffers are allocated as bursts need them, up to 32 MiB; beyond
that, rows are left out of the statistics (and counted in
``stats_dropped_rows``) rather than delaying a request.

A request that fails, on its input (:class:`~agent.errors.InputError`) or in
the runtime (:class:`~agent.errors.InferenceError`), is counted as an error
in the window (so in the device's error rate and a rollout's error gate) and
the exception re-raised; any other exception a backend lets out is counted
too, logged with its traceback and raised as an ``InferenceError``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.backends import open_backend
from agent.errors import AgentError, InferenceError
from agent.summaries import summary_stride
from agent.window import WindowStats
from protocol import ArtifactEntry, FeatureStats, Manifest, Target, TelemetryWindow, manifest_digest

if TYPE_CHECKING:
    from agent.backends import Backend

__all__ = ["Predictor", "runtime_for"]

log = logging.getLogger(__name__)
#: Rows per batch buffer: at least _FLUSH_ROWS, and as many more as fit _FLUSH_BYTES, up to _MAX_FLUSH_ROWS.
_FLUSH_ROWS = 64
_MAX_FLUSH_ROWS = 1024
_FLUSH_BYTES = 256 * 1024
_clock = time.perf_counter
_MIN_BUFFERS = 4
#: Memory the batch buffers may take while the statistics thread catches up with a burst.
_BUFFER_BUDGET = 32 * 1024 * 1024


@dataclass
class _Buffer:
    x: np.ndarray
    out: np.ndarray


def runtime_for(artifact: ArtifactEntry) -> str:
    return {Target.ONNX: "onnxruntime", Target.TFLITE: "ai-edge-litert", Target.TENSORRT: "tensorrt"}[artifact.target]


class Predictor:
    """One loaded artifact. Thread-safe: concurrent ``predict`` calls are serialised on the backend."""

    def __init__(self, path: Path, manifest: Manifest, artifact: ArtifactEntry, *, threads: int = 1,
                 stats: bool = True, backend: Backend | None = None, engine_cache: Path | None = None) -> None:
        self.manifest = manifest
        #: The bundle's content address, reported with every state and window (computed once).
        self.manifest_sha256 = manifest_digest(manifest)
        self.artifact = artifact
        self.path = path
        self.backend = backend or open_backend(path, runtime_for(artifact), threads=threads,
                                               tensorrt=artifact.tensorrt, engine_cache=engine_cache)
        classes = len(manifest.labels) if manifest.labels else int(self.backend.output.shape[-1])
        self.stats = WindowStats(manifest.reference if stats else None, max(classes, 1), manifest.features)
        self._lock = threading.Lock()
        # the request path's calls, bound once
        self._run = self.backend.predict
        self._record = self.stats.record_request
        self._keep_rows = self.stats.reference is not None
        # preallocated batch buffers (no allocation, hence no page faults, on the request path)
        row_shape = tuple(d if d > 0 else 1 for d in self.backend.input.shape[1:])
        #: What of a row the statistics read: an image larger than the summaries' 64 × 64 is kept as the
        #: strided pixels they read (agent/summaries.py), so a request copies no more than that.
        self._row_view: tuple[slice, ...] | None = None
        if self._keep_rows and self.stats.kind == "image" and len(row_shape) == 3 \
                and self.backend.input.fixed_row is not None:
            stride = summary_stride(row_shape[1], row_shape[2])
            if stride > 1:
                self._row_view = (slice(None), slice(None), slice(None, None, stride), slice(None, None, stride))
                row_shape = (row_shape[0], -(-row_shape[1] // stride), -(-row_shape[2] // stride))
        n_out = self.backend.output.shape[-1] if self.backend.output.shape[-1] > 0 else max(classes, 1)
        self._row_shape, self._n_out = row_shape, n_out
        row_bytes = 4 * (int(np.prod(row_shape)) + n_out)
        #: Rows per buffer, handed to the statistics thread together.
        self.flush_rows = min(max(_FLUSH_BYTES // row_bytes, _FLUSH_ROWS), _MAX_FLUSH_ROWS)
        buffer_bytes = self.flush_rows * row_bytes
        self._max_buffers = max(_MIN_BUFFERS, min(256, _BUFFER_BUDGET // buffer_bytes))
        self._buffers = 0
        self._free: queue.SimpleQueue[_Buffer] = queue.SimpleQueue()
        self._cur: _Buffer | None = None
        self._fill = 0
        self.stats_dropped_rows = 0
        self._work: queue.SimpleQueue[tuple[_Buffer, int] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker = threading.Thread(target=self._stats_loop, name="edgeherd-stats", daemon=True)
        self._worker.start()
        self.loaded_at = datetime.now(timezone.utc)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.backend.input.shape

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs (float32 logits) for a batch shaped like the model's input.

        Raises :class:`~agent.errors.InputError` (wrong shape or dtype) or :class:`~agent.errors.InferenceError`
        (the runtime failed on this input); either is counted as a failed request.
        """
        t0 = _clock()
        try:
            with self._lock:
                out = self._run(x)
        except AgentError:
            self._record((_clock() - t0) * 1000, True)
            raise
        except Exception as exc:  # a backend outside agent.backends, or a bug in one: still a failed request
            self._record((_clock() - t0) * 1000, True)
            log.exception("the %s backend raised an unexpected error", self.backend.runtime)
            raise InferenceError(f"{self.backend.runtime} failed unexpectedly while running the model "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); see the agent's log") from exc
        self._record((_clock() - t0) * 1000)
        if self._keep_rows:
            self._buffer(x if self._row_view is None else x[self._row_view], out)
        return out

    def _buffer(self, x: np.ndarray, out: np.ndarray) -> None:
        """Copy rows into the current batch buffer; hand full buffers to the statistics thread."""
        with self._pending_lock:
            n, cur, fill = len(x), self._cur, self._fill
            if cur is not None and fill + n < self.flush_rows:  # the common case: the rows fit, the buffer stays
                cur.x[fill : fill + n] = x
                cur.out[fill : fill + n] = out
                self._fill = fill + n
                return
            i = 0
            while i < len(x):
                if self._cur is None:
                    self._cur = self._take_buffer()
                    if self._cur is None:  # the statistics thread is far behind: never block a request
                        self.stats_dropped_rows += len(x) - i
                        return
                    self._fill = 0
                take = min(len(x) - i, self.flush_rows - self._fill)
                self._cur.x[self._fill : self._fill + take] = x[i : i + take]
                self._cur.out[self._fill : self._fill + take] = out[i : i + take]
                self._fill += take
                i += take
                if self._fill == self.flush_rows:
                    self._hand_off()

    def _take_buffer(self) -> _Buffer | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._buffers >= self._max_buffers:
                return None
            self._buffers += 1
            return _Buffer(np.empty((self.flush_rows, *self._row_shape), np.float32),
                           np.empty((self.flush_rows, self._n_out), np.float32))

    def _hand_off(self) -> None:
        """With ``_pending_lock`` held: send the current buffer, as filled so far, to the statistics thread."""
        if self._cur is None or self._fill == 0:
            return
        self._pending += 1
        self._idle.clear()
        self._work.put((self._cur, self._fill))
        self._cur, self._fill = None, 0

    def _stats_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            buf, n = item
            try:
                self.stats.add_rows(buf.x[:n], buf.out[:n])
            except Exception:  # statistics must never take inference down
                log.exception("feature statistics update failed; batch skipped")
            self._free.put(buf)
            with self._pending_lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Count every buffered row now (before closing a window)."""
        with self._pending_lock:
            self._hand_off()
        self._idle.wait(timeout)

    def close_window(self, *, device_id: str, session: int, window_seq: int, start: datetime, end: datetime,
                     manifest_sha256: str) -> tuple[TelemetryWindow, FeatureStats | None]:
        self.flush()
        return self.stats.close(device_id=device_id, session=session, window_seq=window_seq, start=start, end=end,
                                manifest_sha256=manifest_sha256)

    def close(self) -> None:
        self._work.put(None)
        self._worker.join(timeout=5)
        self.backend.close()
