"""Rotating the bundle-signing key: key-set statements, each device's confirmation, the switch.

Devices trust the key they were provisioned with (``server_key``) and then the newest key-set statement
(protocol/keyset.py) they accepted. A rotation runs in two steps:

1. :func:`start_rotation` (``edgeherd keys rotate``): a new key is made (``keys/next.key``), and a statement
   naming the current key ``active`` and the new one ``next``, signed by the current key, goes out in every
   enrolled device's retained desired state. A device that takes it reports its serial in its state
   (``keyset_serial``), which :mod:`server.ingest` records; an offline device finds it when it reconnects.
2. :func:`finish_rotation` (``edgeherd keys rotate --finish``): once every enrolled, non-revoked device
   confirmed (or with ``force``, naming those left behind), every stored manifest is re-signed with the new
   key (their digests do not change, so devices can still reinstall them), the new key becomes
   ``signing.key``/``signing.pub``, and a statement naming it ``active`` and the old one ``retired`` goes out,
   signed by the old key, which every device still trusts, so a device left behind catches up too. Bundles
   signed by the retired key are refused from then on, by the registry and by the agents.

Every step is audited (``keys.rotate``, ``keys.finish``). The newest statement is kept in the database
(``keyset_statements``) and sent with every desired state (server/desired.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from hardware.files import atomic_write
from protocol import (
    DesiredState,
    KeyEntry,
    KeySet,
    SignedKeySet,
    SignedManifest,
    decode_model,
    encode_model,
    generate_signing_key,
    key_id,
    load_private_key,
    private_key_to_pem,
    public_key_to_text,
    sign_keyset,
    sign_manifest,
)
from protocol.errors import KeyFormatError
from protocol.keyset import MAX_KEYS
from protocol.signing import Ed25519PrivateKey
from server import audit
from server.bus import Bus, BusError
from server.db.models import Device, KeyStatement, ModelVersion
from server.errors import ServerError
from server.keypair import PRIVATE, write_key_pair

__all__ = ["NEXT_PRIVATE", "KeyRotationError", "KeyStatus", "current_statement", "finish_rotation",
           "key_status", "publish_keyset", "start_rotation"]

log = logging.getLogger(__name__)

#: The next key's private half, beside ``signing.key``, while a rotation is under way.
NEXT_PRIVATE = "next.key"


class Registry(Protocol):
    """What a rotation needs of :class:`server.registry.Registry` (named so, without importing it: the registry
    imports this module through server/desired.py)."""

    data: Path
    engine: Engine

    def client(self, client_id: str | None = None) -> Bus: ...

    def signed_manifest(self, db: Session, manifest_sha256: str) -> SignedManifest | None: ...

    def recorded_desired(self, db: Session, device: Device, generation: int, now: datetime,
                         keyset: SignedKeySet | None, signed: SignedManifest | None = None) -> DesiredState: ...


class KeyRotationError(ServerError):
    """A rotation cannot start or finish now; the message says why and what to do."""


@dataclass(frozen=True)
class KeyStatus:
    """Where the signing key stands: the newest statement and which devices hold it."""

    serial: int
    phase: str
    active: str
    next: str | None
    confirmed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)


def _latest(db: Session) -> KeyStatement | None:
    return db.exec(select(KeyStatement).order_by(col(KeyStatement.serial).desc())).first()


def current_statement(db: Session) -> SignedKeySet | None:
    """The newest key-set statement, to send with every desired state; None before the first rotation."""
    row = _latest(db)
    return None if row is None else decode_model(SignedKeySet, row.statement)


def _private(path_dir: Registry, name: str) -> Ed25519PrivateKey:
    path = path_dir.data / "keys" / name
    try:
        return load_private_key(path.read_bytes())
    except OSError as exc:
        raise KeyRotationError(f"cannot read {path}: {exc.strerror}; create the key pair with "
                               f"`edgeherd keys generate --out {path.parent}`") from None
    except KeyFormatError as exc:
        raise KeyRotationError(f"{path}: {exc}") from None


def key_status(registry: Registry) -> KeyStatus:
    """The newest statement's serial and phase, the active and next key ids, and which enrolled devices
    confirmed it (reported holding its serial) or not yet."""
    with Session(registry.engine) as db:
        row = _latest(db)
        devices = db.exec(select(Device).where(Device.revoked == False)  # noqa: E712 - SQL comparison
                          .order_by(col(Device.id))).all()
        if row is None:
            active = key_id(_private(registry, PRIVATE).public_key())
            return KeyStatus(0, "none", active, None, [d.id for d in devices], [])
        ks = decode_model(SignedKeySet, row.statement).keyset
        nxt = next((k.public() for k in ks.keys if k.state == "next"), None)
        return KeyStatus(row.serial, row.phase, key_id(ks.active()), None if nxt is None else key_id(nxt),
                         [d.id for d in devices if d.keyset_serial >= row.serial],
                         [d.id for d in devices if d.keyset_serial < row.serial])


def _issue(db: Session, keys: list[KeyEntry], serial: int, signer: Ed25519PrivateKey, phase: str,
           actor: str) -> SignedKeySet:
    statement = sign_keyset(KeySet(serial=serial, issued_at=datetime.now(timezone.utc), keys=keys), signer)
    db.add(KeyStatement(serial=serial, statement=encode_model(statement), phase=phase, actor=actor))
    return statement


def _retired_kept(ks: KeySet | None) -> list[KeyEntry]:
    """Retired keys of the previous statement, the newest kept, so the list stays within MAX_KEYS."""
    if ks is None:
        return []
    return [k for k in ks.keys if k.state == "retired"][-(MAX_KEYS - 2):]


def start_rotation(registry: Registry, actor: str) -> KeyStatus:
    """Make the next key and publish a statement naming it ``next`` (signed by the active key)."""
    keys_dir = registry.data / "keys"
    active = _private(registry, PRIVATE)
    with Session(registry.engine) as db, audit.unit_of_work(db, registry.data):
        row = _latest(db)
        if row is not None and row.phase == "rotating":
            raise KeyRotationError(f"rotation {row.serial} is under way; see `edgeherd keys status`, then "
                                   f"`edgeherd keys rotate --finish`")
        prev = None if row is None else decode_model(SignedKeySet, row.statement).keyset
        if prev is not None and key_id(prev.active()) != key_id(active.public_key()):
            raise KeyRotationError(f"{keys_dir / PRIVATE} is not the active key of statement {prev.serial} "
                                   f"({key_id(prev.active())}); restore it before rotating")
        new = generate_signing_key()
        atomic_write(keys_dir / NEXT_PRIVATE, private_key_to_pem(new).decode("ascii"), 0o600)
        keys = [*_retired_kept(prev), KeyEntry(key=public_key_to_text(active.public_key()), state="active"),
                KeyEntry(key=public_key_to_text(new.public_key()), state="next")]
        serial = (0 if row is None else row.serial) + 1
        _issue(db, keys, serial, active, "rotating", actor)
        audit.append(db, actor, "keys.rotate", f"keyset:{serial}", {
            "active": key_id(active.public_key()), "next": key_id(new.public_key())})
    publish_keyset(registry)
    log.info("key rotation %d: next key %s published", serial, key_id(new.public_key()))
    return key_status(registry)


def finish_rotation(registry: Registry, actor: str, *, force: bool = False) -> KeyStatus:
    """Switch to the next key once every enrolled device confirmed it (``force``: also with some left behind,
    recorded by name): re-sign the stored manifests, make it ``signing.key``, retire the old one."""
    keys_dir = registry.data / "keys"
    status = key_status(registry)
    if status.phase != "rotating":
        raise KeyRotationError("no rotation is under way; start one with `edgeherd keys rotate`")
    if status.waiting and not force:
        raise KeyRotationError(f"{len(status.waiting)} device(s) have not confirmed key-set statement "
                               f"{status.serial}: {', '.join(status.waiting[:20])}; wait for them, or pass "
                               f"--force to switch without them (they catch up when they reconnect)")
    old, new = _private(registry, PRIVATE), _private(registry, NEXT_PRIVATE)
    if key_id(new.public_key()) != status.next or key_id(old.public_key()) != status.active:
        raise KeyRotationError(f"{keys_dir} does not hold the keys of statement {status.serial} "
                               f"(active {status.active}, next {status.next})")
    with Session(registry.engine) as db, audit.unit_of_work(db, registry.data):
        row = _latest(db)
        assert row is not None  # noqa: S101 - status said rotating
        prev = decode_model(SignedKeySet, row.statement).keyset
        resigned = 0
        for version in db.exec(select(ModelVersion)).all():
            signed = decode_model(SignedManifest, version.signed_manifest)
            if signed.signature.key_id != key_id(new.public_key()):
                version.signed_manifest = encode_model(sign_manifest(signed.manifest, new))
                db.add(version)
                resigned += 1
        keys = [*_retired_kept(prev), KeyEntry(key=public_key_to_text(old.public_key()), state="retired"),
                KeyEntry(key=public_key_to_text(new.public_key()), state="active")]
        row.phase = "done"
        db.add(row)
        _issue(db, keys, row.serial + 1, old, "done", actor)
        audit.append(db, actor, "keys.finish", f"keyset:{row.serial + 1}", {
            "active": key_id(new.public_key()), "retired": key_id(old.public_key()), "resigned": resigned,
            "forced": force, "left_behind": status.waiting})
    write_key_pair(keys_dir, new)
    (keys_dir / NEXT_PRIVATE).unlink(missing_ok=True)
    publish_keyset(registry)
    log.info("key rotation finished: %s active, %s retired, %d manifests re-signed", key_id(new.public_key()),
             key_id(old.public_key()), resigned)
    return key_status(registry)


def publish_keyset(registry: Registry, bus: Bus | None = None) -> int:
    """Publish every enrolled device's desired state again with the newest statement, retained; returns how
    many. The generation is the recorded one, so an agent that acted on the bundle ignores that part and only
    takes the statement; a device with no bundle desired gets the statement alone."""
    if bus is None:
        with registry.client() as own:
            return publish_keyset(registry, own)
    with Session(registry.engine) as db:
        statement = current_statement(db)
        if statement is None:
            return 0
        devices = db.exec(select(Device).where(Device.revoked == False)).all()  # noqa: E712 - SQL comparison
        now, sent = datetime.now(timezone.utc), []
        for device in devices:
            desired = registry.recorded_desired(db, device, device.desired_generation, now, statement)
            sent.append((device.id, bus.publish_desired(desired)))
    for device_id, publication in sent:
        try:
            taken = bus.confirm(publication)
        except BusError as exc:
            raise KeyRotationError(f"could not publish the key set to {device_id}: {exc}; run "
                                   f"`edgeherd keys rotate --republish` once the broker is back") from None
        if not taken:
            raise KeyRotationError(f"the broker did not acknowledge the key set for {device_id}")
    return len(sent)
