"""Agent releases and their rollouts: the agent itself, updated over the air in waves (docs/agent.md).

A release is a tar of a wheelhouse and its ``requirements.txt`` (every wheel pinned by sha256), as
``edgeherd flash`` builds them, held in the content store and described by a signed
:class:`protocol.AgentRelease` (:func:`push`). A rollout (:func:`start_rollout`) moves a release onto a target
(groups, tags, devices) in waves of cumulative sizes (``1,50%,100%``, :func:`server.rollouts.wave_sizes`): each
device of a wave gets the release in its desired state (``agent``), and :func:`advance` decides, from what
the devices report, per device (:func:`device_outcome`, pure):

- done: it reports the release's version as its ``agent_version``;
- failed: it reports the release as failed or rolled back (``agent_update``), or reports neither within the
  rollout's deadline.

A wave whose devices are all done starts the next; one failed device fails the rollout (state ``failed``, with
the device's reason) and no further wave is assigned. Devices keep whatever agent they run: one whose update
failed rolled itself back (agent/selfupdate.py, hardware/templates/edgeherd-launch.sh). Every step is audited.
"""

from __future__ import annotations

import logging
import re
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from hardware.files import sha256_file
from protocol import (
    AgentRelease,
    DesiredState,
    SignedKeySet,
    SignedManifest,
    encode_model,
    release_digest,
    sign_agent_release,
)
from protocol.agent_release import MAX_AGENT_ARTIFACT_BYTES
from protocol.signing import Ed25519PrivateKey
from server import audit
from server.bus import Bus
from server.db.models import AgentReleaseRow, AgentRollout, AgentRolloutDevice, Device
from server.distribution import ArtifactStore, StoreError
from server.errors import RegistryError, ServerError
from server.orchestrator import target_devices
from server.rollouts import wave_sizes
from server.signing_keys import current_statement

__all__ = ["AgentReleaseError", "Outcome", "advance", "device_outcome", "pack", "push", "start_rollout",
           "status"]

log = logging.getLogger(__name__)
_WAVE_RE = re.compile(r"^([1-9][0-9]{0,5}|([1-9][0-9]?|100)%)$")
_PYTHON_RE = re.compile(r"^3\.[0-9]{1,2}$")


class AgentReleaseError(ServerError):
    """A release cannot be pushed, or a rollout started; the message says what to fix."""


class Registry(Protocol):
    """What this module needs of :class:`server.registry.Registry`."""

    data: Path
    engine: Engine

    @property
    def artifacts(self) -> ArtifactStore: ...

    def client(self, client_id: str | None = None) -> Bus: ...

    def signed_manifest(self, db: Session, manifest_sha256: str) -> SignedManifest | None: ...

    def recorded_desired(self, db: Session, device: Device, generation: int, now: datetime,
                         keyset: SignedKeySet | None, signed: SignedManifest | None = None) -> DesiredState: ...

    def next_generation(self, device: Device) -> int: ...

    def publish_confirmed(self, bus: Bus, desired: DesiredState) -> None: ...


# -- the release ---------------------------------------------------------------------------------------------


def pack(source: Path, dest: Path) -> Path:
    """A release tar from a directory holding ``requirements.txt`` and ``wheelhouse/`` (a flash bundle)."""
    req, wheels = source / "requirements.txt", source / "wheelhouse"
    if not req.is_file() or not wheels.is_dir():
        raise AgentReleaseError(f"{source} holds no requirements.txt and wheelhouse/: give a directory as "
                                f"`edgeherd flash` writes it, or a tar of those two")
    out = dest / "agent-release.tar"
    with tarfile.open(out, "w") as tf:
        tf.add(req, "requirements.txt")
        for whl in sorted(wheels.glob("*.whl")):
            tf.add(whl, f"wheelhouse/{whl.name}")
    return out


