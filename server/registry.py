"""The registry's operations, shared by the CLI, the server process and (later) the TUI.

Devices: enrol (row + broker credentials + agent config), revoke (credentials
removed, broker reloaded, the live session kicked), list. Models: push a
signed bundle (verified against the server key, artifacts copied into the
content-addressed store), list, show. Deploy: set one device's desired state
and publish it, retained.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from agent.files import atomic_copy, atomic_write, sha256_file
from hardware.mosquitto import new_password
from protocol import (
    Command,
    CommandAck,
    CommandKind,
    DesiredState,
    InvalidMessage,
    SignedManifest,
    TopicKind,
    decode,
    device_topic,
    encode,
    load_public_key,
    manifest_digest,
    public_key_to_text,
)
from protocol._model import decode_model
from protocol.ids import is_device_id
from server import audit
from server.broker import SERVER_USER, MosquittoBroker
from server.db import database_url, make_engine, migrate
from server.db.models import ArtifactRow, AuditEntry, Device, ModelVersion, VersionArtifact
from toolchain.bundle import CARD, MANIFEST, verify_bundle
from toolchain.errors import BundleError

__all__ = ["Enrolled", "Registry", "RegistryError", "Rotation", "choose_artifact"]

log = logging.getLogger(__name__)
#: Artifact preference when a deploy does not name one (hardware profiles refine this).
#: Model cards longer than this are cut when stored (they are generated, a few KiB).
MAX_CARD = 256 * 1024
#: Actor recorded in the audit log when the caller names nobody (tests, the simulator, the demo).
SYSTEM = "system"
PREFERENCE = ["onnx-int8", "onnx-fp32", "tflite-int8", "tflite-fp32"]


def choose_artifact(signed: SignedManifest, artifact: str | None = None) -> str:
    """``artifact`` when the bundle has it, else the first by :data:`PREFERENCE`; RegistryError otherwise."""
    names = [a.name for a in signed.manifest.artifacts]
    if artifact is None:
        return next((n for pref in PREFERENCE for n in names if n.endswith(pref)), names[0])
    if artifact not in names:
        raise RegistryError(f"{signed.manifest.model}:{signed.manifest.version} has no artifact {artifact!r} "
                            f"(it has {', '.join(names)})")
    return artifact


class RegistryError(Exception):
    """An operation cannot be done; the message says why and what to do."""


@dataclass
class Enrolled:
    device: Device
    agent_config: Path


@dataclass(frozen=True)
class Rotation:
    """A finished credential rotation: the command that carried it and what the agent answered."""

    device_id: str
    command_id: str
    message: str


class Registry:
    def __init__(self, data_dir: Path, *, broker_url: str | None = None, engine: Engine | None = None) -> None:
        self.data = data_dir
        self.data.mkdir(parents=True, exist_ok=True)
        self.store = data_dir / "store"
        self.store.mkdir(exist_ok=True)
        self.engine = engine or make_engine(database_url(data_dir))
        migrate(self.engine)
        self.broker = MosquittoBroker(data_dir)
        self.broker_url = broker_url or self.broker.url

    def public_key_text(self) -> str:
        pub = self.data / "keys" / "signing.pub"
        try:
            return public_key_to_text(load_public_key(pub.read_bytes()))
        except FileNotFoundError:
            raise RegistryError(f"{pub} does not exist; create the key pair with "
                                f"`edgeherd keys generate --out {pub.parent}`") from None

    # -- devices -------------------------------------------------------------------------

    def add_device(self, device_id: str, profile: str, groups: list[str] | None = None,
                   agent_data_dir: str = "/var/lib/edgeherd", actor: str = SYSTEM) -> Enrolled:
        if not is_device_id(device_id):
            raise RegistryError(f"{device_id!r} is not a valid device name: use a-z, 0-9 and '-', at most 63")
        server_key = self.public_key_text()
        with Session(self.engine) as db:
            existing = db.get(Device, device_id)
            if existing is not None and not existing.revoked:
                raise RegistryError(f"device {device_id} already exists; revoke it first to re-enrol")
            device = existing or Device(id=device_id, profile=profile)
            device.profile, device.groups, device.revoked = profile, groups or [], False
            device.credentials_ref = "mosquitto:passwd"
            db.add(device)
            entry = audit.append(db, actor, "device.add", f"device:{device_id}",
                                 {"profile": profile, "groups": groups or []})
            db.commit()
            db.refresh(device)
            self.anchor_audit(entry)
        password = self.broker.add_device(device_id)
        out = self.data / "devices" / device_id
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(out / "broker-password", (password + "\n").encode(), 0o600)
        config = "\n".join([
            "# edgeherd agent configuration (docs/agent.md)",
            f'device_id = "{device_id}"',
            f'broker_url = "{self.broker_url}"',
            'password_file = "broker-password"',
            f'server_key = "{server_key}"',
            f'data_dir = "{agent_data_dir}"',
            f'profile = "{profile}"',
            "",
        ])
        atomic_write(out / "agent.toml", config.encode(), 0o600)
        log.info("enrolled device %s (%s)", device_id, profile)
        return Enrolled(device, out / "agent.toml")

    def add_devices_bulk(self, device_ids: list[str], profile: str, groups: list[str] | None = None,
                         actor: str = SYSTEM) -> dict[str, str]:
        """Enrol many devices at once (simulators, fleet imports); returns their broker passwords."""
        bad = [d for d in device_ids if not is_device_id(d)]
        if bad:
            raise RegistryError(f"not valid device names: {bad[:5]}")
        with Session(self.engine) as db:
            taken = set(db.exec(select(Device.id).where(col(Device.id).in_(device_ids))).all())
            if taken:
                raise RegistryError(f"{len(taken)} of these devices already exist, e.g. {sorted(taken)[:3]}")
            for d in device_ids:
                db.add(Device(id=d, profile=profile, groups=groups or [], credentials_ref="mosquitto:passwd"))
            entry = audit.append(db, actor, "device.add_bulk", f"devices:{len(device_ids)}", {
                "profile": profile, "groups": groups or [], "count": len(device_ids), "first": device_ids[:5]})
            db.commit()
            self.anchor_audit(entry)
        return self.broker.add_devices(device_ids)

    def revoke_device(self, device_id: str, actor: str = SYSTEM) -> None:
        with Session(self.engine) as db:
            device = db.get(Device, device_id)
            if device is None:
                raise RegistryError(f"no device named {device_id}")
            device.revoked = True
            db.add(device)
            entry = audit.append(db, actor, "device.revoke", f"device:{device_id}", {})
            db.commit()
            self.anchor_audit(entry)
        self.broker.revoke_device(device_id)
        self._kick(device_id)
        shutil.rmtree(self.data / "devices" / device_id, ignore_errors=True)
        log.info("revoked device %s", device_id)

    # -- credential rotation --------------------------------------------------------------------

    def rotate_credentials(self, device_id: str, actor: str = SYSTEM, timeout: float = 30.0) -> Rotation:
        """Give a connected device a new broker password over its own session, then make the broker take it.

        The password goes to the agent in a ``rotate_credentials`` command that expires after ``timeout``
        seconds. Nothing changes here until the agent acknowledges ``done`` (it has stored the password for its
        next connection); a failure, a refusal or silence raises RegistryError and the old password keeps
        working. Then the broker's password file takes the new password (the old one stops working) and the
        rotation's audit entry is committed, in one transaction. Mosquitto, reloading its password file, ends the
        connection the device made with the old password; the agent expects that and reconnects at once with
        the new one, resuming its MQTT session (docs/hardware.md).
        """
        with Session(self.engine) as db:
            device = db.get(Device, device_id)
            if device is None or device.revoked:
                raise RegistryError(f"no enrolled device named {device_id}")
        password = new_password()
        now = datetime.now(timezone.utc)
        cmd = Command(command_id=uuid.uuid4().hex, kind=CommandKind.ROTATE_CREDENTIALS, args={"password": password},
                      issued_at=now, expires_at=now + timedelta(seconds=timeout))
        ack = self._send_command(device_id, cmd, timeout)
        unchanged = "nothing changed: its current password still works"
        if ack is None:
            raise RegistryError(f"{device_id} did not confirm the new password within {timeout:.0f} s (is it online? "
                                f"see `edgeherd device list`); {unchanged}")
        if ack.status != "done":
            raise RegistryError(f"{device_id} answered {ack.status}: {ack.message or 'no reason given'}; {unchanged}")
        self._set_password(device_id, actor, {"via": "agent", "command_id": cmd.command_id},
                           f"{device_id} was revoked while its password was being rotated", password)
        log.info("rotated the broker password of %s", device_id)
        return Rotation(device_id, cmd.command_id, ack.message)

    def reissue_credentials(self, device_id: str, actor: str = SYSTEM, detail: dict[str, str] | None = None) -> str:
        """A new broker password for an enrolled device, in force at once, without asking the device (it is being
        re-flashed); its old password and any connection made with it are dropped. Returns the password."""
        password = self._set_password(device_id, actor, {"via": "reissue", **(detail or {})},
                                      f"no enrolled device named {device_id}")
        self._kick(device_id)
        log.info("issued new broker credentials to %s", device_id)
        return password

    def _set_password(self, device_id: str, actor: str, detail: dict[str, str], gone: str,
                      password: str | None = None) -> str:
        """Make the broker take ``password`` (a fresh one if None) for the device instead of its old one, with the
        ``device.rotate_credentials`` audit entry, in one transaction; keep the copy the data directory holds.
        RegistryError(``gone``) if the device is not enrolled. Returns the password."""
        with Session(self.engine) as db:
            device = db.get(Device, device_id)
            if device is None or device.revoked:
                raise RegistryError(gone)
            db.add(device)
            entry = audit.append(db, actor, "device.rotate_credentials", f"device:{device_id}", detail)
            password = self.broker.add_device(device_id, password)  # from here the broker takes only this one
            db.commit()
            self.anchor_audit(entry)
        self._store_password(device_id, password)
        return password

    def _store_password(self, device_id: str, password: str) -> None:
        """Keep ``devices/<id>/broker-password`` (the enrolment copy) current, where it exists."""
        path = self.data / "devices" / device_id / "broker-password"
        if path.exists():
            atomic_write(path, (password + "\n").encode(), 0o600)

    def _send_command(self, device_id: str, cmd: Command, timeout: float = 30.0) -> CommandAck | None:
        """Send ``cmd`` to the device and wait for its final acknowledgement (done, failed or rejected); None when
        none comes within ``timeout`` seconds."""
        acks: queue.Queue[CommandAck] = queue.Queue()
        subscribed = threading.Event()

        def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            try:
                ack = decode(CommandAck, bytes(msg.payload))
            except InvalidMessage as exc:
                log.warning("dropped an acknowledgement from %s: %s", device_id, exc)
                return
            if ack.command_id == cmd.command_id and ack.device_id == device_id:
                acks.put(ack)

        client = self.client()
        try:
            client.on_message = on_message
            client.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
            client.subscribe(device_topic(device_id, TopicKind.ACK), qos=1)
            if not subscribed.wait(10):
                raise RegistryError(f"the broker did not confirm the subscription to {device_id}'s acknowledgements")
            info = client.publish(device_topic(device_id, TopicKind.COMMAND), encode(cmd), qos=1)
            info.wait_for_publish(10)
            if not info.is_published():
                raise RegistryError(f"the broker did not acknowledge the command to {device_id}")
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    ack = acks.get(timeout=left)
                except queue.Empty:
                    break
                if ack.status != "accepted":
                    return ack
            return None
        finally:
            client.disconnect()
            client.loop_stop()

    def client(self, client_id: str | None = None) -> mqtt.Client:
        """A connected MQTT client as the server user (the caller disconnects it)."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.broker_url)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"edgeherd-cli-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(SERVER_USER, self.broker.server_password())
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: connected.set()
        unreachable = f"cannot reach the broker at {self.broker_url}; is `edgeherd server run` running?"
        try:
            client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=10)
        except OSError:
            raise RegistryError(unreachable) from None
        client.loop_start()
        if not connected.wait(10):
            client.loop_stop()
            raise RegistryError(unreachable)
        return client

    def _kick(self, device_id: str) -> None:
        """Take over the device's MQTT session (same client id), which makes the broker drop it."""
        try:
            client = self.client(client_id=device_id)
        except (RegistryError, OSError) as exc:
            log.warning("could not kick %s off the broker now: %s", device_id, exc)
            return
        client.disconnect()
        client.loop_stop()

    def devices(self) -> list[Device]:
        with Session(self.engine) as db:
            return list(db.exec(select(Device).order_by(Device.id)).all())

    # -- models ----------------------------------------------------------------------------

    def push_model(self, bundle: Path, actor: str = SYSTEM) -> ModelVersion:
        """Verify and register a signed bundle; its author is the manifest's, else whoever pushes it."""
        pub = load_public_key(self.public_key_text())
        try:
            manifest = verify_bundle(bundle, pub)
        except BundleError as exc:
            raise RegistryError(str(exc)) from None
        root = bundle if bundle.is_dir() else None
        if root is None:
            raise RegistryError("push the bundle directory (unpack the .tar first)")
        signed_bytes = (root / MANIFEST).read_bytes()
        digest = manifest_digest(manifest)
        with Session(self.engine) as db:
            same: ModelVersion | None = db.exec(select(ModelVersion).where(ModelVersion.name == manifest.model,
                                                      ModelVersion.version == manifest.version)).first()
            if same is not None:
                if same.manifest_sha256 == digest:
                    return same
                raise RegistryError(f"{manifest.model} {manifest.version} is already registered with other contents "
                                    f"(digest {same.manifest_sha256[:12]}…); give this build a new version")
            for art in manifest.artifacts:
                dest = self.store / art.sha256
                if not dest.exists():
                    atomic_copy(root / "artifacts" / art.sha256, dest)
                    if sha256_file(dest) != art.sha256:
                        dest.unlink()
                        raise RegistryError(f"artifact {art.name} changed while it was copied; push again")
                if db.get(ArtifactRow, art.sha256) is None:
                    db.add(ArtifactRow(sha256=art.sha256, size=art.size, location=str(dest)))
            card_path = root / CARD
            card = card_path.read_text(errors="replace")[:MAX_CARD] if card_path.is_file() else None
            version = ModelVersion(name=manifest.model, version=manifest.version, manifest_sha256=digest,
                                   signed_manifest=signed_bytes, author=manifest.author or actor, pushed_by=actor,
                                   lineage=manifest.lineage, card=card)
            if manifest.features is not None:  # the definitions it was built with must agree with the registry
                from server.features import FeatureRegistryError, register

                try:
                    register(db, manifest.features.definitions, actor)
                except FeatureRegistryError as exc:
                    raise RegistryError(f"{manifest.model} {manifest.version}: {exc}") from None
            db.add(version)
            db.flush()
            for art in manifest.artifacts:
                db.add(VersionArtifact(version_id=version.id, name=art.name, sha256=art.sha256,
                                       target=art.target.value, precision=art.precision.value,
                                       runtime=art.runtime.name, metrics=art.metrics))
            entry = audit.append(db, actor, "model.push", f"model:{manifest.model}:{manifest.version}", {
                "manifest_sha256": digest, "artifacts": [a.name for a in manifest.artifacts],
                "author": version.author})
            db.commit()
            self.anchor_audit(entry)
            db.refresh(version)
            return version

    def push_features(self, path: Path, actor: str = SYSTEM) -> list[tuple[str, str]]:
        """Register the feature definitions of a TOML file or directory: ``(ref, "added" | "unchanged")``
        each. Nothing is registered when one is invalid or contradicts a registered version."""
        from server.features import FeatureRegistryError, register
        from toolchain.errors import DataError
        from toolchain.features import load_definitions

        try:
            defs = load_definitions(path)
        except DataError as exc:
            raise RegistryError(str(exc)) from None
        with Session(self.engine) as db:
            try:
                result, entry = register(db, defs, actor)
                db.commit()
            except FeatureRegistryError as exc:
                raise RegistryError(str(exc)) from None
            except IntegrityError:
                raise RegistryError("another push registered one of these feature versions at the same time; "
                                    "push again to see whether it agrees") from None
            if entry is not None:
                self.anchor_audit(entry)
        return result

    def models(self) -> list[ModelVersion]:
        with Session(self.engine) as db:
            return list(db.exec(select(ModelVersion).order_by(col(ModelVersion.name), col(ModelVersion.id))).all())

    def model(self, name: str, version: str) -> tuple[ModelVersion, SignedManifest]:
        with Session(self.engine) as db:
            row = db.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
                          ).first()
        if row is None:
            raise RegistryError(f"no model {name}:{version}; see `edgeherd model list`")
        return row, decode_model(SignedManifest, row.signed_manifest)

    # -- deploy -----------------------------------------------------------------------------

    def deploy(self, name: str, version: str, device_id: str, artifact: str | None = None,
               actor: str = SYSTEM) -> DesiredState:
        _, signed = self.model(name, version)
        artifact = choose_artifact(signed, artifact)
        with Session(self.engine) as db:
            device = db.get(Device, device_id)
            if device is None or device.revoked:
                raise RegistryError(f"no enrolled device named {device_id}")
            client = self.client()  # before anything changes: no broker, no deploy
            try:
                desired = self.set_desired(db, client, device, signed, artifact)
            finally:
                client.disconnect()
                client.loop_stop()
            entry = audit.append(db, actor, "device.deploy", f"device:{device_id}", {
                "model": name, "version": version, "artifact": artifact, "generation": desired.generation})
            db.commit()
            self.anchor_audit(entry)
        return desired

    def anchor_audit(self, entry: AuditEntry) -> None:
        """Advance the audit anchor in the data directory (after the entry's commit)."""
        try:
            audit.write_anchor(self.data, entry)
        except OSError as exc:
            log.warning("could not write the audit anchor: %s", exc)

    def set_desired(self, db: Session, client: mqtt.Client, device: Device, signed: SignedManifest,
                    artifact: str, rollout: str | None = None) -> DesiredState:
        """Publish ``device``'s next desired state (retained, QoS 1) and record it in ``db``; the caller commits.

        Published first, with a generation no earlier publish can have used (see below): if the commit
        then fails, the next attempt publishes a newer one, so device and database agree again.
        """
        # Generations are unique even if a crash loses the commit below after the publish: at least the
        # clock in ms, so a re-publish after a restart carries a newer generation than the lost one, which
        # the agent would otherwise ignore as seen.
        generation = max(device.desired_generation + 1, time.time_ns() // 1_000_000)
        desired = DesiredState(device_id=device.id, generation=generation, issued_at=datetime.now(timezone.utc),
                               bundle=signed, artifact=artifact, rollout_id=rollout)
        info = client.publish(device_topic(device.id, TopicKind.DESIRED), encode(desired), qos=1, retain=True)
        info.wait_for_publish(10)
        if not info.is_published():
            raise RegistryError(f"the broker did not acknowledge the desired state of {device.id}")
        device.desired_generation = generation
        device.desired_manifest, device.desired_artifact = manifest_digest(signed.manifest), artifact
        if device.running_manifest != device.desired_manifest:
            device.install_step, device.install_error = None, None  # what it reports next is about this one
        db.add(device)
        return desired

    def signed_manifest(self, db: Session, manifest_sha256: str) -> SignedManifest | None:
        row = db.exec(select(ModelVersion).where(ModelVersion.manifest_sha256 == manifest_sha256)).first()
        return None if row is None else decode_model(SignedManifest, row.signed_manifest)

    def desired_bundle_artifacts(self, device_id: str) -> set[str]:
        """sha256 of the artifacts this device may fetch: those of the bundle it is meant to run."""
        with Session(self.engine) as db:
            device = db.get(Device, device_id)
            if device is None or device.revoked or device.desired_manifest is None:
                return set()
            version = db.exec(select(ModelVersion).where(ModelVersion.manifest_sha256 == device.desired_manifest)
                              ).first()
            if version is None:
                return set()
            rows = db.exec(select(VersionArtifact).where(VersionArtifact.version_id == version.id)).all()
            return {r.sha256 for r in rows}

