"""Carry out the install state machine (:mod:`agent.install`): the steps, the record, the model being served.

Each step is idempotent: after a crash the agent re-enters the recorded step (:meth:`Installer.resume`).
The steps, in order: preflight (room and runtime), download (:mod:`agent.downloader`), verify (the whole
file's sha256), install (into the idle slot), load, smoke test (:func:`agent.smoke.smoke_test`), switch
(one atomic rename). ``on_step(step, artifact)``, when given, is called on entry to each step, and with
:data:`DOWNLOAD_MID` once half of a download is in and persisted: the points where a power cut must leave
a device that recovers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent import preflight
from agent.clock import Clock
from agent.config import AgentConfig
from agent.download import Download
from agent.downloader import Downloader
from agent.errors import AgentError, InstallFailure
from agent.events import Stopping, WorkerEvent
from agent.install import ACTIVE_STEPS, MAX_ATTEMPTS, Event, InstallRecord, Step
from agent.slots import SlotContents, Slots
from agent.smoke import smoke_test
from agent.trust import Trust
from hardware.files import atomic_write
from protocol import (
    ArtifactEntry,
    DesiredState,
    ProtocolError,
    RunningBundle,
    decode_model,
    encode_model,
    manifest_digest,
)
from protocol.signing import SignedManifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.predictor import Predictor
    from agent.session import Session

__all__ = ["DOWNLOAD_MID", "InstallHook", "Installer", "PublishState"]

log = logging.getLogger(__name__)
#: The point of ``on_step`` half-way through a download (the others are the :class:`~agent.install.Step`\\ s).
DOWNLOAD_MID = "download-mid"
#: ``on_step(step, artifact)``: a :class:`~agent.install.Step` (a ``str``) or :data:`DOWNLOAD_MID`, and the
#: name of the artifact being installed.
InstallHook = Callable[[str, str], None]
#: Loop guard: more steps than this in one run of the machine is a bug, not an install.
MAX_STEPS = 32


class PublishState(Protocol):
    def __call__(self, *, progress: int | None = None, total: int | None = None) -> None: ...


class Installer:
    """The install record and the models: the one being served (``predictor``), the one being tried
    (``candidate``). Runs on the worker thread; ``lock`` guards the switch from one model to the other."""

    def __init__(self, cfg: AgentConfig, slots: Slots, server_key: Ed25519PublicKey, session: Session, clock: Clock,
                 *, download_timeout: float, next_event: Callable[[float], WorkerEvent],
                 defer: Callable[[WorkerEvent], None], publish_state: PublishState,
                 retire: Callable[[Predictor], None], on_step: InstallHook | None = None,
                 trust: Trust | None = None) -> None:
        self.cfg = cfg
        self.data = cfg.data_dir
        self.slots = slots
        self.server_key = server_key
        #: The keys bundles are verified against (agent/trust.py); only ``server_key`` when none is given.
        self.trust = trust or Trust(server_key)
        self.chunk_size = cfg.chunk_kib * 1024
        self.record_path = self.data / "install.json"
        self.record = InstallRecord.load(self.record_path)
        self.predictor: Predictor | None = None
        self.candidate: Predictor | None = None
        self.lock = threading.Lock()
        self._publish_state = publish_state
        self._retire = retire
        self._on_step = on_step
        self.downloader = Downloader(session, cfg.device_id, self.chunk_size, download_timeout, clock,
                                     next_event=next_event, defer=defer,
                                     on_progress=lambda got, size: publish_state(progress=got, total=size))

    # -- the model being served ------------------------------------------------------------

    def start(self) -> bool:
        """Load the active slot's model; whether an install was under way (to be resumed)."""
        active = self.slots.active()
        if active is not None:
            contents = self.slots.read(active)
            if contents is not None:
                try:
                    self.predictor = self.load(contents)
                except AgentError as exc:
                    log.error("the active slot %s does not load: %s", active, exc)
        return self.record.step in ACTIVE_STEPS

    def close(self) -> None:
        with self.lock:
            for p in (self.predictor, self.candidate):
                if p is not None:
                    p.close()
            self.predictor = self.candidate = None

    def running(self) -> RunningBundle | None:
        pred, active = self.predictor, self.slots.active()
        if pred is None or active is None:
            return None
        m = pred.manifest
        return RunningBundle(model=m.model, version=m.version, manifest_sha256=pred.manifest_sha256,
                             artifact=pred.artifact.name, slot=active)  # type: ignore[arg-type]

    def load(self, contents: SlotContents) -> Predictor:
        self.trust.verify(contents.signed, installed=True)
        art = contents.manifest.artifact(contents.artifact)
        from agent.predictor import Predictor  # numpy and the runtimes load with the first model, not before

        return Predictor(contents.model_path, contents.manifest, art, threads=self.cfg.threads,
                         engine_cache=self.data / "engines")

    def promote(self, slot: str, pred: Predictor) -> None:
        """Serve ``pred`` from ``slot`` from now on; the model it replaces closes its window and is closed."""
        self.slots.switch(slot)
        with self.lock:
            old, self.predictor = self.predictor, pred
            if self.candidate is pred:
                self.candidate = None
        if old is not None:
            self._retire(old)

    # -- reconciliation --------------------------------------------------------------------

    def on_desired(self, desired: DesiredState) -> None:
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
            self.trust.verify(desired.bundle)
        except ProtocolError as exc:
            self.record = base.advance(Event.START).advance(Event.FAIL, failed_step="verify", error=str(exc))
            self._save_record()
            log.error("refused bundle %s %s: %s", m.model, m.version, exc)
            self._publish_state()
            return
        running = self.running()
        if running and running.manifest_sha256 == base.manifest_sha256 and running.artifact == desired.artifact:
            self.record = InstallRecord(step=Step.DONE, generation=desired.generation,
                                        manifest_sha256=base.manifest_sha256, model=m.model, version=m.version,
                                        artifact=desired.artifact, slot=running.slot)
            self._save_record()
            self._publish_state()
            return
        try:
            atomic_write(self._bundle_path, encode_model(desired.bundle))
        except OSError as exc:
            self.record = base.advance(Event.START).advance(Event.FAIL, failed_step="preflight",
                                                            error=f"cannot store the bundle: {exc}")
            self._save_record()
            self._publish_state()
            return
        self.record = base.advance(Event.START)
        self.run()

    def resume(self) -> None:
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
        self.run()

    # -- the machine -----------------------------------------------------------------------

    def run(self) -> None:
        """Run the steps from the recorded one until the install is done or failed."""
        steps: dict[Step, Callable[[], Event | None]] = {
            Step.PREFLIGHT: self._preflight, Step.DOWNLOAD: self._download, Step.VERIFY: self._verify,
            Step.INSTALL: self._install, Step.LOAD: self._load, Step.SMOKE_TEST: self._smoke,
            Step.SWITCH: self._switch,
        }
        guard = 0
        while self.record.step in ACTIVE_STEPS:
            guard += 1
            if guard > MAX_STEPS:
                self.record = self.record.advance(Event.FAIL, failed_step=self.record.step.value,
                                                  error="install loop guard tripped")
                break
            problem = self._save_record()  # persisted on entry to each step
            if problem is not None:  # a full disk: fail the install now rather than run a step unrecorded
                self.record = self.record.advance(Event.FAIL, failed_step=self.record.step.value, error=problem)
                break
            self._publish_state()
            step = self.record.step
            if self._on_step is not None:
                self._on_step(step, self.record.artifact)
            try:
                event = steps[step]() or Event.OK
                self.record = self.record.advance(event)
            except Stopping:
                raise
            except Exception as exc:
                log.warning("install of %s %s failed at %s: %s", self.record.model, self.record.version,
                            step.value, exc)
                self.record = self.record.advance(Event.FAIL, failed_step=step.value, error=str(exc)[:900])
        self._save_record()
        self._finish()

    def _save_record(self) -> str | None:
        """Persist the install record; what went wrong (a full disk), or None. The record in memory, and so
        what the device reports, stands either way."""
        try:
            self.record.save(self.record_path)
        except OSError as exc:
            log.error("cannot write the install record %s: %s", self.record_path, exc)
            return f"cannot write the install record: {exc}"
        return None

    def _finish(self) -> None:
        if self.record.step is Step.DONE:
            log.info("now running %s %s from slot %s", self.record.model, self.record.version, self.slots.active())
            self._download_of(self._artifact()).remove()
        elif self.candidate is not None:
            self.candidate.close()
            self.candidate = None
        self._publish_state()

    @property
    def _bundle_path(self) -> Path:
        return self.data / "pending" / "bundle.json"

    def _pending(self) -> SignedManifest:
        signed = decode_model(SignedManifest, self._bundle_path.read_bytes())
        self.trust.verify(signed, installed=True)  # the file on disk is re-checked, not trusted
        return signed

    def _artifact(self) -> ArtifactEntry:
        return self._pending().manifest.artifact(self.record.artifact)

    def _download_of(self, art: ArtifactEntry) -> Download:
        return Download(self.data / "downloads", art.sha256, art.size, self.chunk_size)

    # -- the steps -------------------------------------------------------------------------

    def _preflight(self) -> None:
        problem = preflight.check(self._artifact(), self.data)
        if problem:
            raise InstallFailure(problem)

    def _download(self) -> None:
        dl = self._download_of(self._artifact())
        hook, artifact = self._on_step, self.record.artifact
        try:
            self.downloader.fetch(dl, on_half=None if hook is None else lambda: hook(DOWNLOAD_MID, artifact))
        finally:
            dl.close()

    def _verify(self) -> Event:
        dl = self._download_of(self._artifact())
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

    def _install(self) -> None:
        signed = self._pending()
        art = signed.manifest.artifact(self.record.artifact)
        self.slots.install(self.record.slot, self.data / "downloads" / f"{art.sha256}.part", encode_model(signed),
                           art.name)

    def _load(self) -> None:
        contents = self.slots.read(self.record.slot)
        if contents is None:
            raise InstallFailure(f"slot {self.record.slot} is incomplete")
        if self.candidate is not None:
            self.candidate.close()
        self.candidate = self.load(contents)

    def _smoke(self) -> None:
        if self.candidate is None:
            self._load()
        cand = self.candidate
        assert cand is not None  # noqa: S101 - set by _load
        problem = smoke_test(cand)
        if problem:
            raise InstallFailure(problem)

    def _switch(self) -> None:
        if self.candidate is None:
            self._load()
        cand = self.candidate
        assert cand is not None  # noqa: S101 - set by _load
        self.promote(self.record.slot, cand)