def inspect(tar: Path) -> str:
    """The edgeherd version a release tar installs; AgentReleaseError naming what is wrong with it."""
    try:
        with tarfile.open(tar, "r:*") as tf:
            members = tf.getmembers()
            names = {m.name.removeprefix("./") for m in members if m.isreg()}
            bad = [m.name for m in members if not (m.isdir() or m.isreg())
                   or not (m.name.removeprefix("./") in ("requirements.txt", "wheelhouse", "")
                           or re.fullmatch(r"wheelhouse/[^/.][^/]*\.whl", m.name.removeprefix("./")))]
            if bad:
                raise AgentReleaseError(f"{tar} holds {bad[0]!r}: a release holds only requirements.txt and "
                                        f"wheelhouse/*.whl")
            if "requirements.txt" not in names:
                raise AgentReleaseError(f"{tar} has no requirements.txt")
            req_file = tf.extractfile("requirements.txt")
            assert req_file is not None  # noqa: S101 - a regular file
            requirements = req_file.read(1024 * 1024).decode("utf-8", "replace")
    except (OSError, tarfile.TarError) as exc:
        raise AgentReleaseError(f"{tar} is not a readable tar: {exc}") from None
    lines = [ln.strip() for ln in requirements.splitlines() if ln.strip() and not ln.startswith("#")]
    unpinned = [ln for ln in lines if "--hash=sha256:" not in ln]
    if unpinned:
        raise AgentReleaseError(f"requirements.txt pins {unpinned[0]!r} without --hash=sha256:…; every wheel "
                                f"must be pinned by hash (the device installs with --require-hashes)")
    versions = []
    for name in names:
        if name.startswith("wheelhouse/"):
            try:
                dist, version, _, _ = parse_wheel_filename(name.split("/", 1)[1])
            except InvalidWheelFilename as exc:
                raise AgentReleaseError(f"{name}: {exc}") from None
            if dist == "edgeherd":
                versions.append(str(version))
    if len(versions) != 1:
        raise AgentReleaseError(f"{tar} must hold exactly one edgeherd wheel, holds {len(versions)}")
    return versions[0]


def push(registry: Registry, source: Path, key: Ed25519PrivateKey, python: str, actor: str,
         notes: str = "") -> AgentReleaseRow:
    """Register ``source`` (a tar, or a directory :func:`pack` packs) as a signed agent release for ``python``."""
    if not _PYTHON_RE.match(python):
        raise AgentReleaseError(f"python {python!r}: give the device's major.minor, e.g. 3.11")
    with tempfile.TemporaryDirectory() as tmp:
        tar = pack(source, Path(tmp)) if source.is_dir() else source
        version = inspect(tar)
        size = tar.stat().st_size
        if size > MAX_AGENT_ARTIFACT_BYTES:
            raise AgentReleaseError(f"{tar} is {size} bytes, more than a device fetches ({MAX_AGENT_ARTIFACT_BYTES})")
        sha = sha256_file(tar)
        release = AgentRelease(version=version, python=python, sha256=sha, size=size,
                               created_at=datetime.now(timezone.utc), notes=notes[:1000])
        signed = sign_agent_release(release, key)
        with Session(registry.engine) as db:
            if db.exec(select(AgentReleaseRow).where(AgentReleaseRow.version == version)).first() is not None:
                raise AgentReleaseError(f"agent {version} is pushed already; give the build a new version")
            try:
                registry.artifacts.put(sha, tar)
            except StoreError as exc:
                raise AgentReleaseError(str(exc)) from None
            with audit.unit_of_work(db, registry.data):
                row = AgentReleaseRow(version=version, python=python, sha256=sha, size=size,
                                      digest=release_digest(release), signed=encode_model(signed), created_by=actor)
                db.add(row)
                audit.append(db, actor, "agent.push", f"agent:{version}", {"sha256": sha, "python": python})
            db.refresh(row)
    log.info("pushed agent release %s (%d bytes, Python %s)", version, size, python)
    return row


# -- the rollout ---------------------------------------------------------------------------------------------


class Outcome(str, Enum):
    WAITING = "assigned"
    DONE = "done"
    FAILED = "failed"


