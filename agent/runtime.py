"""``Agent``: reconcile the desired state, install models safely, serve them, report.

Threads:

- the MQTT network thread (:mod:`agent.session`), which only enqueues (:mod:`agent.events`);
- the worker, which owns reconciliation, commands (:mod:`agent.commands`) and the install state machine
  (:mod:`agent.installer`), one event at a time;
- the reporter (:mod:`agent.reporter`), which closes statistics windows and drains the offline queue
  (:mod:`agent.outbox`) to the broker, deleting each report only on the server's receipt (or giving it up
  when the server refuses it), and republishes the state when the agent has been silent for ``heartbeat_s``;
- the local HTTP API (:mod:`agent.api`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from agent.clock import Clock, SystemClock
from agent.commands import Commands
from agent.config import AgentConfig
from agent.errors import ConfigError, InstallFailure
from agent.events import (
    CloseWindow,
    Confirmed,
    Connected,
    Disconnected,
    Message,
    PubAck,
    Refused,
    Resume,
    Stop,
    Stopping,
    WorkerEvent,
)
from agent.fingerprint import fingerprint, hardware_profile
from agent.install import InstallRecord, wire_step
from agent.installer import Installer, InstallHook
from agent.logring import LogRing
from agent.metrics import metrics_text
from agent.outbox import Outbox, window_key
from agent.reporter import Reporter
from agent.selfupdate import SelfUpdate
from agent.slots import Slots
from agent.smoke import smoke_test
from agent.trust import Trust
from hardware.files import atomic_write
from protocol import (
    FINAL_SEQ,
    PROTOCOL_VERSION,
    Command,
    DesiredState,
    DeviceState,
    ErrorCode,
    ErrorReply,
    Hello,
    InstallStatus,
    InvalidMessage,
    ProtocolError,
    Receipt,
    SignatureError,
    SignedKeySet,
    TopicError,
    TopicKind,
    decode,
    device_topic,
    encode,
    load_public_key,
    parse_artifact_topic,
    parse_device_topic,
)
from protocol.version import __version__
from protocol.windows import window_from_request_id

if TYPE_CHECKING:
    from agent.api import ApiServer
    from agent.predictor import Predictor
    from agent.session import Session

__all__ = ["Agent", "InstallFailure", "smoke_test"]

log = logging.getLogger(__name__)
#: Broadcast chunks waiting to be written, at most (16 × 256 KiB = 4 MiB); more are dropped and asked for again.
MAX_QUEUED_BROADCAST = 16


class Agent:
    """The device agent. ``on_step(step, artifact)`` is called on entry to each install step
    (:mod:`agent.installer`); ``clock`` is the one the install path reads."""

    def __init__(self, cfg: AgentConfig, *, download_timeout: float = 30.0, min_backoff: float = 1.0,
                 max_backoff: float = 60.0, api: bool = True, on_step: InstallHook | None = None,
                 clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.data = cfg.data_dir
        for sub in ("downloads", "pending"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        try:
            server_key = load_public_key(cfg.server_key_bytes())
        except ProtocolError as exc:
            raise ConfigError(f"server_key: {exc}") from None
        self.trust = Trust(server_key, self.data)
        self.slots = Slots(self.data)
        self.outbox = Outbox(self.data / "outbox.sqlite", cfg.queue_max_windows)
        self.chunk_size = cfg.chunk_kib * 1024
        self.broadcast_dropped = 0
        self._last_session = 0
        self._receipt_topic = device_topic(cfg.device_id, TopicKind.RECEIPT)
        self._error_topic = device_topic(cfg.device_id, TopicKind.ERROR)
        self.events: queue.Queue[WorkerEvent] = queue.Queue()
        self._deferred: deque[WorkerEvent] = deque()
        self._state_seq = 0
        #: State messages are numbered and published under this lock (the worker and the reporter's heartbeat).
        self._state_lock = threading.Lock()
        #: The session whose "connected" state went out: heartbeats wait for it, so none precedes it.
        self._announced: int | None = None
        #: When (monotonic) the agent last published something the server ingests: state, hello or a report.
        self._last_told = time.monotonic()
        self.profile = hardware_profile(cfg.profile)
        self.session = self._make_session(min_backoff, max_backoff)
        self.reporter = Reporter(cfg, self.outbox, self.session, predictor=self.predictor, told=self._told,
                                 heartbeat=self._heartbeat)
        self.installer = Installer(cfg, self.slots, server_key, self.session, clock or SystemClock(),
                                   download_timeout=download_timeout, next_event=self._next_event,
                                   defer=self._deferred.append, publish_state=self._publish_state,
                                   retire=self._retire, on_step=on_step, trust=self.trust)
        #: Agent releases (agent/selfupdate.py): install beside this agent, switch, be restarted.
        self.selfupdate = SelfUpdate(self.data, self.trust, self.installer.downloader, self.chunk_size,
                                     self._publish_state)
        #: The newest log lines of this process (``send_logs``), recorded from :meth:`start` to :meth:`stop`.
        self.log_ring = LogRing()
        #: Set by a ``restart_agent`` command: whoever runs the agent stops it and exits with
        #: :data:`agent.commands.RESTART_EXIT_STATUS`; ``on_restart`` (``edgeherd-agent run`` sets it) wakes them.
        self.restart_requested = threading.Event()
        self.on_restart: Callable[[], None] | None = None
        self.commands = Commands(cfg, self.session, self.installer,
                                 close_window=lambda: self.reporter.queue.put(CloseWindow()),
                                 publish_state=self._publish_state, ring=self.log_ring,
                                 restart=self._restart_requested)
        self.api: ApiServer | None = None
        if api and cfg.api_port:
            from agent.api import ApiServer  # the HTTP stack, only for an agent that serves the local API

            self.api = ApiServer(self, cfg.api_host, cfg.api_port, max_body=cfg.max_body_bytes)
        self._worker = threading.Thread(target=self._work_loop, name="edgeherd-worker", daemon=True)

    def _make_session(self, min_backoff: float, max_backoff: float) -> Session:
        from agent.session import Session

        def both(event: Connected | Disconnected) -> None:
            self.events.put(event)
            self.reporter.queue.put(event)

        return Session(
            self.cfg, on_message=self._received,
            on_connected=lambda s: both(Connected(s)),
            on_disconnected=lambda: both(Disconnected()),
            on_puback=lambda mid, ok: self.reporter.queue.put(PubAck(mid, ok)),
            next_session=self._next_session, min_backoff=min_backoff, max_backoff=max_backoff,
        )

    def _next_session(self) -> int:
        path = self.data / "session"
        try:
            last = int(path.read_text())
        except (OSError, ValueError):
            last = 0
        value = max(last + 1, self._last_session + 1, time.time_ns() // 1_000_000)
        self._last_session = value
        try:
            atomic_write(path, str(value).encode())
        except OSError as exc:  # a full disk must not keep the agent off the broker; the clock orders sessions
            log.error("could not record the session number in %s: %s", path, exc)
        return value

    # -- lifecycle -------------------------------------------------------------------

    def _restart_requested(self) -> None:
        self.restart_requested.set()
        if self.on_restart is not None:
            self.on_restart()

    def start(self) -> Agent:
        logging.getLogger().addHandler(self.log_ring)
        self.selfupdate.start()
        if self.installer.start():
            self.events.put(Resume())
        if self.api is not None:
            self.api.start()
        self._worker.start()
        self.reporter.start()
        self.session.start()
        return self

    def stop(self) -> None:
        self.events.put(Stop())
        self.reporter.stop()
        self._worker.join(15)
        self.reporter.join(15)
        log.info("stopping; this run (session %d) closed %d reporting windows", self.reporter.run_id,
                 self.reporter.window_seq)
        state = self._state(status="offline", reason="shutdown", seq=FINAL_SEQ)
        self.session.stop(final=(device_topic(self.cfg.device_id, TopicKind.STATE), encode(state)))
        if self.api is not None:
            self.api.stop()
        self.installer.close()
        self.outbox.close()
        logging.getLogger().removeHandler(self.log_ring)

    @property
    def record(self) -> InstallRecord:
        """The install: what, and how far it got."""
        return self.installer.record

    @property
    def reports_confirmed(self) -> int:
        """Reports the server's receipts confirmed (and the outbox forgot)."""
        return self.reporter.reports_confirmed

    def close_window_now(self, wait: float | None = None) -> None:
        """Close the current window now (``report_now``); with ``wait``, until it is queued."""
        self.reporter.close_window_now(wait)

    def _retire(self, old: Predictor) -> None:
        """A model replaced by another (a switch, a rollback): its window closes, then it does."""
        self.reporter.close_window(old)
        old.close()

    # -- ModelHost (for the HTTP API) ------------------------------------------------

    def predictor(self) -> Predictor | None:
        return self.installer.predictor

    def model_info(self) -> dict[str, Any]:
        pred = self.installer.predictor
        info: dict[str, Any] = {"device_id": self.cfg.device_id, "agent_version": __version__,
                                "install": self.installer.record.step.value}
        if pred is not None:
            info |= {"model": pred.manifest.model, "version": pred.manifest.version, "artifact": pred.artifact.name,
                     "target": pred.artifact.target.value, "precision": pred.artifact.precision.value,
                     "slot": self.slots.active(), "input_shape": list(pred.input_shape),
                     "labels": pred.manifest.labels, "manifest_sha256": pred.manifest_sha256}
        return info

    def health_info(self) -> dict[str, Any]:
        """The broker connection, for ``/v1/health``: whether the agent is on the broker, and if not, why."""
        return {"connected": self.session.connected.is_set(), "broker_error": self.session.broker_error}

    def metrics_text(self) -> str:
        return metrics_text(connected=self.session.connected.is_set(), outbox=len(self.outbox),
                            step=self.installer.record.step, pred=self.installer.predictor, slot=self.slots.active())

    # -- reporting state -----------------------------------------------------------

    def _install_status(self, progress: int | None = None, total: int | None = None) -> InstallStatus | None:
        r = self.installer.record
        step = wire_step(r.step, serving=self.installer.predictor is not None)
        if step is None or not r.manifest_sha256:
            return None
        return InstallStatus(model=r.model, version=r.version, manifest_sha256=r.manifest_sha256, step=step,
                             progress=progress, total=total,
                             error=f"{r.failed_step}: {r.error}"[:1000] if r.error else None)

    def _state(self, *, status: str = "online", reason: str = "update", seq: int | None = None,
               progress: int | None = None, total: int | None = None) -> DeviceState:
        if seq is None:
            self._state_seq += 1
            seq = self._state_seq
        return DeviceState(device_id=self.cfg.device_id, status=status, session=self.session.session_id,  # type: ignore[arg-type]
                           seq=seq, ts=datetime.now(timezone.utc), reason=reason,  # type: ignore[arg-type]
                           agent_version=__version__, running=self.installer.running(),
                           install=self._install_status(progress, total), keyset_serial=self.trust.serial,
                           agent_update=self.selfupdate.status)

    def _publish_state(self, reason: str = "update", *, progress: int | None = None,
                       total: int | None = None) -> None:
        with self._state_lock:
            seq = None
            if reason == "connected":  # a new session numbers its states from 0
                self._state_seq = seq = 0
            state = self._state(reason=reason, seq=seq, progress=progress, total=total)
            if self.session.publish(device_topic(self.cfg.device_id, TopicKind.STATE), encode(state),
                                    retain=True) is not None:
                self._told()
                if reason == "connected":
                    self._announced = state.session

    def _told(self) -> None:
        self._last_told = time.monotonic()

    def _heartbeat(self) -> None:
        """Republish the state when nothing the server ingests went out for ``heartbeat_s``: an idle agent
        (no model, so no reports) still shows the server it is there (docs/protocol.md §4)."""
        if (self.session.connected.is_set() and self._announced == self.session.session_id
                and time.monotonic() - self._last_told >= self.cfg.heartbeat_s):
            self._last_told = time.monotonic()  # tried: a failure is tried again one heartbeat later, not at once
            try:
                self._publish_state()
            except Exception:  # the reporter must outlive it (reports go out on the same thread)
                log.exception("could not republish the state")

    def _hello(self) -> None:
        hello = Hello(device_id=self.cfg.device_id, session=self.session.session_id, agent_version=__version__,
                      protocols=[PROTOCOL_VERSION], profile=self.profile,
                      fingerprint=fingerprint(self.data))
        if self.session.publish(device_topic(self.cfg.device_id, TopicKind.HELLO), encode(hello)) is not None:
            self._told()

    # -- the worker ------------------------------------------------------------------

    def _next_event(self, timeout: float | None = None) -> WorkerEvent:
        ev = self.events.get(timeout=timeout)
        match ev:
            case Stop():
                self.events.put(ev)  # stays visible to every loop that waits
                raise Stopping
            case Connected():
                self._publish_state(reason="connected")
                self._hello()
                self.selfupdate.healthy()  # a new agent on trial: on the broker, its state out
                self.commands.flush()
        return ev

    def _work_loop(self) -> None:
        try:
            while True:
                ev = self._deferred.popleft() if self._deferred else self._next_event()
                try:
                    self._handle(ev)
                except Stopping:
                    raise
                except Exception:
                    log.exception("error handling %s", type(ev).__name__)
        except Stopping:
            return

    def _handle(self, ev: WorkerEvent) -> None:
        match ev:
            case Resume():
                self.installer.resume()
            case Message(topic=topic, payload=payload):
                self._on_message(topic, payload)

    def _received(self, topic: str, payload: bytes) -> None:
        """From the network thread. Broadcast chunks beyond a small backlog are dropped (the download asks
        again for what it lacks), so a wave's traffic cannot fill a slow device's memory."""
        if parse_artifact_topic(topic) is not None and self.events.qsize() >= MAX_QUEUED_BROADCAST:
            self.broadcast_dropped += 1
            return
        if topic == self._receipt_topic:
            try:
                receipt = decode(Receipt, payload)
            except InvalidMessage as exc:
                log.warning("dropped a receipt: %s", exc)
                return
            if receipt.device_id == self.cfg.device_id:
                self.reporter.queue.put(Confirmed([window_key("telemetry", *k) for k in receipt.telemetry]
                                                  + [window_key("stats", *k) for k in receipt.stats]))
            return
        if topic == self._error_topic and self._refused(payload):
            return
        self.events.put(Message(topic, payload))

    def _refused(self, payload: bytes) -> bool:
        """A ``bad_time`` reply: the server refused a message for its times (this device's clock is off). It is
        handled here, never by a download waiting for chunk answers: a window it names is given up by the
        reporter. Whether ``payload`` was such a reply."""
        try:
            err = decode(ErrorReply, payload)
        except InvalidMessage:
            return False
        if err.code is not ErrorCode.BAD_TIME:
            return False
        window = window_from_request_id(err.request_id) if err.request_id else None
        if window is None:
            log.warning("the server refused a message for its times: %s", err.message)
        else:
            self.reporter.queue.put(Refused(window_key(*window), err.message))
        return True

    def _apply_keyset(self, statement: SignedKeySet) -> None:
        """Take a key-set statement (agent/trust.py) and report the serial now held, so the server records the
        confirmation; a refused one (forged, replayed) is logged and changes nothing."""
        try:
            taken = self.trust.accept(statement)
        except SignatureError as exc:
            log.warning("refused a key-set statement: %s", exc)
            return
        if taken:
            self._publish_state()

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            device, kind = parse_device_topic(topic)
        except TopicError:
            return
        if device != self.cfg.device_id:
            return
        try:
            if kind is TopicKind.DESIRED:
                desired = decode(DesiredState, payload)
                if desired.keyset is not None and desired.device_id == self.cfg.device_id:
                    self._apply_keyset(desired.keyset)
                if desired.agent is not None and desired.device_id == self.cfg.device_id:
                    self.selfupdate.on_release(desired.agent)
                    if self.selfupdate.restart_wanted:
                        return  # the new agent takes the rest of this desired state from the retained message
                self.installer.on_desired(desired)
            elif kind is TopicKind.COMMAND:
                self.commands.handle(decode(Command, payload))
        except InvalidMessage as exc:
            log.warning("dropped a %s message: %s", kind.value, exc)
