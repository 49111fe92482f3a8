"""``Predictor``: an installed model, ready to answer, with statistics captured on the side.

``predict`` runs the backend and records the request's latency (O(1)); the
inputs and outputs are copied into a batch buffer that a background thread
turns into window statistics 64 rows at a time, so the vectorised counting
stays off the request path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from agent.backends import Backend, open_backend
from agent.errors import InputError
from agent.window import WindowStats
from protocol import ArtifactEntry, FeatureStats, Manifest, Target, TelemetryWindow

__all__ = ["Predictor", "runtime_for"]

log = logging.getLogger(__name__)
_FLUSH_ROWS = 64


def runtime_for(artifact: ArtifactEntry) -> str:
    return {Target.ONNX: "onnxruntime", Target.TFLITE: "ai-edge-litert", Target.TENSORRT: "tensorrt"}[artifact.target]


class Predictor:
    """One loaded artifact. Thread-safe: concurrent ``predict`` calls are serialised on the backend."""

    def __init__(self, path: Path, manifest: Manifest, artifact: ArtifactEntry, *, threads: int = 1,
                 stats: bool = True, backend: Backend | None = None, engine_cache: Path | None = None) -> None:
        self.manifest = manifest
        self.artifact = artifact
        self.path = path
        self.backend = backend or open_backend(path, runtime_for(artifact), threads=threads,
                                               tensorrt=artifact.tensorrt, engine_cache=engine_cache)
        classes = len(manifest.labels) if manifest.labels else int(self.backend.output.shape[-1])
        self.stats = WindowStats(manifest.reference if stats else None, max(classes, 1))
        self._lock = threading.Lock()
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []
        self._nrows = 0
        self._work: queue.SimpleQueue[list[tuple[np.ndarray, np.ndarray]] | None] = queue.SimpleQueue()
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
        """Outputs (float32 logits) for a batch shaped like the model's input."""
        t0 = time.perf_counter()
        try:
            with self._lock:
                out = self.backend.predict(x)
        except InputError:
            self.stats.record_request((time.perf_counter() - t0) * 1000, error=True)
            raise
        self.stats.record_request((time.perf_counter() - t0) * 1000)
        if self.stats.reference is not None:
            self._buffer(np.array(x, dtype=np.float32, copy=True), out)
        return out

    def _buffer(self, x: np.ndarray, out: np.ndarray) -> None:
        with self._pending_lock:
            self._rows.append((x, out))
            self._nrows += len(x)
            if self._nrows < _FLUSH_ROWS:
                return
            batch, self._rows, self._nrows = self._rows, [], 0
            self._pending += 1
            self._idle.clear()
        self._work.put(batch)

    def _stats_loop(self) -> None:
        while True:
            batch = self._work.get()
            if batch is None:
                return
            try:
                self.stats.add_rows(np.concatenate([b[0] for b in batch]), np.concatenate([b[1] for b in batch]))
            except Exception:  # statistics must never take inference down
                log.exception("feature statistics update failed; batch skipped")
            with self._pending_lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Count every buffered row now (before closing a window)."""
        with self._pending_lock:
            batch, self._rows, self._nrows = self._rows, [], 0
            if batch:
                self._pending += 1
                self._idle.clear()
        if batch:
            self._work.put(batch)
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