def device_outcome(version: str, agent_version: str | None, update: dict[str, Any] | None, assigned_at: float,
                   now: float, deadline_s: float) -> tuple[Outcome, str | None]:
    """Where one device of a wave stands with agent ``version``, and why it failed."""
    if agent_version == version:
        return Outcome.DONE, None
    if update is not None and update.get("version") == version and update.get("step") in ("failed", "rolled_back"):
        return Outcome.FAILED, f"{update['step']}: {update.get('error') or 'no reason given'}"
    if now - assigned_at > deadline_s:
        return Outcome.FAILED, f"did not report agent {version} within {deadline_s:g} s"
    return Outcome.WAITING, None


def start_rollout(registry: Registry, version: str, target: dict[str, list[str]], waves: list[str],
                  deadline_s: float, actor: str, *, name: str | None = None,
                  clock: Callable[[], float] = time.time) -> AgentRollout:
    """Start rolling ``version`` out to ``target``; its first wave is assigned at once."""
    bad = [w for w in waves if not _WAVE_RE.match(w)]
    if not waves or bad or len(waves) > 20:
        raise AgentReleaseError(f"waves {','.join(waves)}: give 1 to 20 sizes, each a device count (5) or a share "
                                f"(10%)")
    if not 0 < deadline_s <= 7 * 86400:
        raise AgentReleaseError("deadline: give seconds, more than 0 and at most a week")
    with Session(registry.engine) as db:
        release = db.exec(select(AgentReleaseRow).where(AgentReleaseRow.version == version)).first()
        if release is None:
            raise AgentReleaseError(f"no agent release {version}; see `edgeherd agent list`")
        if not target_devices(db, target):
            raise AgentReleaseError("the target names no enrolled device")
        running = db.exec(select(AgentRollout).where(AgentRollout.state == "running")).first()
        if running is not None:
            raise AgentReleaseError(f"agent rollout {running.name} is still running; one at a time")
        name = name or f"agent-{version}-{int(clock())}"
        with audit.unit_of_work(db, registry.data):
            rollout = AgentRollout(name=name, release_id=release.id, target=target, waves=waves,
                                   deadline_s=deadline_s, wave=-1, created_by=actor)
            db.add(rollout)
            audit.append(db, actor, "agent.rollout.start", f"agent-rollout:{name}",
                         {"version": version, "target": target, "waves": waves, "deadline_s": deadline_s})
        db.refresh(rollout)
    advance(registry, clock=clock)
    with Session(registry.engine) as db:
        out = db.get(AgentRollout, rollout.id)
        assert out is not None  # noqa: S101 - just made
        return out


def advance(registry: Registry, *, clock: Callable[[], float] = time.time) -> int:
    """Step every running agent rollout once; returns how many changed. The orchestrator's loop calls it."""
    changed = 0
    with Session(registry.engine) as db:
        rollouts = db.exec(select(AgentRollout).where(AgentRollout.state == "running")).all()
        for rollout in rollouts:
            release = db.get(AgentReleaseRow, rollout.release_id)
            assert release is not None  # noqa: S101 - a foreign key
            if _step(registry, db, rollout, release, clock()):
                changed += 1
    return changed


