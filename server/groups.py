"""Group releases: the model version a device group tracks, and the convergence of its members to it.

A group's release (a ``device_groups`` row) is set when a rollout that targeted the group completes
(server/orchestrator.py) or by hand (``edgeherd group release GROUP NAME:VERSION``), each with an audit entry.
A device that enrols into a group with a release, or is moved into one (``edgeherd device set``), is given the
release's version at once, with the artifact the one artifact policy (server/assignment.py) picks for its
profile and runtimes; a device that has not reported its runtimes yet gets it when its hello arrives
(:meth:`server.desired.DesiredStates.assign_waiting`). Setting a release by hand converges every member.

Precedence, when a device is in several groups with releases: the release set most recently wins (ties: the
group name that sorts first), so the last decision an operator or a rollout made about any of its groups is
what the device runs. A device that an active rollout targets (pending, running, paused or rolling back) is
left to that rollout: convergence does not touch it. Convergence runs on those events only; it is not a
reconciliation loop, so a device deployed by hand to another version keeps it until its groups change.

Errors are :class:`server.errors.RegistryError`, with a message that says what to fix.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, cast

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from protocol import DesiredState, SignedManifest, decode_model
from server import audit
from server.assignment import Outcome, choose, runtimes_of
from server.bus import Bus
from server.db.models import Device, GroupRelease, ModelVersion, Rollout
from server.errors import RegistryError


class Registry(Protocol):
    """What convergence needs of :class:`server.registry.Registry` (named so, as it is always that; a
    protocol keeps this module free of an import cycle with it)."""

    engine: Engine
    data: Path

    def client(self, client_id: str | None = None) -> Bus: ...

    def assign(self, db: Session, bus: Bus, device: Device, signed: SignedManifest, requested: str | None = None,
               rollout: str | None = None) -> DesiredState | None: ...

__all__ = ["GROUP_PATTERN", "MAX_NAMES", "Release", "check_names", "converge", "group_members", "pick",
           "record_release", "release_of", "releases", "set_device", "set_group_release"]

log = logging.getLogger(__name__)

#: Group and tag names: 1–64 of ``A–Z a–z 0–9 . _ -``, starting with a letter or digit (as enrolment takes).
GROUP_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_GROUP_RE = re.compile(GROUP_PATTERN)
#: At most this many groups, and as many tags, per device.
MAX_NAMES = 100
#: Rollout states in which the rollout owns its devices' desired states (server/rollouts.py ACTIVE).
_ROLLOUT_ACTIVE = ("pending", "running", "paused", "rolling_back")


@dataclass(frozen=True)
class Release:
    """A group's release as the CLI, the API and the TUI show it."""

    group: str
    model: str
    version: str
    manifest_sha256: str
    set_by: str
    via: str
    set_at: datetime


def check_names(kind: str, names: Iterable[str]) -> list[str]:
    """``names`` (groups or tags, said by ``kind``) checked and without repeats, in their order; RegistryError
    naming the first bad one."""
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not _GROUP_RE.match(name):
            raise RegistryError(f"{name!r} is not a valid {kind} name: use 1-64 of A-Z a-z 0-9 . _ -, starting with "
                                "a letter or digit")
        if name not in out:
            out.append(name)
    if len(out) > MAX_NAMES:
        raise RegistryError(f"a device may have at most {MAX_NAMES} {kind}s ({len(out)} given)")
    return out


def pick(candidates: Sequence[Release]) -> Release | None:
    """The release a device in all of ``candidates``' groups converges to: the one set most recently; on a tie,
    the group name that sorts first. None when there is none."""
    return min(candidates, key=lambda r: (-_utc(r.set_at).timestamp(), r.group), default=None)


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)  # SQLite hands back naive times


def releases(db: Session, groups: Iterable[str] | None = None) -> list[Release]:
    """Every group's release (or those of ``groups``), by group name."""
    query = select(GroupRelease, ModelVersion).where(GroupRelease.version_id == ModelVersion.id)
    if groups is not None:
        query = query.where(col(GroupRelease.name).in_(list(groups)))
    return [Release(g.name, v.name, v.version, v.manifest_sha256, g.set_by, g.via, _utc(g.set_at))
            for g, v in db.exec(query.order_by(col(GroupRelease.name))).all()]


def release_of(db: Session, device: Device) -> Release | None:
    """The release ``device`` converges to by its groups (:func:`pick`), or None."""
    return pick(releases(db, device.groups)) if device.groups else None


def group_members(db: Session, group: str) -> list[Device]:
    """The enrolled, unrevoked devices in ``group``, by id."""
    return sorted((d for d in db.exec(select(Device).where(Device.revoked == False))  # noqa: E712 - SQL
                   if group in d.groups), key=lambda d: d.id)


def _under_rollout(db: Session, device: Device) -> str | None:
    """The name of an active rollout that targets ``device`` (its devices, groups or tags), or None."""
    for name, target in db.exec(select(Rollout.name, Rollout.target)
                                .where(col(Rollout.state).in_(_ROLLOUT_ACTIVE))).all():
        if (device.id in target.get("devices", []) or set(device.groups).intersection(target.get("groups", []))
                or set(device.tags).intersection(target.get("tags", []))):
            return str(name)
    return None


