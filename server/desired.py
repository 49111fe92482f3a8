"""Desired states: which bundle and artifact each device is meant to run, recorded and published.

The registry is the source of truth and the broker's retained messages a cache of it. :class:`DesiredStates`
holds the operations on it that :class:`server.registry.Registry` offers: assign a bundle by the artifact policy
(server/assignment.py), publish a device's next desired state, finish the assignments that waited for a
device's runtimes, and publish every recorded desired state again after a (re)connection. Every publish goes
through the :class:`server.bus.Bus` the caller passes in; the caller commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone

from sqlalchemy import and_, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from protocol import DesiredState, SignedAgentRelease, SignedKeySet, SignedManifest, decode_model, manifest_digest
from server.assignment import Outcome, choose, runtimes_of
from server.bus import Bus, BusError, Publication
from server.db.models import AgentReleaseRow, Device, ModelVersion, Rollout, RolloutDevice, VersionArtifact
from server.errors import RegistryError
from server.signing_keys import current_statement

__all__ = ["DesiredStates"]

log = logging.getLogger(__name__)


class DesiredStates:
    """Desired-state operations of the registry, on the database behind :attr:`engine`."""

    engine: Engine

    def assign(self, db: Session, bus: Bus, device: Device, signed: SignedManifest,
               requested: str | None = None, rollout: str | None = None) -> DesiredState | None:
        """Give ``device`` the bundle ``signed`` by the one artifact policy (server/assignment.py); the caller
        commits. Chosen: the desired state is published (:meth:`set_desired`). The device has not reported its
        runtimes: the bundle is recorded as desired with no artifact, nothing is published, and
        :meth:`assign_waiting` finishes the job when its hello arrives (None is returned). No artifact suits
        it: the bundle is recorded as desired and its install as failed, with the reason (None)."""
        choice = choose(signed.manifest, device.profile, runtimes_of(device.fingerprint), requested)
        if choice.outcome is Outcome.CHOSEN:
            assert choice.artifact is not None  # noqa: S101 - CHOSEN always names one
            return self.set_desired(db, bus, device, signed, choice.artifact, rollout)
        device.desired_manifest, device.desired_artifact = manifest_digest(signed.manifest), None
        if choice.outcome is Outcome.UNSUITABLE:
            device.install_step, device.install_error = "failed", f"assignment: {choice.reason}"[:1000]
            log.warning("%s cannot take %s:%s: %s", device.id, signed.manifest.model, signed.manifest.version,
                        choice.reason)
        else:
            device.install_step = device.install_error = None
            log.info("%s gets %s:%s once it reports its runtimes", device.id, signed.manifest.model,
                     signed.manifest.version)
        db.add(device)
        return None

    def assign_waiting(self, bus: Bus, device_ids: Iterable[str]) -> int:
        """Publish the desired state of those of ``device_ids`` that were waiting for their runtimes (their hello
        has just been stored); returns how many were published."""
        done = 0
        with Session(self.engine) as db:
            waiting = db.exec(select(Device).where(col(Device.id).in_(list(device_ids)),
                                                   Device.revoked == False,  # noqa: E712 - SQL comparison
                                                   col(Device.desired_manifest).is_not(None),
                                                   col(Device.desired_artifact).is_(None))).all()
            for device in waiting:
                assert device.desired_manifest is not None  # noqa: S101 - selected so
                signed = self.signed_manifest(db, device.desired_manifest)
                if signed is None:
                    continue
                # a rollout assigned it while it was waiting: its name goes with the desired state, and the
                # artifact it names (if any) is the one asked for
                rollout, requested = db.exec(select(Rollout.name, Rollout.artifact).where(
                    RolloutDevice.rollout_id == Rollout.id, RolloutDevice.device_id == device.id,
                    RolloutDevice.state == "assigned", col(Rollout.state).in_(["running", "paused"]),
                    Rollout.version_id == ModelVersion.id,
                    ModelVersion.manifest_sha256 == device.desired_manifest)).first() or (None, None)
                if self.assign(db, bus, device, signed, requested, rollout) is not None:
                    done += 1
            db.commit()
        return done

    def set_desired(self, db: Session, bus: Bus, device: Device, signed: SignedManifest,
                    artifact: str, rollout: str | None = None) -> DesiredState:
        """Publish ``device``'s next desired state (retained, QoS 1) and record it in ``db``; the caller commits.

        Published first, with a generation no earlier publish can have used (see below): if the commit
        then fails, the next attempt publishes a newer one, so device and database agree again.
        """
        # Generations are unique even if a crash loses the commit below after the publish: at least the
        # clock in ms, so a re-publish after a restart carries a newer generation than the lost one, which
        # the agent would otherwise ignore as seen.
        generation = self.next_generation(device)
        desired = DesiredState(device_id=device.id, generation=generation, issued_at=datetime.now(timezone.utc),
                               bundle=signed, artifact=artifact, rollout_id=rollout, keyset=current_statement(db),
                               agent=self.signed_agent(db, device.desired_agent))
        self.publish_confirmed(bus, desired)
        device.desired_generation = generation
        device.desired_manifest, device.desired_artifact = manifest_digest(signed.manifest), artifact
        if device.running_manifest != device.desired_manifest:
            device.install_step, device.install_error = None, None  # what it reports next is about this one
        db.add(device)
        return desired

    @staticmethod
    def next_generation(device: Device) -> int:
        """The generation of ``device``'s next desired state: above its recorded one and at least the clock in ms
        (see :meth:`set_desired`)."""
        return max(device.desired_generation + 1, time.time_ns() // 1_000_000)

    @staticmethod
    def publish_confirmed(bus: Bus, desired: DesiredState) -> None:
        """Publish ``desired`` (retained) and wait for the broker to take it; RegistryError when it does not."""
        try:
            taken = bus.confirm(bus.publish_desired(desired))
        except BusError as exc:
            raise RegistryError(f"could not publish the desired state of {desired.device_id}: {exc}") from None
        if not taken:
            raise RegistryError(f"the broker did not acknowledge the desired state of {desired.device_id}")

    def republish_desired(self, bus: Bus, *, batch: int = 500,
                          cancelled: Callable[[], bool] = lambda: False) -> int:
        """Publish again, retained (QoS 1), every enrolled device's desired state as the registry records it, with
        its recorded generation; returns how many were published.

        The registry is the source of truth and the broker's retained messages a cache of it: after a broker
        restart without its store, or a retained message deleted, a device connecting later still finds its
        desired state. The generation is the recorded one, not a new one, so an agent that has acted on it
        ignores it as seen (docs/protocol.md §5), and several replicas doing this at once are harmless. Nothing
        is published for a device without a desired state, for a revoked one, or for one whose bundle waits for
        its runtimes (:meth:`assign_waiting` publishes that). ``issued_at`` is now; ``rollout_id`` is left out.

        ``batch`` devices are read and published at a time, each batch waited for before the next is read;
        ``cancelled`` is asked between batches (a reconnection starts the whole thing again). Then devices whose
        desired state changed while this ran are published again as they are now, so a desired state set
        meanwhile (deploy, a rollout, another replica) is what stays retained. RegistryError when the broker
        does not acknowledge a message (the connection dropped: the next connection publishes them all again).
        """
        # enrolled, a bundle and an artifact recorded (not a bundle waiting for its runtimes), a generation given
        # (or an agent release recorded: a device being updated with no model desired)
        has_desired = (Device.revoked == False, col(Device.desired_generation) > 0,  # noqa: E712 - SQL
                       or_(and_(col(Device.desired_manifest).is_not(None), col(Device.desired_artifact).is_not(None)),
                           col(Device.desired_agent).is_not(None)))
        manifests: dict[str, SignedManifest | None] = {}
        published: dict[str, int] = {}  # device -> the generation published
        after = ""
        while not cancelled():
            with Session(self.engine) as db:
                rows = db.exec(select(Device).where(*has_desired, col(Device.id) > after)
                               .order_by(col(Device.id)).limit(batch)).all()
                if not rows:
                    break
                after = rows[-1].id
                published |= self._publish_recorded(db, bus, rows, manifests)
        for _ in range(3):  # those set meanwhile: what is recorded now must be what stays retained
            if cancelled():
                break
            ids, changed = sorted(published), []
            with Session(self.engine) as db:
                for i in range(0, len(ids), batch):
                    changed += [d for d in db.exec(select(Device).where(*has_desired, col(Device.id).in_(
                        ids[i:i + batch]))).all() if d.desired_generation != published[d.id]]
                if not changed:
                    break
                for i in range(0, len(changed), batch):
                    published |= self._publish_recorded(db, bus, changed[i:i + batch], manifests)
        log.info("republished the desired states of %d devices", len(published))
        return len(published)

    def _publish_recorded(self, db: Session, bus: Bus, devices: Sequence[Device],
                          manifests: dict[str, SignedManifest | None]) -> dict[str, int]:
        """Publish ``devices``' recorded desired states, retained, and wait for the broker to take them all;
        ``{device: generation}``. ``manifests`` caches signed manifests by digest across calls."""
        sent: list[tuple[Device, Publication]] = []
        now = datetime.now(timezone.utc)
        keyset = current_statement(db)  # the newest key-set statement goes with every desired state
        for device in devices:
            digest, signed = device.desired_manifest, None
            if digest is not None and device.desired_artifact is not None:
                if digest not in manifests:
                    manifests[digest] = self.signed_manifest(db, digest)
                signed = manifests[digest]
                if signed is None:
                    log.warning("%s's desired bundle %s is no longer registered; its desired state is not "
                                "republished", device.id, digest[:12])
                    continue
            desired = self.recorded_desired(db, device, device.desired_generation, now, keyset, signed)
            sent.append((device, bus.publish_desired(desired)))
        deadline = time.monotonic() + 30
        for device, publication in sent:
            try:
                taken = bus.confirm(publication, max(deadline - time.monotonic(), 0.1))
            except BusError as exc:  # not connected, or paho's queue full
                raise RegistryError(f"could not republish the desired state of {device.id}: {exc}") from None
            if not taken:
                raise RegistryError(f"the broker did not acknowledge the desired state of {device.id} within 30 s")
        return {device.id: device.desired_generation for device, _ in sent}

    def recorded_desired(self, db: Session, device: Device, generation: int, now: datetime,
                         keyset: SignedKeySet | None, signed: SignedManifest | None = None) -> DesiredState:
        """``device``'s desired state as the registry records it, under ``generation``: its bundle and artifact
        (``signed``, else looked up; left out when none is recorded or it is no longer registered), the key-set
        statement ``keyset`` and its agent release. Every publish that is not a new model assignment (a key
        rotation, an agent rollout, a republish) builds it here, so none drops a field another one set."""
        if signed is None and device.desired_manifest is not None and device.desired_artifact is not None:
            signed = self.signed_manifest(db, device.desired_manifest)
        return DesiredState(device_id=device.id, generation=generation, issued_at=now, bundle=signed,
                            artifact=device.desired_artifact if signed is not None else None, keyset=keyset,
                            agent=self.signed_agent(db, device.desired_agent))

    def signed_manifest(self, db: Session, manifest_sha256: str) -> SignedManifest | None:
        row = db.exec(select(ModelVersion).where(ModelVersion.manifest_sha256 == manifest_sha256)).first()
        return None if row is None else decode_model(SignedManifest, row.signed_manifest)

    def signed_agent(self, db: Session, digest: str | None) -> SignedAgentRelease | None:
        """The signed agent release of that digest (server/agent_releases.py); None for None or an unknown one."""
        if digest is None:
            return None
        row = db.exec(select(AgentReleaseRow).where(AgentReleaseRow.digest == digest)).first()
        return None if row is None else decode_model(SignedAgentRelease, row.signed)

    def desired_bundle_artifacts(self, device_id: str) -> set[str]:
        """sha256 of the artifacts this device may fetch: those of the bundle it is meant to run, and the tar of
        the agent release it is meant to run."""
        return self.desired_artifacts([device_id])[device_id]

    def desired_artifacts(self, device_ids: Iterable[str]) -> dict[str, set[str]]:
        """:meth:`desired_bundle_artifacts` of many devices, read in one session with one query per table
        (the server authorises a batch of chunk requests at once); every id given is a key, an unknown or
        revoked device's set is empty."""
        ids = set(device_ids)
        out: dict[str, set[str]] = {d: set() for d in ids}
        if not ids:
            return out
        with Session(self.engine) as db:
            devices = [d for d in db.exec(select(Device).where(col(Device.id).in_(ids))).all() if not d.revoked]
            manifests = {d.desired_manifest for d in devices if d.desired_manifest is not None}
            bundles: dict[str, set[str]] = {}
            if manifests:
                for manifest, sha in db.exec(
                        select(ModelVersion.manifest_sha256, VersionArtifact.sha256)
                        .join(VersionArtifact, col(VersionArtifact.version_id) == col(ModelVersion.id))
                        .where(col(ModelVersion.manifest_sha256).in_(manifests))).all():
                    bundles.setdefault(manifest, set()).add(sha)
            digests = {d.desired_agent for d in devices if d.desired_agent is not None}
            agents = {row.digest: decode_model(SignedAgentRelease, row.signed).release.sha256
                      for row in (db.exec(select(AgentReleaseRow).where(col(AgentReleaseRow.digest).in_(digests)))
                                  .all() if digests else [])}
        for d in devices:
            out[d.id] = set(bundles.get(d.desired_manifest, set()) if d.desired_manifest is not None else set())
            if d.desired_agent in agents:
                out[d.id].add(agents[d.desired_agent])
        return out