def _step(registry: Registry, db: Session, rollout: AgentRollout, release: AgentReleaseRow, now: float) -> bool:
    records = {r.device_id: r for r in db.exec(select(AgentRolloutDevice).where(
        AgentRolloutDevice.rollout_id == rollout.id)).all()}
    devices = {d.id: d for d in target_devices(db, rollout.target)}
    if rollout.wave >= 0:
        failed: list[str] = []
        waiting = False
        for rec in records.values():
            if rec.state != Outcome.WAITING.value:
                continue
            device = devices.get(rec.device_id) or db.get(Device, rec.device_id)
            outcome, reason = device_outcome(release.version, device.agent_version if device else None,
                                             device.agent_update if device else None,
                                             rollout.wave_started_at or now, now, rollout.deadline_s)
            if outcome is Outcome.WAITING:
                waiting = True
                continue
            rec.state, rec.reason = outcome.value, reason
            db.add(rec)
            if outcome is Outcome.FAILED:
                failed.append(f"{rec.device_id}: {reason}")
        if failed:
            return _finish(registry, db, rollout, "failed", "; ".join(failed)[:1000])
        if waiting:
            db.commit()
            return False
    sizes = wave_sizes(tuple(rollout.waves), len(devices))
    nxt = rollout.wave + 1
    if nxt >= len(sizes) or not devices:
        return _finish(registry, db, rollout, "done", None)
    take = [d for d in sorted(devices) if d not in records][:max(sizes[nxt] - len(records), 0)]
    with audit.unit_of_work(db, registry.data), registry.client() as bus:
        if not _claim(db, rollout, AgentRollout.wave == rollout.wave, wave=nxt):
            return False
        for device_id in take:
            _assign(registry, db, bus, devices[device_id], release.digest)
            db.add(AgentRolloutDevice(rollout_id=rollout.id, device_id=device_id, wave=nxt,
                                      state=Outcome.WAITING.value))
        rollout.wave, rollout.wave_started_at = nxt, now
        rollout.updated_at = datetime.now(timezone.utc)
        db.add(rollout)
        audit.append(db, "system", "agent.rollout.wave", f"agent-rollout:{rollout.name}",
                     {"wave": nxt, "devices": take, "version": release.version})
    log.info("agent rollout %s: wave %d assigned to %s", rollout.name, nxt, ", ".join(take))
    return True


def _assign(registry: Registry, db: Session, bus: Bus, device: Device, digest: str) -> None:
    """Publish ``device``'s desired state as recorded, with the agent release ``digest`` in it."""
    device.desired_agent = digest
    generation = registry.next_generation(device)
    desired = registry.recorded_desired(db, device, generation, datetime.now(timezone.utc), current_statement(db))
    try:
        registry.publish_confirmed(bus, desired)
    except RegistryError as exc:
        raise AgentReleaseError(str(exc)) from None
    device.desired_generation = generation
    db.add(device)


def _claim(db: Session, rollout: AgentRollout, still: Any, **values: Any) -> bool:
    """Move ``rollout`` on only if it is still as this step saw it (``still``): another replica's orchestrator, or
    ``start_rollout`` in a CLI process, may be stepping it at the same moment; the one whose update lands wins and
    the other changes nothing (no second wave, no second audit entry)."""
    moved = db.execute(update(AgentRollout).where(col(AgentRollout.id) == rollout.id, still).values(**values))
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        db.rollback()
        return False
    return True


def _finish(registry: Registry, db: Session, rollout: AgentRollout, state: str, reason: str | None) -> bool:
    with audit.unit_of_work(db, registry.data):
        if not _claim(db, rollout, AgentRollout.state == "running", state=state):
            return False
        rollout.state, rollout.reason = state, reason
        rollout.updated_at = datetime.now(timezone.utc)
        db.add(rollout)
        audit.append(db, "system", f"agent.rollout.{state}", f"agent-rollout:{rollout.name}",
                     {"wave": rollout.wave, **({"reason": reason} if reason else {})})
    log.log(logging.ERROR if state == "failed" else logging.INFO, "agent rollout %s %s%s", rollout.name, state,
            f": {reason}" if reason else "")
    return True


@dataclass(frozen=True)
class RolloutStatus:
    name: str
    version: str
    state: str
    wave: int
    waves: list[str]
    reason: str | None
    devices: list[tuple[str, int, str, str | None]]


def status(registry: Registry) -> list[RolloutStatus]:
    """Every agent rollout, newest first, with its devices (id, wave, state, reason)."""
    with Session(registry.engine) as db:
        out = []
        for r in db.exec(select(AgentRollout).order_by(col(AgentRollout.id).desc())).all():
            release = db.get(AgentReleaseRow, r.release_id)
            devs = db.exec(select(AgentRolloutDevice).where(AgentRolloutDevice.rollout_id == r.id)
                           .order_by(col(AgentRolloutDevice.wave), col(AgentRolloutDevice.device_id))).all()
            out.append(RolloutStatus(r.name, release.version if release else "?", r.state, r.wave, list(r.waves),
                                     r.reason, [(d.device_id, d.wave, d.state, d.reason) for d in devs]))
        return out
