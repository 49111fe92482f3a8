"""The reporter thread: close statistics windows and send the outbox (:mod:`agent.outbox`) to the broker.

A window closes on a timer (``window_seconds``), when it holds ``window_samples`` requests, on
``report_now``, and when the model serving it is replaced. Its reports go into the outbox (or, while the
outbox cannot be written, a full disk, wait in memory: at most :data:`MAX_UNSTORED`) and are sent from
there; each stays until the server's receipt names it, or until the server refuses it.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from agent.config import AgentConfig
from agent.events import (
    CloseWindow,
    Confirmed,
    Connected,
    Disconnected,
    Drain,
    PubAck,
    Refused,
    ReporterEvent,
    Stop,
    Tick,
)
from agent.outbox import Outbox, window_key
from protocol import TopicKind, device_topic, encode

if TYPE_CHECKING:
    from agent.predictor import Predictor
    from agent.session import Session

__all__ = ["MAX_UNSTORED", "Reporter"]

log = logging.getLogger(__name__)
#: Reports kept in memory while the outbox cannot be written (a full disk).
MAX_UNSTORED = 1000
#: Reports published and not yet acknowledged by the broker, at most.
MAX_SENDING = 20


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Reporter:
    """``predictor`` is the model being served (None: nothing to report); ``told`` hears of every report
    that went out and ``heartbeat`` is called once a turn (the agent's state, when it has been silent)."""

    def __init__(self, cfg: AgentConfig, outbox: Outbox, session: Session, *,
                 predictor: Callable[[], Predictor | None], told: Callable[[], None],
                 heartbeat: Callable[[], None]) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.session = session
        self._predictor = predictor
        self._told = told
        self._heartbeat = heartbeat
        self.queue: queue.Queue[ReporterEvent] = queue.Queue()
        #: Reports the server's receipts confirmed (and the outbox forgot).
        self.reports_confirmed = 0
        #: Reports not yet in the outbox (it could not be written: a full disk), oldest first.
        self.unstored: deque[tuple[str, bytes, str]] = deque()
        self._unstored_dropped = 0
        self._store_failing = False
        self._store_lock = threading.Lock()
        self._window_lock = threading.Lock()
        self.run_id = time.time_ns() // 1_000_000
        self.window_seq = 0
        self._window_start = _now()
        self._telemetry_topic = device_topic(cfg.device_id, TopicKind.TELEMETRY)
        self._stats_topic = device_topic(cfg.device_id, TopicKind.STATS)
        self._thread = threading.Thread(target=self._run, name="edgeherd-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to return (after the turn it is in)."""
        self.queue.put(Stop())

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # -- windows ---------------------------------------------------------------------------

    def close_window(self, pred: Predictor) -> None:
        """Close the current window (the reporter on its timer, the worker on a switch or rollback): one at a
        time, so no two windows share a number."""
        with self._window_lock:
            self._close_window_locked(pred)

    def _close_window_locked(self, pred: Predictor) -> None:
        end = _now()
        telemetry, stats = pred.close_window(device_id=self.cfg.device_id, session=self.run_id,
                                             window_seq=self.window_seq, start=self._window_start, end=end,
                                             manifest_sha256=pred.manifest_sha256)
        try:
            dropped = self.outbox.take_dropped()
        except sqlite3.Error:  # a full disk: the count stays in the outbox for a later window
            dropped = 0
        with self._store_lock:
            dropped, self._unstored_dropped = dropped + self._unstored_dropped, 0
        if dropped:
            telemetry = telemetry.model_copy(update={"dropped_windows": dropped})
        self.window_seq += 1
        self._window_start = end
        with self._store_lock:
            self.unstored.append((self._telemetry_topic, encode(telemetry),
                                  window_key("telemetry", telemetry.session, telemetry.window_seq)))
            if stats is not None:
                self.unstored.append((self._stats_topic, encode(stats),
                                      window_key("stats", stats.session, stats.window_seq)))
        self._store_unstored()
        self.queue.put(Drain())

    def close_window_now(self, wait: float | None = None) -> None:
        """Close the current window now (``report_now``); with ``wait``, until it is queued."""
        done = threading.Event()
        self.queue.put(CloseWindow(done))
        if wait is not None:
            done.wait(wait)

    def _store_unstored(self) -> None:
        """Move reports kept in memory into the outbox. When it cannot be written (a full disk), they wait
        in memory (at most MAX_UNSTORED; beyond that the oldest are dropped and counted) and are retried on
        the reporter's next turn."""
        with self._store_lock:
            self._store_unstored_locked()

    def _store_unstored_locked(self) -> None:
        while self.unstored:
            topic, payload, key = self.unstored[0]
            try:
                self.outbox.put(topic, payload, key)
            except (sqlite3.Error, OSError) as exc:
                if not self._store_failing:
                    log.error("cannot store reports in the outbox (%s); keeping them in memory until it can", exc)
                self._store_failing = True
                while len(self.unstored) > MAX_UNSTORED:
                    self.unstored.popleft()
                    self._unstored_dropped += 1
                return
            self.unstored.popleft()
            if self._store_failing:
                log.info("the outbox can be written again")
                self._store_failing = False

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        sent: dict[int, int] = {}  # mqtt mid -> outbox id, published and not yet PUBACKed
        while True:
            ev: ReporterEvent
            try:
                ev = self.queue.get(timeout=1.0)
            except queue.Empty:
                ev = Tick()
            pred = self._predictor()
            match ev:
                case Stop():
                    return
                case CloseWindow(done=done):
                    if pred is not None:
                        self.close_window(pred)
                    if done is not None:
                        done.set()
                case Tick() if pred is not None:
                    age = (_now() - self._window_start) / timedelta(seconds=1)
                    if age >= self.cfg.window_seconds or pred.stats.requests >= self.cfg.window_samples:
                        self.close_window(pred)
            try:
                self._step(ev, sent)
            except sqlite3.Error as exc:  # a full disk: the outbox's state stays as it was; retried next turn
                if not self._store_failing:
                    log.error("cannot update the outbox (%s); retrying", exc)
                self._store_failing = True
            else:
                if self._store_failing and not self.unstored:
                    log.info("the outbox can be written again")
                    self._store_failing = False
            self._heartbeat()

    def _step(self, ev: ReporterEvent, sent: dict[int, int]) -> None:
        match ev:
            case PubAck(mid=acked, ok=ok):
                msg_id = sent.pop(acked, None)
                if msg_id is not None:
                    self.outbox.sent(msg_id, accepted=bool(ok))
            case Confirmed(keys=keys):
                self.reports_confirmed += self.outbox.confirm(keys)
            case Refused(key=key, reason=reason):
                if self.outbox.give_up(key):
                    log.warning("gave up %s: the server refused it: %s", key, reason)
            case Connected():
                sent.clear()
                self.outbox.resend_all()  # what the broker took before may have died with it
            case Disconnected():
                sent.clear()
        if self.unstored:
            self._store_unstored()
        if self.session.connected.is_set() and len(sent) < MAX_SENDING:
            resend_before = time.time() - self.cfg.receipt_timeout_s
            for item in self.outbox.pending(MAX_SENDING - len(sent), set(sent.values()), resend_before):
                mid = self.session.publish(item.topic, item.payload)
                if mid is None:
                    break
                sent[mid] = item.id
                self._told()
