"""The registry's operations, shared by the CLI, the server process and (later) the TUI.

Devices: enrol (row + broker credentials + agent config), revoke (credentials
removed, broker reloaded, the live session kicked), list. Models: push a
signed bundle (verified against the server key, artifacts copied into the
content-addressed store), list, show. Deploy: set one device's desired state
and publish it, retained (the desired-state operations are server/desired.py's,
every MQTT connection a :class:`server.bus.Bus`). Each audited action is one
:func:`server.audit.unit_of_work`.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from hardware.files import atomic_write
from hardware.mosquitto import new_password
from protocol import (
    AckStatus,
    Command,
    CommandAck,
    CommandKind,
    DesiredState,
    SignedManifest,
    decode_model,
    load_public_key,
    manifest_digest,
    public_key_to_text,
)
from protocol.ids import is_device_id
from server import audit
from server import groups as groups_module
from server.assignment import Outcome, choose, runtimes_of
from server.broker import SERVER_USER, DeviceCredentials, MosquittoBroker, take_over
from server.bus import Bus, BusError
from server.db import database_url, make_engine, migrate
from server.db.models import ArtifactRow, AuditEntry, Device, ModelVersion, VersionArtifact
from server.desired import DesiredStates
from server.distribution import DirectoryStore, StoreError
from server.errors import RegistryError
from server.groups import check_names
from server.pki import PkiError
from toolchain.bundle import CARD, MANIFEST, verify_bundle
from toolchain.errors import BundleError

__all__ = ["Enrolled", "Registry", "RegistryError", "Rotation", "check_artifact"]

log = logging.getLogger(__name__)
#: Model cards longer than this are cut when stored (they are generated, a few KiB).
MAX_CARD = 256 * 1024
#: Actor recorded in the audit log when the caller names nobody (tests, the simulator, the demo).
SYSTEM = "system"


def check_artifact(signed: SignedManifest, artifact: str | None) -> None:
    """RegistryError unless ``artifact`` (when given) is one of the bundle's."""
    names = [a.name for a in signed.manifest.artifacts]
    if artifact is not None and artifact not in names:
        raise RegistryError(f"{signed.manifest.model}:{signed.manifest.version} has no artifact {artifact!r} "
                            f"(it has {', '.join(names)})")


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