def record_release(db: Session, group: str, version: ModelVersion, actor: str, via: str) -> None:
    """Make ``version`` ``group``'s release, with its ``group.release`` audit entry; the caller commits."""
    row = db.get(GroupRelease, group) or GroupRelease(name=group, version_id=0, set_by=actor, via=via)
    assert version.id is not None  # noqa: S101 - a stored row
    previous = row.version_id or None
    row.version_id, row.set_by, row.via, row.set_at = version.id, actor, via[:80], datetime.now(timezone.utc)
    db.add(row)
    audit.append(db, actor, "group.release", f"group:{group}", {
        "model": version.name, "version": version.version, "manifest_sha256": version.manifest_sha256,
        "via": via, "previous_version_id": previous})
    log.info("group %s now tracks %s:%s (%s, by %s)", group, version.name, version.version, via, actor)


def set_group_release(registry: Registry, group: str, model: str, version: str, actor: str,
                      via: str = "hand") -> list[str]:
    """Make NAME:VERSION ``group``'s release (audited) and converge its members; the ids of the devices given
    it. RegistryError for a bad group name or an unknown version, with nothing changed."""
    check_names("group", [group])
    with Session(registry.engine) as db, audit.unit_of_work(db, registry.data):
        row = db.exec(select(ModelVersion).where(ModelVersion.name == model, ModelVersion.version == version)).first()
        if row is None:
            raise RegistryError(f"no model {model}:{version}; see `edgeherd model list`")
        record_release(db, group, row, actor, via)
    with Session(registry.engine) as db:
        members = [d.id for d in group_members(db, group)]
    return converge(registry, members, actor)


def set_device(registry: Registry, device_id: str, *, groups: list[str] | None = None,
               tags: list[str] | None = None, actor: str) -> tuple[Device, list[str]]:
    """Replace ``device_id``'s groups and/or tags (None: unchanged), audited as ``device.set``, then converge it
    to its groups' release; the device and the ids given a release (itself or nothing)."""
    new_groups = None if groups is None else check_names("group", groups)
    new_tags = None if tags is None else check_names("tag", tags)
    if new_groups is None and new_tags is None:
        raise RegistryError("nothing to change: give --group and/or --tag")
    with Session(registry.engine) as db, audit.unit_of_work(db, registry.data):
        device = db.get(Device, device_id)
        if device is None or device.revoked:
            raise RegistryError(f"no enrolled device named {device_id}; see `edgeherd device list`")
        detail: dict[str, list[str]] = {}
        if new_groups is not None:
            detail |= {"groups_before": list(device.groups), "groups": new_groups}
            device.groups = new_groups
        if new_tags is not None:
            detail |= {"tags_before": list(device.tags), "tags": new_tags}
            device.tags = new_tags
        db.add(device)
        audit.append(db, actor, "device.set", f"device:{device_id}", dict(detail))
    given = converge(registry, [device_id], actor)
    with Session(registry.engine) as db:
        stored = db.get(Device, device_id)
    assert stored is not None  # noqa: S101 - just written
    return stored, given


def converge(registry: Registry, device_ids: Sequence[str], actor: str) -> list[str]:
    """Give each of ``device_ids`` its groups' release (:func:`release_of`) where it desires something else and
    no active rollout targets it, audited as ``group.converge``; the ids given one. A device the release does not
    suit (no artifact it can load) gets it recorded with the install failed and the reason, as a rollout would.
    RegistryError when the broker cannot be reached (nothing is changed then)."""
    given: list[str] = []
    bus: Bus | None = None
    manifests: dict[str, SignedManifest] = {}
    try:
        for device_id in device_ids:
            with Session(registry.engine) as db, audit.unit_of_work(db, registry.data):
                device = db.get(Device, device_id)
                if device is None or device.revoked:
                    continue
                release = release_of(db, device)
                if release is None or device.desired_manifest == release.manifest_sha256:
                    continue
                rollout = _under_rollout(db, device)
                if rollout is not None:
                    log.info("%s is left to rollout %s, not converged to group %s's %s:%s", device_id, rollout,
                             release.group, release.model, release.version)
                    continue
                if release.manifest_sha256 not in manifests:
                    row = db.exec(select(ModelVersion).where(
                        ModelVersion.manifest_sha256 == release.manifest_sha256)).one()
                    manifests[release.manifest_sha256] = decode_model(SignedManifest, row.signed_manifest)
                signed = manifests[release.manifest_sha256]
                publishes = choose(signed.manifest, device.profile, runtimes_of(device.fingerprint)
                                   ).outcome is Outcome.CHOSEN
                if publishes and bus is None:  # only then: enrolling while the broker is down still works
                    bus = registry.client()
                # not published (waiting for its runtimes, or unsuitable): assign records it without the bus
                desired = registry.assign(db, bus if bus is not None else cast(Bus, None), device, signed)
                audit.append(db, actor, "group.converge", f"device:{device_id}", {
                    "group": release.group, "model": release.model, "version": release.version,
                    "artifact": desired.artifact if desired else None,
                    **({} if desired else {"waiting": device.install_error or "for the device's runtimes"})})
                given.append(device_id)
    finally:
        if bus is not None:
            bus.close()
    if given:
        log.info("converged %d devices to their groups' releases", len(given))
    return given
