"""The agent's recent log lines, kept in memory for ``send_logs`` commands.

:class:`LogRing` is a :class:`logging.Handler` holding the newest formatted lines, bounded both by count and by
bytes (the oldest go first), each numbered by a sequence that only grows, so a caller can ask for the lines
after the last one it saw (``since``). :meth:`LogRing.batch` picks the newest lines that fit in one
:class:`protocol.LogBatch`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from datetime import datetime, timezone

from protocol import MAX_LOG_LINES, LogBatch, LogLine
from protocol.messages import MAX_LOG_TEXT

__all__ = ["MAX_RING_BYTES", "MAX_RING_LINES", "LogRing"]

#: Lines and bytes (of text) the ring keeps at most.
MAX_RING_LINES = MAX_LOG_LINES
MAX_RING_BYTES = 256 * 1024
#: Room kept in a batch for its envelope (device id, command id, flags).
_ENVELOPE = 512
#: Encoded size of one line beyond its escaped text (seq, ts, level, logger and the JSON punctuation).
_LINE_OVERHEAD = 120


class LogRing(logging.Handler):
    """A bounded ring of this process's log lines. Thread-safe (logging calls it from any thread)."""

    def __init__(self, max_lines: int = MAX_RING_LINES, max_bytes: int = MAX_RING_BYTES) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self._lines: deque[tuple[LogLine, int]] = deque()
        self._bytes = 0
        #: Starts at the clock in microseconds, so a restarted agent numbers its lines above its last run's.
        self._seq = time.time_ns() // 1000
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)[:MAX_LOG_TEXT]
            size = len(text.encode("utf-8", "replace"))
            with self._guard:
                self._seq += 1
                line = LogLine(seq=self._seq, ts=datetime.fromtimestamp(record.created, timezone.utc),
                               level=record.levelname[:16], logger=record.name[:256], text=text)
                self._lines.append((line, size))
                self._bytes += size
                while self._lines and (len(self._lines) > self.max_lines or self._bytes > self.max_bytes):
                    self._bytes -= self._lines.popleft()[1]
        except Exception:  # a log line must never break the code that logged it
            self.handleError(record)

    @property
    def last_seq(self) -> int:
        """The number of the newest line."""
        with self._guard:
            return self._seq

    def batch(self, device_id: str, command_id: str, lines: int, since: int = 0) -> LogBatch:
        """The newest ``lines`` lines numbered above ``since``, oldest first, as many as fit in
        :attr:`LogBatch.MAX_BYTES`; ``truncated`` when some of them did not fit."""
        with self._guard:
            wanted = [line for line, _ in self._lines if line.seq > since][-lines:] if lines > 0 else []
            last = self._seq
        budget = LogBatch.MAX_BYTES - _ENVELOPE
        kept: list[LogLine] = []
        for line in reversed(wanted):
            cost = len(json.dumps(line.text)) + len(line.logger) + _LINE_OVERHEAD
            if cost > budget:
                break
            budget -= cost
            kept.append(line)
        kept.reverse()
        return LogBatch(device_id=device_id, command_id=command_id, lines=kept, truncated=len(kept) < len(wanted),
                        next_seq=max(last, since))
