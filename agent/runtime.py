"""``Agent``: reconcile the desired state, install models safely, serve them, report.

Threads:

- the MQTT network thread (:mod:`agent.session`), which only enqueues;
- the worker, which owns reconciliation and the install state machine
  (:mod:`agent.install`), one event at a time;
- the reporter, which closes statistics windows and drains the offline
  queue (:mod:`agent.outbox`) to the broker, deleting each report only on
  the server's receipt (or giving it up when the server refuses it), and
  republishes the state when the agent has been silent for ``heartbeat_s``;
- the local HTTP API (:mod:`agent.api`).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sqlite3
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from agent import preflight
from agent.api import ApiServer
from agent.config import AgentConfig
from agent.credentials import check_certificate
from agent.download import Download, download_slot
from agent.errors import AgentError, ConfigError
from agent.files import atomic_write
from agent.fingerprint import fingerprint
from agent.install import ACTIVE_STEPS, MAX_ATTEMPTS, Event, InstallRecord, Step
from agent.outbox import Outbox, window_key
from agent.predictor import Predictor
from agent.slots import SlotContents, Slots
from agent.window import LATENCY_EDGES_MS
from protocol import (
    FINAL_SEQ,
    PROTOCOL_VERSION,
    ChunkFormatError,
    ChunkRequest,
    Command,
    CommandAck,
    CommandKind,
    DesiredState,
    DeviceState,
    ErrorCode,
    ErrorReply,
    Hello,
    InstallStatus,
    InstallStep,
    InvalidMessage,
    ProtocolError,
    Receipt,
    RunningBundle,
    TopicError,
    TopicKind,
    artifact_topic,
    decode,
    decode_chunk,
    device_topic,
    encode,
    load_public_key,
    manifest_digest,
    parse_artifact_topic,
    parse_device_topic,
    verify_manifest,
)
from protocol._model import decode_model, encode_model
from protocol.signing import SignedManifest
from protocol.version import __version__
from protocol.windows import window_from_request_id

__all__ = ["Agent", "InstallFailure", "smoke_test"]

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 2
#: Broadcast chunks waiting to be written, at most (16 × 256 KiB = 4 MiB); more are dropped and asked for again.
MAX_QUEUED_BROADCAST = 16
#: Reports kept in memory while the outbox cannot be written (a full disk).
MAX_UNSTORED = 1000


class InstallFailure(AgentError):
    """A step of an install failed; the message says why."""


class _Stopping(Exception):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Agent:
    def __init__(self, cfg: AgentConfig, *, download_timeout: float = 30.0, min_backoff: float = 1.0,
                 max_backoff: float = 60.0, api: bool = True) -> None:
        self.cfg = cfg
        self.data = cfg.data_dir
        for sub in ("downloads", "pending"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        try:
            self.server_key = load_public_key(cfg.server_key_bytes())
        except ProtocolError as exc:
            raise ConfigError(f"server_key: {exc}") from None
        self.slots = Slots(self.data)
        self.outbox = Outbox(self.data / "outbox.sqlite", cfg.queue_max_windows)
        self.record_path = self.data / "install.json"
        self.record = InstallRecord.load(self.record_path)
        self.download_timeout = download_timeout
        self.chunk_size = cfg.chunk_kib * 1024
        self.broadcast_dropped = 0
        #: Reports the server's receipts confirmed (and the outbox forgot).
        self.reports_confirmed = 0
        #: Reports not yet in the outbox (it could not be written: a full disk), oldest first.
        self._unstored: deque[tuple[str, bytes, str]] = deque()
        self._unstored_dropped = 0
        self._store_failing = False
        self._store_lock = threading.Lock()
        self._window_lock = threading.Lock()
        self._last_session = 0
        self._receipt_topic = device_topic(cfg.device_id, TopicKind.RECEIPT)
        self._error_topic = device_topic(cfg.device_id, TopicKind.ERROR)
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._deferred: deque[tuple[Any, ...]] = deque()
        self._reporter_q: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._predictor: Predictor | None = None
        self._candidate: Predictor | None = None
        self._plock = threading.Lock()
        self._state_seq = 0
        #: State messages are numbered and published under this lock (the worker and the reporter's heartbeat).
        self._state_lock = threading.Lock()
        #: The session whose "connected" state went out: heartbeats wait for it, so none precedes it.
        self._announced: int | None = None
        #: When (monotonic) the agent last published something the server ingests: state, hello or a report.
        self._last_told = time.monotonic()
        self._run_id = time.time_ns() // 1_000_000
        self._window_seq = 0
        self._window_start = _now()
        self._inflight: dict[int, int] = {}
        self._acks_seen: deque[str] = deque(maxlen=256)
        #: Command answers given while off the broker (the newest 64), sent on reconnecting.
        self._unsent_acks: deque[tuple[str, bytes]] = deque(maxlen=64)
        self._stopping = threading.Event()
        #: Fault injection for the crash tests: "STEP" or "STEP@ARTIFACT" SIGKILLs this process on entry to
        #: that install step ("download-mid": half-way through a download). Never set in production.
        kill_step, _, kill_artifact = os.environ.get("EDGEHERD_AGENT_FAULT_KILL_AT", "").partition("@")
        self._kill_at, self._kill_artifact = kill_step, kill_artifact
        self.profile = self._profile()
        self.session = self._make_session(min_backoff, max_backoff)
        self.api = ApiServer(self, cfg.api_host, cfg.api_port, max_body=cfg.max_body_bytes) if api and \
            cfg.api_port else None
        self._worker = threading.Thread(target=self._work_loop, name="edgeherd-worker", daemon=True)
        self._reporter = threading.Thread(target=self._report_loop, name="edgeherd-reporter", daemon=True)

    def _profile(self) -> str | None:
        """The configured hardware profile, or (``auto``) the one :func:`hardware.detect` finds."""
        if self.cfg.profile != "auto":
            return self.cfg.profile
        from hardware.detection import detect

        try:
            found = detect()
        except Exception:  # detection only informs; it must never keep the agent from starting
            log.exception("hardware detection failed; sending no profile")
            return None
        if found.profile is None:
            log.warning("no hardware profile fits this device (%s); sending none", found.why)
        for problem in found.problems:
            log.warning("this device differs from the %s profile: %s", found.profile, problem)
        return found.profile

    def _make_session(self, min_backoff: float, max_backoff: float) -> Any:
        from agent.session import Session

        def both(*event: Any) -> None:
            self.events.put(event)
            self._reporter_q.put(event)

        return Session(
            self.cfg, on_message=self._received,
            on_connected=lambda s: both("connected", s),
            on_disconnected=lambda: both("disconnected"),
            on_puback=lambda mid, ok: self._reporter_q.put(("puback", mid, ok)),
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

    def start(self) -> Agent:
        active = self.slots.active()
        if active is not None:
            contents = self.slots.read(active)
            if contents is not None:
                try:
                    self._predictor = self._load(contents)
                except AgentError as exc:
                    log.error("the active slot %s does not load: %s", active, exc)
        if self.record.step in ACTIVE_STEPS:
            self.events.put(("resume",))
        if self.api is not None:
            self.api.start()
        self._worker.start()
        self._reporter.start()
        self.session.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.events.put(("stop",))
        self._reporter_q.put(("stop",))
        self._worker.join(15)
        self._reporter.join(15)
        log.info("stopping; this run (session %d) closed %d reporting windows", self._run_id, self._window_seq)
        state = self._state(status="offline", reason="shutdown", seq=FINAL_SEQ)
        self.session.stop(final=(device_topic(self.cfg.device_id, TopicKind.STATE), encode(state)))
        if self.api is not None:
            self.api.stop()
        with self._plock:
            for p in (self._predictor, self._candidate):
                if p is not None:
                    p.close()
            self._predictor = self._candidate = None
        self.outbox.close()

    # -- ModelHost (for the HTTP API) ------------------------------------------------

    def predictor(self) -> Predictor | None:
        return self._predictor

    def model_info(self) -> dict[str, Any]:
        pred = self._predictor
        info: dict[str, Any] = {"device_id": self.cfg.device_id, "agent_version": __version__,
                                "install": self.record.step.value}
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
        pred = self._predictor
        lines = [
            "# HELP edgeherd_agent_connected 1 while connected to the broker.",
            "# TYPE edgeherd_agent_connected gauge",
            f"edgeherd_agent_connected {int(self.session.connected.is_set())}",
            "# HELP edgeherd_agent_outbox_messages Reports waiting to be sent.",
            "# TYPE edgeherd_agent_outbox_messages gauge",
            f"edgeherd_agent_outbox_messages {len(self.outbox)}",
            "# HELP edgeherd_agent_install_step Current step of the install state machine.",
            "# TYPE edgeherd_agent_install_step gauge",
            f'edgeherd_agent_install_step{{step="{self.record.step.value}"}} 1',
        ]
        if pred is not None:
            s = pred.stats
            m = pred.manifest
            lines += [
                "# HELP edgeherd_agent_model_info The model being served.",
                "# TYPE edgeherd_agent_model_info gauge",
                f'edgeherd_agent_model_info{{model="{m.model}",version="{m.version}",'
                f'artifact="{pred.artifact.name}",slot="{self.slots.active()}"}} 1',
                "# HELP edgeherd_agent_requests_total Inference requests served.",
                "# TYPE edgeherd_agent_requests_total counter",
                f"edgeherd_agent_requests_total {s.lifetime_requests}",
                "# HELP edgeherd_agent_request_errors_total Inference requests refused or failed.",
                "# TYPE edgeherd_agent_request_errors_total counter",
                f"edgeherd_agent_request_errors_total {s.lifetime_errors}",
                "# HELP edgeherd_agent_stats_dropped_rows_total Rows left out of statistics under overload.",
                "# TYPE edgeherd_agent_stats_dropped_rows_total counter",
                f"edgeherd_agent_stats_dropped_rows_total {pred.stats_dropped_rows}",
                "# HELP edgeherd_agent_latency_ms Inference latency in milliseconds.",
                "# TYPE edgeherd_agent_latency_ms histogram",
            ]
            cumulative = 0
            for edge, count in zip(LATENCY_EDGES_MS[1:], s.lifetime_latency_counts, strict=True):
                cumulative += count
                lines.append(f'edgeherd_agent_latency_ms_bucket{{le="{edge}"}} {cumulative}')
            lines += [f'edgeherd_agent_latency_ms_bucket{{le="+Inf"}} {cumulative}',
                      f"edgeherd_agent_latency_ms_sum {s.lifetime_latency_sum}",
                      f"edgeherd_agent_latency_ms_count {cumulative}"]
        return "\n".join(lines) + "\n"

    # -- reporting state -----------------------------------------------------------

    def _running(self) -> RunningBundle | None:
        pred, active = self._predictor, self.slots.active()
        if pred is None or active is None:
            return None
        m = pred.manifest
        return RunningBundle(model=m.model, version=m.version, manifest_sha256=pred.manifest_sha256,
                             artifact=pred.artifact.name, slot=active)  # type: ignore[arg-type]

    def _install_status(self, progress: int | None = None, total: int | None = None) -> InstallStatus | None:
        r = self.record
        if r.step is Step.IDLE or not r.manifest_sha256:
            return None
        if r.step is Step.FAILED:
            step = InstallStep.REVERTED if self._predictor is not None else InstallStep.FAILED
        else:
            step = InstallStep(r.step.value)
        return InstallStatus(model=r.model, version=r.version, manifest_sha256=r.manifest_sha256, step=step,
                             progress=progress, total=total,
                             error=f"{r.failed_step}: {r.error}"[:1000] if r.error else None)

    def _state(self, *, status: str = "online", reason: str = "update", seq: int | None = None,
               progress: int | None = None, total: int | None = None) -> DeviceState:
        if seq is None:
            self._state_seq += 1
            seq = self._state_seq
        return DeviceState(device_id=self.cfg.device_id, status=status, session=self.session.session_id,  # type: ignore[arg-type]
                           seq=seq, ts=_now(), reason=reason, agent_version=__version__,  # type: ignore[arg-type]
                           running=self._running(), install=self._install_status(progress, total))

    def _publish_state(self, reason: str = "update", **kw: Any) -> None:
        with self._state_lock:
            if reason == "connected":  # a new session numbers its states from 0
                self._state_seq = 0
                kw["seq"] = 0
            state = self._state(reason=reason, **kw)
            if self.session.publish(device_topic(self.cfg.device_id, TopicKind.STATE), encode(state),
                                    retain=True) is not None:
                self._last_told = time.monotonic()
                if reason == "connected":
                    self._announced = state.session

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
            self._last_told = time.monotonic()

    # -- the worker ------------------------------------------------------------------

    def _next_event(self, timeout: float | None = None) -> tuple[Any, ...]:
        ev = self.events.get(timeout=timeout)
        if ev[0] == "stop":
            self.events.put(ev)  # stays visible to every loop that waits
            raise _Stopping
        if ev[0] == "connected":
            self._publish_state(reason="connected")
            self._hello()
            while self._unsent_acks:  # answers to commands handled while the connection was down
                topic, payload = self._unsent_acks[0]
                if self.session.publish(topic, payload) is None:
                    break
                self._unsent_acks.popleft()
        return ev

    def _work_loop(self) -> None:
        try:
            while True:
                ev = self._deferred.popleft() if self._deferred else self._next_event()
                try:
                    self._handle(ev)
                except _Stopping:
                    raise
                except Exception:
                    log.exception("error handling %s", ev[0])
        except _Stopping:
            return

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
                self._reporter_q.put(("receipt", [window_key("telemetry", *k) for k in receipt.telemetry]
                                      + [window_key("stats", *k) for k in receipt.stats]))
            return
        if topic == self._error_topic and self._refused(payload):
            return
        self.events.put(("msg", topic, payload))

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
            self._reporter_q.put(("refused", window_key(*window), err.message))
        return True

    def _handle(self, ev: tuple[Any, ...]) -> None:
        if ev[0] == "resume":
            self._resume()
        elif ev[0] == "msg":
            self._on_message(ev[1], ev[2])

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            device, kind = parse_device_topic(topic)
        except TopicError:
            return
        if device != self.cfg.device_id:
            return
        try:
            if kind is TopicKind.DESIRED:
                self._on_desired(decode(DesiredState, payload), payload)
            elif kind is TopicKind.COMMAND:
                self._on_command(decode(Command, payload))
        except InvalidMessage as exc:
            log.warning("dropped a %s message: %s", kind.value, exc)

    # -- reconciliation ----------------------------------------------------------------

    def _on_desired(self, desired: DesiredState, payload: bytes) -> None:
        if desired.device_id != self.cfg.device_id or desired.generation <= self.record.generation:
            return
        if desired.bundle is None or desired.artifact is None:
            self.record = InstallRecord(step=self.record.step if self.record.step not in ACTIVE_STEPS else Step.IDLE,
                                        generation=desired.generation)
            self._save_record()
            return
        m = desired.bundle.manifest
        base = InstallRecord(step=Step.IDLE, generation=desired.generation, manifest_sha256=manifest_digest(m),
                             model=m.model, version=m.version, artifact=desired.artifact, slot=self.slots.idle())
        try:
            verify_manifest(desired.bundle, self.server_key)
        except ProtocolError as exc:
            self.record = base.advance(Event.START).advance(Event.FAIL, failed_step="verify", error=str(exc))
            self._save_record()
            log.error("refused bundle %s %s: %s", m.model, m.version, exc)
            self._publish_state()
            return
        running = self._running()
        if running and running.manifest_sha256 == base.manifest_sha256 and running.artifact == desired.artifact:
            self.record = InstallRecord(step=Step.DONE, generation=desired.generation,
                                        manifest_sha256=base.manifest_sha256, model=m.model, version=m.version,
                                        artifact=desired.artifact, slot=running.slot)
            self._save_record()
            self._publish_state()
            return
        try:
            atomic_write(self.data / "pending" / "bundle.json", encode_model(desired.bundle))
        except OSError as exc:
            self.record = base.advance(Event.START).advance(Event.FAIL, failed_step="preflight",
                                                            error=f"cannot store the bundle: {exc}")
            self._save_record()
            self._publish_state()
            return
        self.record = base.advance(Event.START)
        self._run_install()

    def _save_record(self) -> str | None:
        """Persist the install record; what went wrong (a full disk), or None. The record in memory, and so
        what the device reports, stands either way."""
        try:
            self.record.save(self.record_path)
        except OSError as exc:
            log.error("cannot write the install record %s: %s", self.record_path, exc)
            return f"cannot write the install record: {exc}"
        return None

    def _resume(self) -> None:
        r = self.record
        if r.step not in ACTIVE_STEPS:
            return
        if r.attempts + 1 > MAX_ATTEMPTS:
            self.record = r.advance(Event.FAIL, failed_step=r.step.value,
                                    error=f"gave up after {MAX_ATTEMPTS} interrupted attempts")
            self._save_record()
            self._finish()
            return
        self.record = InstallRecord(**{**r.__dict__, "attempts": r.attempts + 1})
        log.info("resuming the install of %s %s at step %s", r.model, r.version, r.step.value)
        self._run_install()

    def _pending(self) -> SignedManifest:
        data = (self.data / "pending" / "bundle.json").read_bytes()
        signed = decode_model(SignedManifest, data)
        verify_manifest(signed, self.server_key)  # the file on disk is re-checked, not trusted
        return signed

    def _run_install(self) -> None:
        steps = {
            Step.PREFLIGHT: self._step_preflight, Step.DOWNLOAD: self._step_download, Step.VERIFY: self._step_verify,
            Step.INSTALL: self._step_install, Step.LOAD: self._step_load, Step.SMOKE_TEST: self._step_smoke,
            Step.SWITCH: self._step_switch,
        }
        guard = 0
        while self.record.step in ACTIVE_STEPS:
            guard += 1
            if guard > 32:
                self.record = self.record.advance(Event.FAIL, failed_step=self.record.step.value,
                                                  error="install loop guard tripped")
                break
            problem = self._save_record()  # persisted on entry to each step
            if problem is not None:  # a full disk: fail the install now rather than run a step unrecorded
                self.record = self.record.advance(Event.FAIL, failed_step=self.record.step.value, error=problem)
                break
            self._publish_state()
            step = self.record.step
            if self._kill_at == step.value:
                self._fault_kill()
            try:
                event = steps[step]() or Event.OK
                self.record = self.record.advance(event)
            except _Stopping:
                raise
            except Exception as exc:
                log.warning("install of %s %s failed at %s: %s", self.record.model, self.record.version,
                            step.value, exc)
                self.record = self.record.advance(Event.FAIL, failed_step=step.value, error=str(exc)[:900])
        self._save_record()
        self._finish()

    def _fault_kill(self) -> None:
        if not self._kill_artifact or self._kill_artifact == self.record.artifact:
            log.warning("fault injection: SIGKILL at %s", self._kill_at)
            os.kill(os.getpid(), signal.SIGKILL)

    def _finish(self) -> None:
        if self.record.step is Step.DONE:
            log.info("now running %s %s from slot %s", self.record.model, self.record.version, self.slots.active())
            art = self._artifact()
            Download(self.data / "downloads", art.sha256, art.size, self.chunk_size).remove()
        elif self._candidate is not None:
            self._candidate.close()
            self._candidate = None
        self._publish_state()

    def _artifact(self) -> Any:
        return self._pending().manifest.artifact(self.record.artifact)

    # -- the steps ------------------------------------------------------------------------

    def _step_preflight(self) -> None:
        art = self._artifact()
        problem = preflight.check(art, self.data)
        if problem:
            raise InstallFailure(problem)

    def _step_download(self) -> None:
        art = self._artifact()
        dl = Download(self.data / "downloads", art.sha256, art.size, self.chunk_size)
        try:
            self._download(dl)
        finally:
            dl.close()

    def _download(self, dl: Download) -> None:
        # Listen to the artifact's broadcast topic: devices fetching the same artifact at the same time
        # (a rollout wave) share every chunk the server sends, and each asks only for what it still lacks.
        shared = artifact_topic(dl.sha256)
        self.session.listen(shared)
        self.session.wait_granted(shared, 2.0)  # so that even the first request may be answered to the wave
        try:
            self._download_loop(dl, shared)
        finally:
            self.session.unlisten(shared)

    def _download_loop(self, dl: Download, shared: str) -> None:
        inflight: dict[str, tuple[int, int, float]] = {}
        last_progress = time.monotonic()
        backoff = self.download_timeout
        reported = -1
        slot = download_slot(self.cfg.device_id)
        while not dl.complete:
            if self.session.connected.is_set():
                busy = {(o, n) for o, n, _ in inflight.values()}
                granted = self.session.granted.get(shared)
                listening_ms = int((time.monotonic() - granted) * 1000) if granted is not None else 0
                for off, length in dl.missing_ranges(busy, MAX_IN_FLIGHT - len(inflight), start=slot):
                    req = ChunkRequest(request_id=uuid.uuid4().hex, sha256=dl.sha256, offset=off, length=length,
                                       chunk_size=self.chunk_size, broadcast=granted is not None,
                                       listening_ms=min(listening_ms, 86_400_000))
                    if self.session.publish(device_topic(self.cfg.device_id, TopicKind.ARTIFACT_REQUEST),
                                            encode(req)) is not None:
                        inflight[req.request_id] = (off, length, time.monotonic())
            try:
                ev = self._next_event(timeout=0.5)
            except queue.Empty:
                ev = ("tick",)
            if ev[0] == "msg":
                if ev[1] == shared:
                    kind = TopicKind.ARTIFACT_CHUNK
                else:
                    try:
                        _, kind = parse_device_topic(ev[1])
                    except TopicError:
                        continue
                if kind is TopicKind.ARTIFACT_CHUNK:
                    try:
                        chunk = decode_chunk(ev[2])
                    except ChunkFormatError as exc:
                        log.warning("dropped a chunk: %s", exc)
                        continue
                    accepted = dl.accept(chunk)
                    for rid, (off, length, _) in list(inflight.items()):
                        first, last = off // self.chunk_size, (off + length - 1) // self.chunk_size
                        if all(i in dl.have for i in range(first, last + 1)):
                            del inflight[rid]
                        elif rid == chunk.request_id and chunk.offset // self.chunk_size == last:
                            del inflight[rid]  # answered to its end: what it still lacks was lost on the way; ask
                        elif off <= chunk.offset < off + length:  # this request is being answered
                            inflight[rid] = (off, length, time.monotonic())
                    if accepted:
                        last_progress = time.monotonic()
                        backoff = self.download_timeout
                        if self._kill_at == "download-mid" and len(dl.have) * 2 >= dl.chunks:
                            dl.persist()
                            self._fault_kill()
                        pct = dl.received * 4 // max(dl.size, 1)
                        if pct != reported:
                            reported = pct
                            self._publish_state(progress=dl.received, total=dl.size)
                elif kind is TopicKind.ERROR:
                    self._on_download_error(ev[2], inflight)
                else:
                    self._deferred.append(ev)
            elif ev[0] in ("connected", "disconnected"):
                inflight.clear()  # requests in flight are lost with the connection; ask again
            elif ev[0] != "tick":
                self._deferred.append(ev)
            now = time.monotonic()
            stale = [rid for rid, (_, _, heard) in inflight.items() if now - heard > backoff]
            if stale:  # per request (no frame of its range for that long): other ranges' frames don't count
                log.info("%d request(s) unanswered for %.0f s; asking again", len(stale), backoff)
                for rid in stale:
                    del inflight[rid]
                if now - last_progress > backoff:  # the server is silent altogether: back off
                    backoff = min(backoff * 2, 300.0)
                    last_progress = now
        dl.persist()

    def _on_download_error(self, payload: bytes, inflight: dict[str, tuple[int, int, float]]) -> None:
        try:
            err = decode(ErrorReply, payload)
        except InvalidMessage:
            return
        if err.request_id is not None and err.request_id not in inflight:
            return
        if err.code in (ErrorCode.NOT_FOUND, ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE):
            raise InstallFailure(f"the server cannot serve the artifact: {err.code.value}: {err.message}")
        time.sleep(min(err.retry_after_s or 1.0, 30.0))
        inflight.pop(err.request_id or "", None)

    def _step_verify(self) -> Event:
        art = self._artifact()
        dl = Download(self.data / "downloads", art.sha256, art.size, self.chunk_size)
        try:
            if dl.verify():
                return Event.OK
            if self.record.attempts + 1 >= MAX_ATTEMPTS:
                raise InstallFailure(f"the downloaded artifact does not match its sha256 after {MAX_ATTEMPTS} tries")
            dl.reset()
            self.record = InstallRecord(**{**self.record.__dict__, "attempts": self.record.attempts + 1})
            return Event.RETRY
        finally:
            dl.close()

    def _step_install(self) -> None:
        signed = self._pending()
        art = signed.manifest.artifact(self.record.artifact)
        self.slots.install(self.record.slot, self.data / "downloads" / f"{art.sha256}.part", encode_model(signed),
                           art.name)

    def _load(self, contents: SlotContents) -> Predictor:
        verify_manifest(contents.signed, self.server_key)
        art = contents.manifest.artifact(contents.artifact)
        return Predictor(contents.model_path, contents.manifest, art, threads=self.cfg.threads,
                         engine_cache=self.data / "engines")

    def _step_load(self) -> None:
        contents = self.slots.read(self.record.slot)
        if contents is None:
            raise InstallFailure(f"slot {self.record.slot} is incomplete")
        if self._candidate is not None:
            self._candidate.close()
        self._candidate = self._load(contents)

    def _step_smoke(self) -> None:
        if self._candidate is None:
            self._step_load()
        cand = self._candidate
        assert cand is not None  # noqa: S101 - set by _step_load
        problem = smoke_test(cand)
        if problem:
            raise InstallFailure(problem)

    def _step_switch(self) -> None:
        if self._candidate is None:
            self._step_load()
        self.slots.switch(self.record.slot)
        with self._plock:
            old, self._predictor, self._candidate = self._predictor, self._candidate, None
        if old is not None:
            self._close_window(old)
            old.close()

    # -- commands --------------------------------------------------------------------

    def _on_command(self, cmd: Command) -> None:
        def ack(status: str, message: str = "") -> None:
            reply = CommandAck(device_id=self.cfg.device_id, command_id=cmd.command_id, status=status,  # type: ignore[arg-type]
                               message=message[:1000], ts=_now())
            topic, payload = device_topic(self.cfg.device_id, TopicKind.ACK), encode(reply)
            if self.session.publish(topic, payload) is None:  # off the broker: sent when it is back
                self._unsent_acks.append((topic, payload))

        if cmd.command_id in self._acks_seen:
            ack("done", "already carried out")
            return
        self._acks_seen.append(cmd.command_id)
        if cmd.expires_at is not None and cmd.expires_at < _now():
            ack("rejected", "the command expired before it arrived")
            return
        ack("accepted")
        if cmd.kind is CommandKind.REPORT_NOW:
            self._reporter_q.put(("close_window",))
            ack("done", "window closed and queued")
        elif cmd.kind is CommandKind.SET_LOG_LEVEL:
            level = str(cmd.args.get("level", "")).upper()
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                ack("failed", "args.level must be DEBUG, INFO, WARNING or ERROR")
                return
            logging.getLogger("agent").setLevel(level)
            ack("done", f"log level is {level}")
        elif cmd.kind is CommandKind.ROLLBACK:
            ack(*self._rollback())
        elif cmd.kind is CommandKind.ROTATE_CREDENTIALS:
            if "certificate" in cmd.args:
                ack(*self._rotate_certificate(str(cmd.args["certificate"]), str(cmd.args["key"]),
                                              str(cmd.args["ca"])))
            else:
                ack(*self._rotate_credentials(str(cmd.args["password"])))
        else:
            ack("rejected", f"{cmd.kind.value} is not supported by this agent")

    def _rotate_credentials(self, password: str) -> tuple[str, str]:
        """Store the next broker password for the next connection (agent/credentials.py); expect the broker to end
        this one once it takes the new password (Mosquitto does), and then reconnect at once."""
        creds = self.session.credentials
        if not creds.rotatable:
            return "failed", ("the broker password is set inline (password or EDGEHERD_AGENT_PASSWORD); rotation "
                              "needs it in password_file")
        try:
            creds.rotate(password)
        except (OSError, AgentError) as exc:
            return "failed", f"could not store the new password: {exc}"
        self.session.reconnect_at_once()
        return "done", f"new password stored in {creds.file}; used from the next connection"

    def _rotate_certificate(self, certificate: str, key: str, ca: str) -> tuple[str, str]:
        """Check and store the next certificate, key and CA bundle for the next connection (agent/credentials.py);
        expect the server to end this connection once it has revoked the old certificate, and then reconnect at
        once."""
        certs = self.session.certificates
        if not certs.rotatable:
            return "rejected", ("this agent logs in without a certificate of its own (tls_cert and tls_key in its "
                                "config, with an mqtts:// broker_url), so it cannot take a new one")
        material = certificate.encode(), key.encode(), ca.encode()
        problem = check_certificate(*material, self.cfg.device_id)
        if problem is not None:
            log.warning("refused a new certificate from the server: %s", problem)
            return "rejected", problem
        try:
            certs.rotate(*material)
        except (OSError, AgentError) as exc:
            return "failed", f"could not store the new certificate: {exc}"
        self.session.reconnect_at_once()
        return "done", f"new certificate stored in {self.cfg.tls_cert}; used from the next connection"

    def _rollback(self) -> tuple[str, str]:
        active = self.slots.active()
        other = "b" if active == "a" else "a"
        contents = self.slots.read(other)
        if contents is None:
            return "failed", f"slot {other} holds no model to roll back to"
        try:
            cand = self._load(contents)
            problem = smoke_test(cand)
        except (AgentError, ProtocolError, KeyError) as exc:
            return "failed", f"slot {other} does not load: {exc}"
        if problem:
            cand.close()
            return "failed", problem
        self.slots.switch(other)
        with self._plock:
            old, self._predictor = self._predictor, cand
        if old is not None:
            self._close_window(old)
            old.close()
        self._publish_state()
        return "done", f"rolled back to {contents.manifest.model} {contents.manifest.version} in slot {other}"

    # -- the reporter ----------------------------------------------------------------------

    def _close_window(self, pred: Predictor) -> None:
        """Close the current window (the reporter on its timer, the worker on a switch or rollback): one at a
        time, so no two windows share a number."""
        with self._window_lock:
            self._close_window_locked(pred)

    def _close_window_locked(self, pred: Predictor) -> None:
        end = _now()
        telemetry, stats = pred.close_window(device_id=self.cfg.device_id, session=self._run_id,
                                             window_seq=self._window_seq, start=self._window_start, end=end,
                                             manifest_sha256=pred.manifest_sha256)
        try:
            dropped = self.outbox.take_dropped()
        except sqlite3.Error:  # a full disk: the count stays in the outbox for a later window
            dropped = 0
        with self._store_lock:
            dropped, self._unstored_dropped = dropped + self._unstored_dropped, 0
        if dropped:
            telemetry = telemetry.model_copy(update={"dropped_windows": dropped})
        self._window_seq += 1
        self._window_start = end
        with self._store_lock:
            self._unstored.append((device_topic(self.cfg.device_id, TopicKind.TELEMETRY), encode(telemetry),
                                   window_key("telemetry", telemetry.session, telemetry.window_seq)))
            if stats is not None:
                self._unstored.append((device_topic(self.cfg.device_id, TopicKind.STATS), encode(stats),
                                       window_key("stats", stats.session, stats.window_seq)))
        self._store_unstored()
        self._reporter_q.put(("drain",))

    def _store_unstored(self) -> None:
        """Move reports kept in memory into the outbox. When it cannot be written (a full disk), they wait
        in memory (at most MAX_UNSTORED; beyond that the oldest are dropped and counted) and are retried on
        the reporter's next turn."""
        with self._store_lock:
            self._store_unstored_locked()

    def _store_unstored_locked(self) -> None:
        while self._unstored:
            topic, payload, key = self._unstored[0]
            try:
                self.outbox.put(topic, payload, key)
            except (sqlite3.Error, OSError) as exc:
                if not self._store_failing:
                    log.error("cannot store reports in the outbox (%s); keeping them in memory until it can", exc)
                self._store_failing = True
                while len(self._unstored) > MAX_UNSTORED:
                    self._unstored.popleft()
                    self._unstored_dropped += 1
                return
            self._unstored.popleft()
            if self._store_failing:
                log.info("the outbox can be written again")
                self._store_failing = False

    def close_window_now(self, wait: float | None = None) -> None:
        """Close the current window now (``report_now``); with ``wait``, until it is queued."""
        done = threading.Event()
        self._reporter_q.put(("close_window", done))
        if wait is not None:
            done.wait(wait)

    def _report_loop(self) -> None:
        sent: dict[int, int] = {}  # mqtt mid -> outbox id, published and not yet PUBACKed
        while True:
            try:
                ev = self._reporter_q.get(timeout=1.0)
            except queue.Empty:
                ev = ("tick",)
            kind = ev[0]
            if kind == "stop":
                return
            pred = self._predictor
            if kind == "close_window":
                if pred is not None:
                    self._close_window(pred)
                if len(ev) > 1:
                    ev[1].set()
            elif kind == "tick" and pred is not None:
                age = (_now() - self._window_start) / timedelta(seconds=1)
                if age >= self.cfg.window_seconds or pred.stats.requests >= self.cfg.window_samples:
                    self._close_window(pred)
            try:
                self._report_step(kind, ev, sent)
            except sqlite3.Error as exc:  # a full disk: the outbox's state stays as it was; retried next turn
                if not self._store_failing:
                    log.error("cannot update the outbox (%s); retrying", exc)
                self._store_failing = True
            else:
                if self._store_failing and not self._unstored:
                    log.info("the outbox can be written again")
                    self._store_failing = False
            self._heartbeat()

    def _report_step(self, kind: str, ev: tuple[Any, ...], sent: dict[int, int]) -> None:
        if kind == "puback":
            msg_id = sent.pop(ev[1], None)
            if msg_id is not None:
                self.outbox.sent(msg_id, accepted=bool(ev[2]))
        elif kind == "receipt":
            self.reports_confirmed += self.outbox.confirm(ev[1])
        elif kind == "refused":
            if self.outbox.give_up(ev[1]):
                log.warning("gave up %s: the server refused it: %s", ev[1], ev[2])
        elif kind in ("connected", "disconnected"):
            sent.clear()
            if kind == "connected":
                self.outbox.resend_all()  # what the broker took before may have died with it
        if self._unstored:
            self._store_unstored()
        if self.session.connected.is_set() and len(sent) < 20:
            resend_before = time.time() - self.cfg.receipt_timeout_s
            for item in self.outbox.pending(20 - len(sent), set(sent.values()), resend_before):
                mid = self.session.publish(item.topic, item.payload)
                if mid is None:
                    break
                sent[mid] = item.id
                self._last_told = time.monotonic()