class Registry(DesiredStates):
    def __init__(self, data_dir: Path, *, broker_url: str | None = None, engine: Engine | None = None,
                 listen: tuple[str, int] | None = None, public_hosts: list[str] | None = None) -> None:
        self.data = data_dir
        self.data.mkdir(parents=True, exist_ok=True)
        self.store = data_dir / "store"
        self.store.mkdir(exist_ok=True)
        #: The content-addressed artifacts, written and read through one seam (server/distribution.py).
        self.artifacts = DirectoryStore(self.store)
        self.engine = engine or make_engine(database_url(data_dir))
        migrate(self.engine)
        #: ``listen`` and ``public_hosts`` are what ``server run`` was given; other commands read them back.
        self.broker = MosquittoBroker(data_dir, listen=listen, public_hosts=public_hosts)
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
                   agent_data_dir: str = "/var/lib/edgeherd", actor: str = SYSTEM, *,
                   custom_profile: bool = False) -> Enrolled:
        """Enrol ``device_id`` with hardware ``profile``: one of hardware/profiles, or any other well-formed name
        when ``custom_profile`` marks it custom (no latency budget, the general artifact order)."""
        if not is_device_id(device_id) or device_id == SERVER_USER:
            raise RegistryError(f"{device_id!r} is not a valid device name: use a-z, 0-9 and '-', at most 63"
                                + (", and not the server's own broker user" if device_id == SERVER_USER else ""))
        self._check_profile(profile, custom_profile)
        groups = check_names("group", groups or [])
        server_key = self.public_key_text()
        with Session(self.engine) as db:
            with audit.unit_of_work(db, self.data):
                existing = db.get(Device, device_id)
                if existing is not None and not existing.revoked:
                    raise RegistryError(f"device {device_id} already exists; revoke it first to re-enrol")
                device = existing or Device(id=device_id, profile=profile)
                device.profile, device.groups, device.revoked = profile, groups or [], False
                device.credentials_ref = self._credentials_ref
                db.add(device)
                audit.append(db, actor, "device.add", f"device:{device_id}",
                             {"profile": profile, "groups": groups or []}
                             | ({"custom_profile": True} if custom_profile else {}))
            db.refresh(device)
        creds = self.new_credentials([device_id])[device_id]
        out = self.data / "devices" / device_id
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._store_credentials(device_id, creds)
        config = "\n".join([
            "# edgeherd agent configuration (docs/agent.md)",
            f'device_id = "{device_id}"',
            f'broker_url = "{self.broker_url}"',
            *(['tls_ca = "ca.pem"', 'tls_cert = "device.pem"', 'tls_key = "device.key"'] if creds.certificate
              else ['password_file = "broker-password"']),
            f'server_key = "{server_key}"',
            f'data_dir = "{agent_data_dir}"',
            f'profile = "{profile}"',
            "",
        ])
        atomic_write(out / "agent.toml", config.encode(), 0o600)
        log.info("enrolled device %s (%s)", device_id, profile)
        if groups:  # into a group with a release: it gets its version (sent once its hello names its runtimes)
            self._converge_enrolled([device_id], actor)
        return Enrolled(device, out / "agent.toml")

    def add_devices_bulk(self, device_ids: list[str], profile: str, groups: list[str] | None = None,
                         actor: str = SYSTEM, *, custom_profile: bool = False) -> dict[str, DeviceCredentials]:
        """Enrol many devices at once (simulators, fleet imports), all with ``profile`` (custom when
        ``custom_profile`` says so, as for :meth:`add_device`); returns what each logs in with."""
        bad = [d for d in device_ids if not is_device_id(d) or d == SERVER_USER]
        if bad:
            raise RegistryError(f"not valid device names: {bad[:5]}")
        self._check_profile(profile, custom_profile)
        groups = check_names("group", groups or [])
        with Session(self.engine) as db, audit.unit_of_work(db, self.data):
            taken = set(db.exec(select(Device.id).where(col(Device.id).in_(device_ids))).all())
            if taken:
                raise RegistryError(f"{len(taken)} of these devices already exist, e.g. {sorted(taken)[:3]}")
            for d in device_ids:
                db.add(Device(id=d, profile=profile, groups=groups or [], credentials_ref=self._credentials_ref))
            audit.append(db, actor, "device.add_bulk", f"devices:{len(device_ids)}", {
                "profile": profile, "groups": groups or [], "count": len(device_ids), "first": device_ids[:5]}
                | ({"custom_profile": True} if custom_profile else {}))
        creds = self.new_credentials(device_ids)
        with Session(self.engine) as db:
            tracked = bool(groups) and bool(groups_module.releases(db, groups))
        if tracked:  # into a group with a release: each gets its version once its hello names its runtimes
            self._converge_enrolled(device_ids, actor)
        return creds

    def _converge_enrolled(self, device_ids: list[str], actor: str) -> None:
        """Converge just-enrolled devices to their groups' release; the enrolment stands when that fails (a
        re-enrolled device that reported its runtimes before, with the broker down), with a warning."""
        try:
            groups_module.converge(self, device_ids, actor)
        except RegistryError as exc:
            log.warning("enrolled, but not given their groups' release: %s; `edgeherd device set` them again", exc)

    def set_device(self, device_id: str, *, groups: list[str] | None = None, tags: list[str] | None = None,
                   actor: str = SYSTEM) -> Device:
        """Replace an enrolled device's groups and/or tags (None: unchanged), audited, then converge it to its
        groups' release (server/groups.py)."""
        return groups_module.set_device(self, device_id, groups=groups, tags=tags, actor=actor)[0]

    @property
    def certificates(self) -> bool:
        """Whether devices log in with certificates: the devices' listener is the managed broker's, with TLS.
        Devices of a broker the user brings (``--broker``) get passwords (docs/server.md)."""
        return self.broker.tls and self.broker_url == self.broker.url

    def new_credentials(self, device_ids: list[str]) -> dict[str, DeviceCredentials]:
        """Fresh credentials for ``device_ids``, in force at once: a certificate each (earlier ones stay valid until
        revoked) or a password each (replacing the old one)."""
        try:
            if self.certificates:
                return {d: DeviceCredentials(certificate=i.certificate, key=i.key, ca_bundle=i.ca_bundle,
                                             serial=i.serial)
                        for d, i in self.broker.issue_certificates(device_ids).items()}
        except PkiError as exc:
            raise RegistryError(str(exc)) from None
        return {d: DeviceCredentials(password=p) for d, p in self.broker.add_devices(device_ids).items()}

    @staticmethod
    def _check_profile(profile: str, custom: bool) -> None:
        """RegistryError unless ``profile`` is a hardware profile's name or, ``custom``, a name that is none's."""
        from hardware.profiles import ProfileError, UnknownProfile, check_device_profile

        try:
            check_device_profile(profile, custom=custom)
        except UnknownProfile as exc:
            raise RegistryError(str(exc) if custom else f"{exc}: `edgeherd device add --custom-profile`") from None
        except ProfileError as exc:
            raise RegistryError(str(exc)) from None

    def revoke_device(self, device_id: str, actor: str = SYSTEM) -> None:
        with Session(self.engine) as db, audit.unit_of_work(db, self.data):
            device = db.get(Device, device_id)
            if device is None:
                raise RegistryError(f"no device named {device_id}")
            device.revoked = True
            db.add(device)
            audit.append(db, actor, "device.revoke", f"device:{device_id}", {})
        self.broker.revoke_device(device_id)
        self._kick(device_id)
        shutil.rmtree(self.data / "devices" / device_id, ignore_errors=True)
        log.info("revoked device %s", device_id)

    # -- credential rotation --------------------------------------------------------------------

    @property
    def _credentials_ref(self) -> str:
        return "pki:certificate" if self.certificates else "mosquitto:passwd"

    def rotate_credentials(self, device_id: str, actor: str = SYSTEM, timeout: float = 30.0) -> Rotation:
        """Give a connected device new credentials over its own session, then retire the old ones.

        A certificate device gets a new key and certificate (from the current CA, with the current CA bundle, so
        this is also how devices move to a rotated CA); a password device a new password. They go to the agent
        in a ``rotate_credentials`` command that expires after ``timeout`` seconds. Nothing is retired until the
        agent acknowledges ``done`` (it has stored them for its next connection); a failure, a refusal or silence
        raises RegistryError and the old credentials keep working. Then, with the rotation's audit entry in one
        transaction, the old certificates go on the CRL (or the broker's password file takes the new password),
        and the device's session is dropped: the agent expects that and reconnects at once with the new
        credentials, resuming its MQTT session (docs/hardware.md).
        """
        with Session(self.engine) as db:
            device = db.get(Device, device_id)
            if device is None or device.revoked:
                raise RegistryError(f"no enrolled device named {device_id}")
        creds = (self.new_credentials([device_id])[device_id] if self.certificates
                 else DeviceCredentials(password=new_password()))
        args: dict[str, bool | int | float | str]
        if creds.certificate is not None and creds.key is not None and creds.ca_bundle is not None:
            args = {"certificate": creds.certificate.decode(), "key": creds.key.decode(),
                    "ca": creds.ca_bundle.decode()}
        else:
            args = {"password": str(creds.password)}
        now = datetime.now(timezone.utc)
        cmd = Command(command_id=uuid.uuid4().hex, kind=CommandKind.ROTATE_CREDENTIALS, args=args,
                      issued_at=now, expires_at=now + timedelta(seconds=timeout))
        ack = self._send_command(device_id, cmd, timeout)
        unchanged = "nothing changed: its current credentials still work"
        if ack is None or ack.status is not AckStatus.DONE:
            if creds.serial is not None:
                self.broker.revoke_certificates([creds.serial])  # never delivered: of no use to anyone
            if ack is None:
                raise RegistryError(f"{device_id} did not confirm its new credentials within {timeout:.0f} s (is it "
                                    f"online? see `edgeherd device list`); {unchanged}")
            raise RegistryError(f"{device_id} answered {ack.status}: {ack.message or 'no reason given'}; {unchanged}")
        self._retire(device_id, actor, {"via": "agent", "command_id": cmd.command_id},
                     f"{device_id} was revoked while its credentials were being rotated", creds)
        if creds.serial is not None:  # the old certificate's connection (a password's, the broker drops itself)
            self._kick(device_id, keep_session=True)  # the agent reconnects at once and resumes its session
        log.info("rotated the broker credentials of %s", device_id)
        return Rotation(device_id, cmd.command_id, ack.message)

    def reissue_credentials(self, device_id: str, actor: str = SYSTEM,
                            detail: dict[str, str] | None = None) -> DeviceCredentials:
        """New credentials for an enrolled device, in force at once, without asking the device (it is being
        re-flashed); its old ones and any connection made with them are dropped."""
        creds = self.new_credentials([device_id])[device_id] if self.certificates else DeviceCredentials(
            password=new_password())
        self._retire(device_id, actor, {"via": "reissue", **(detail or {})}, f"no enrolled device named {device_id}",
                     creds)
        self._kick(device_id)
        log.info("issued new broker credentials to %s", device_id)
        return creds

    def _retire(self, device_id: str, actor: str, detail: dict[str, str], gone: str, creds: DeviceCredentials) -> None:
        """Make ``creds`` the device's only credentials (its other certificates revoked, or the broker's password
        file given the new password), with the ``device.rotate_credentials`` audit entry, in one transaction;
        keep the copy the data directory holds. RegistryError(``gone``) if the device is not enrolled."""
        with Session(self.engine) as db, audit.unit_of_work(db, self.data):
            device = db.get(Device, device_id)
            if device is None or device.revoked:
                if creds.serial is not None:
                    self.broker.revoke_certificates([creds.serial])
                raise RegistryError(gone)
            db.add(device)
            serial = {"serial": f"{creds.serial:x}"} if creds.serial is not None else {}
            audit.append(db, actor, "device.rotate_credentials", f"device:{device_id}", detail | serial)
            if creds.serial is not None and self.broker.authority is not None:
                old = [s for s in self.broker.authority.serials(device_id) if s != creds.serial]
                self.broker.revoke_certificates(old)  # from here the broker takes only the new certificate
            else:
                self.broker.add_device(device_id, creds.password)  # from here the broker takes only this one
        self._store_credentials(device_id, creds, only_existing=True)

    def _store_credentials(self, device_id: str, creds: DeviceCredentials, *, only_existing: bool = False) -> None:
        """Keep ``devices/<id>/`` (the enrolment copy: ``device.pem``, ``device.key`` and ``ca.pem``, or
        ``broker-password``) current; with ``only_existing``, only where the directory exists."""
        out = self.data / "devices" / device_id
        if only_existing and not out.is_dir():
            return
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        if creds.certificate is not None and creds.key is not None and creds.ca_bundle is not None:
            atomic_write(out / "device.key", creds.key, 0o600)
            atomic_write(out / "device.pem", creds.certificate, 0o600)
            atomic_write(out / "ca.pem", creds.ca_bundle, 0o600)
        if creds.password is not None:
            atomic_write(out / "broker-password", (creds.password + "\n").encode(), 0o600)

    def _send_command(self, device_id: str, cmd: Command, timeout: float = 30.0) -> CommandAck | None:
        """Send ``cmd`` to the device on a connection of its own and wait for its final acknowledgement (done,
        failed or rejected); None when none comes within ``timeout`` seconds (:meth:`server.bus.Bus.request`)."""
        with self.client() as bus:
            try:
                return bus.request(device_id, cmd, timeout)
            except BusError as exc:
                raise RegistryError(str(exc)) from None

    @property
    def server_broker_url(self) -> str:
        """Where the server's own clients connect. The managed broker's loopback listener when the broker is this
        data directory's own (also when ``--broker`` names its devices' listener, as a second replica on the same
        data directory does): there client ids are not bound to user names, so the server's clients, all logged
        in as the one server user, keep theirs apart. Otherwise ``--broker``."""
        return self.broker.server_url if self.broker_url == self.broker.url else self.broker_url

    def client(self, client_id: str | None = None) -> Bus:
        """A connected :class:`server.bus.Bus` as the server user, on :attr:`server_broker_url` (the caller closes
        it); RegistryError when the broker cannot be reached."""
        try:
            return Bus.connect(self.server_broker_url, SERVER_USER, self.broker.server_password(), client_id=client_id)
        except BusError as exc:
            raise RegistryError(str(exc)) from None

    def _kick(self, device_id: str, *, keep_session: bool = False) -> None:
        """Take over the device's MQTT connection (same client id), which makes the broker drop it; with
        ``keep_session`` its session stays for the device to resume (see :func:`server.broker.take_over`).

        On the server's own listener, where a client keeps the id it asks for: on the devices' listener the
        broker would give this client the server user's name as its id instead (docs/server.md, "The broker")."""
        parts = urlsplit(self.server_broker_url)
        try:
            take_over(parts.hostname or "127.0.0.1", parts.port or 1883, device_id, SERVER_USER,
                      self.broker.server_password(), keep_session=keep_session)
        except OSError as exc:
            log.warning("could not drop %s's connection now: %s", device_id, exc)

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
            with audit.unit_of_work(db, self.data):
                for art in manifest.artifacts:
                    try:
                        dest = self.artifacts.put(art.sha256, root / "artifacts" / art.sha256)
                    except StoreError:
                        raise RegistryError(f"artifact {art.name} changed while it was copied; push again") from None
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
                audit.append(db, actor, "model.push", f"model:{manifest.model}:{manifest.version}", {
                    "manifest_sha256": digest, "artifacts": [a.name for a in manifest.artifacts],
                    "author": version.author})
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
                with audit.unit_of_work(db, self.data):
                    result, _ = register(db, defs, actor)
            except FeatureRegistryError as exc:
                raise RegistryError(str(exc)) from None
            except IntegrityError:
                raise RegistryError("another push registered one of these feature versions at the same time; "
                                    "push again to see whether it agrees") from None
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
               actor: str = SYSTEM) -> DesiredState | None:
        """Make ``device_id`` run NAME:VERSION, with the artifact :func:`server.assignment.choose` picks (or
        ``artifact``, if the device can load it). The desired state is published at once when the device has
        reported its runtimes; otherwise the version is recorded as its desired one and sent when its hello
        arrives (returns None then). RegistryError, with nothing changed, when it cannot run the bundle."""
        _, signed = self.model(name, version)
        with Session(self.engine) as db, audit.unit_of_work(db, self.data):
            device = db.get(Device, device_id)
            if device is None or device.revoked:
                raise RegistryError(f"no enrolled device named {device_id}")
            choice = choose(signed.manifest, device.profile, runtimes_of(device.fingerprint), artifact)
            if choice.outcome is Outcome.UNSUITABLE:
                raise RegistryError(f"{device_id} {choice.reason}")
            with self.client() as bus:  # before anything changes: no broker, no deploy
                desired = self.assign(db, bus, device, signed, artifact)
            audit.append(db, actor, "device.deploy", f"device:{device_id}", {
                "model": name, "version": version, "artifact": desired.artifact if desired else None,
                "generation": desired.generation if desired else None,
                **({} if desired else {"waiting": "for the device to report its runtimes"})})
        return desired

    def record(self, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        """An audit entry of its own (committed, anchored) for an action outside the database."""
        with Session(self.engine) as db, audit.unit_of_work(db, self.data):
            audit.append(db, actor, action, target, detail)

    def anchor_audit(self, entry: AuditEntry) -> None:
        """Advance the audit anchor in the data directory (after the entry's commit)."""
        try:
            audit.write_anchor(self.data, entry)
        except OSError as exc:
            log.warning("could not write the audit anchor: %s", exc)