def smoke_test(pred: Predictor) -> str | None:
    """Run the manifest's golden inputs; why the model fails, or None when it passes."""
    golden, smoke = pred.manifest.golden, pred.artifact.smoke
    if golden is None or smoke is None:
        return None
    shape = [d if d > 0 else 1 for d in pred.input_shape[1:]]
    try:
        x = np.asarray(golden.inputs, dtype=np.float32).reshape(len(golden.inputs), *shape)
        out = pred.backend.predict(x)
    except (ValueError, AgentError) as exc:
        return f"smoke test could not run the golden inputs: {exc}"
    expected = np.asarray(smoke.outputs, dtype=np.float32)
    if expected.shape != out.shape:
        return f"smoke test: outputs shaped {out.shape}, the manifest expects {expected.shape}"
    bad = ~np.isfinite(out)
    if bad.any():  # NaN compares false with everything: a tolerance check alone would let it through
        rows = np.flatnonzero(bad.any(axis=1))  # outputs are (golden inputs, classes), as expected's shape says
        return (f"smoke test: the model output {int(np.isnan(out).sum())} NaN and {int(np.isinf(out).sum())} "
                f"infinite values on golden input(s) {rows[:5].tolist()}; a model that outputs non-finite "
                "values is broken (check its export and quantisation)")
    diff = float(np.abs(out - expected).max())
    if not diff <= smoke.atol:
        return f"smoke test: outputs differ from the manifest's by {diff:.4g} (tolerance {smoke.atol:.4g})"
    if golden.labels is not None:
        agreement = float((out.argmax(1) == np.asarray(golden.labels)).mean())
        if agreement + 1e-9 < smoke.min_agreement:
            return f"smoke test: top-1 agreement {agreement:.2f} is below the required {smoke.min_agreement:.2f}"
    return None

