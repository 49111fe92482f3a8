"""The server's own certificate authority: the broker's certificate, a certificate per device, revocation.

Everything lives in ``<data>/pki`` (0700), made with ``cryptography`` (no openssl shell-outs)::

    pki/
      ca/<id>.key        a CA's private key (0600), ECDSA P-256
      ca/<id>.pem        its self-signed certificate (10 years)
      ca-bundle.pem      the certificates of every trusted CA: the broker's ``cafile``, the agents' pinned CA
      crl.pem            one CRL per trusted CA, concatenated: the broker's ``crlfile``
      broker.pem/.key    the broker's certificate (the names it answers to) and key
      api.pem/.key       the operator API's certificate (the same names) and key
      state.json         the CAs (current, previous), issued serials per device, revocations, CRL number

Keys are ECDSA P-256: Mosquitto 2.0 (OpenSSL 3), Python's ``ssl`` and the TLS stacks on a Jetson or a
Raspberry Pi all take it, where Ed25519 certificates are still patchy in TLS 1.2.

A device's certificate names the device id as its common name; the broker takes it as the MQTT user name
(``use_identity_as_username``), so the ACL pattern ``edgeherd/v1/devices/%u/#`` confines the device to its own
topics as it does for passwords.

Rotation (``edgeherd server ca rotate``) never strands a device. It makes a new CA *current* and keeps the old
one *previous*: both are in ``ca-bundle.pem`` and both sign a CRL, so the broker accepts device certificates
from either, and the broker keeps its certificate from the old CA, the one every agent has pinned. New
certificates (enrolment, ``device rotate-credentials``) come from the new CA, together with the two-CA bundle.
``rotate --finish`` (once every device holds the new bundle; ``ca show`` counts those that do not) re-issues
the broker's certificate from the new CA and drops the old one.

Exceptions: :class:`PkiError` (bad names, a damaged state file, a finish with devices left behind).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hardware.files import atomic_write
from protocol.ids import is_device_id
from server.errors import ServerError

__all__ = ["Authority", "CaInfo", "Issued", "PkiError", "check_host_name"]

log = logging.getLogger(__name__)

ORGANIZATION = "edgeherd"
CA_DAYS = 3650
BROKER_DAYS = 397
DEVICE_DAYS = 825
#: A broker certificate with less than this left is re-issued when the server starts.
RENEW_BEFORE = dt.timedelta(days=30)
#: Certificates start this long before now, so a device whose clock runs a little behind accepts them.
BACKDATE = dt.timedelta(minutes=10)


class PkiError(ServerError):
    """The certificate authority cannot do what was asked; the message says what to fix."""


@dataclass(frozen=True)
class Issued:
    """A device's new certificate and key (PEM), and the CA bundle its agent pins."""

    device_id: str
    certificate: bytes
    key: bytes
    ca_bundle: bytes
    serial: int
    not_after: dt.datetime


@dataclass(frozen=True)
class CaInfo:
    id: str
    role: str  # "current" or "previous"
    subject: str
    sha256: str
    not_before: dt.datetime
    not_after: dt.datetime


def check_host_name(name: str) -> str:
    """``name`` if it is an IP address or a DNS host name; PkiError naming the problem otherwise."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 253 or not all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            and not label.startswith("-") and not label.endswith("-") for label in labels):
        raise PkiError(f"--public-host {name!r} is neither an IP address nor a host name (letters, digits, '-' and "
                       "dots, like pi-gateway.lan)")
    return name.rstrip(".").lower()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class _Ca:
    def __init__(self, ca_id: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.id, self.key, self.cert = ca_id, key, cert

    def leaf(self, common_name: str, public_key: ec.EllipticCurvePublicKey, *, days: int, server: bool,
             sans: Sequence[str] = ()) -> x509.Certificate:
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(common_name)).issuer_name(self.cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - BACKDATE).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def crl(self, revoked: Sequence[tuple[int, dt.datetime]], number: int,
            now: dt.datetime) -> x509.CertificateRevocationList:
        # the CRL is good until the CA itself expires: the broker must never find it stale and refuse every device
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now).next_update(self.cert.not_valid_after_utc)
                   .add_extension(x509.CRLNumber(number), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        return builder.sign(self.key, hashes.SHA256())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _new_ca() -> _Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_id = now.strftime("%Y%m%d%H%M%S") + "-" + os.urandom(3).hex()
    name = _name(f"edgeherd CA {ca_id}")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _Ca(ca_id, key, cert)


class Authority:
    """The CA files of one data directory. Every change holds an exclusive lock on ``pki/.lock``, so the server
    and a CLI command (``device add``) can change them at the same time."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_bundle = directory / "ca-bundle.pem"
        self.crl = directory / "crl.pem"
        self.broker_cert = directory / "broker.pem"
        self.broker_key = directory / "broker.key"
        self.api_cert = directory / "api.pem"
        self.api_key = directory / "api.key"
        self._state_file = directory / "state.json"

    @classmethod
    def open(cls, data_dir: Path) -> Authority:
        """The authority of ``data_dir``, created (a CA, an empty CRL) on first use."""
        auth = cls(data_dir / "pki")
        if not auth._state_file.exists():
            auth.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with auth._locked() as state:
                if not state["cas"]:
                    ca = auth._store_ca(_new_ca())
                    state["cas"] = [{"id": ca.id, "role": "current"}]
                    log.info("created the certificate authority %s in %s", ca.id, auth.dir)
                    auth._publish(state)
        return auth

    # -- state ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The state, under the lock; saved when the block ends without an exception."""
        with open(self.dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                atomic_write(self._state_file, json.dumps(state, indent=1, sort_keys=True), 0o600)

    def _read(self) -> dict[str, Any]:
        try:
            state = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return {"cas": [], "issued": {}, "crl_number": 0, "broker": {}}
        except (OSError, ValueError) as exc:
            raise PkiError(f"{self._state_file} cannot be read ({exc}); restore it from a backup "
                           "(`edgeherd server restore`)") from None
        if not isinstance(state, dict) or not isinstance(state.get("cas"), list) or not state["cas"]:
            raise PkiError(f"{self._state_file} is damaged (no CA in it); restore it from a backup")
        return state

    def _store_ca(self, ca: _Ca) -> _Ca:
        (self.dir / "ca").mkdir(exist_ok=True, mode=0o700)
        atomic_write(self.dir / "ca" / f"{ca.id}.key", _key_pem(ca.key), 0o600)
        atomic_write(self.dir / "ca" / f"{ca.id}.pem", _cert_pem(ca.cert), 0o644)
        return ca

    def _load_ca(self, ca_id: str) -> _Ca:
        try:
            key = serialization.load_pem_private_key((self.dir / "ca" / f"{ca_id}.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((self.dir / "ca" / f"{ca_id}.pem").read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"the CA {ca_id} in {self.dir / 'ca'} cannot be read ({exc}); restore it from a backup")\
                from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.dir / 'ca' / (ca_id + '.key')} is not an ECDSA key")
        return _Ca(ca_id, key, cert)

    @staticmethod
    def _role(state: dict[str, Any], role: str) -> str | None:
        return next((c["id"] for c in state["cas"] if c["role"] == role), None)

    def _current(self, state: dict[str, Any]) -> _Ca:
        ca_id = self._role(state, "current")
        if ca_id is None:
            raise PkiError(f"{self._state_file} names no current CA; restore it from a backup")
        return self._load_ca(ca_id)

    def _trusted(self, state: dict[str, Any]) -> list[_Ca]:
        return [self._load_ca(c["id"]) for c in state["cas"]]

    def _publish(self, state: dict[str, Any]) -> None:
        """Write the trusted bundle and one fresh CRL per trusted CA."""
        cas = self._trusted(state)
        atomic_write(self.ca_bundle, b"".join(_cert_pem(ca.cert) for ca in cas), 0o644)
        self._write_crl(state, cas)

    def _write_crl(self, state: dict[str, Any], cas: list[_Ca] | None = None) -> None:
        cas = cas if cas is not None else self._trusted(state)
        state["crl_number"] = int(state.get("crl_number", 0)) + 1
        now = _now()
        crls = []
        for ca in cas:
            revoked = [(int(serial), dt.datetime.fromisoformat(info["revoked_at"]))
                       for serial, info in state["issued"].items()
                       if info.get("revoked_at") and info.get("ca") == ca.id]
            crls.append(ca.crl(sorted(revoked), state["crl_number"], now).public_bytes(serialization.Encoding.PEM))
        atomic_write(self.crl, b"".join(crls), 0o644)

    # -- what the broker needs -----------------------------------------------------------------

    def broker_certificate(self, names: Sequence[str]) -> bool:
        """Make sure ``broker.pem`` names exactly ``names`` (host names and IPs; the first is its common name), is
        signed by the CA the agents pin and has more than 30 days left; True when it was (re-)issued."""
        return self._server_certificate("broker", self.broker_cert, self.broker_key, names)

    def api_certificate(self, names: Sequence[str]) -> bool:
        """As :meth:`broker_certificate`, for the operator API's HTTPS listener (``api.pem``/``api.key``), which
        operators' clients check against the same CA bundle."""
        return self._server_certificate("api", self.api_cert, self.api_key, names)

    def _server_certificate(self, role: str, cert_path: Path, key_path: Path, names: Sequence[str]) -> bool:
        checked = list(dict.fromkeys(check_host_name(n) for n in names))
        if not checked:
            raise PkiError(f"the {role}'s certificate needs at least one host name")
        with self._locked() as state:
            previous = self._role(state, "previous")
            signer = self._load_ca(previous) if previous else self._current(state)
            held = state.get(role, {})
            if (held.get("names") == checked and held.get("ca") == signer.id and cert_path.exists()
                    and key_path.exists()):
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                if cert.not_valid_after_utc - _now() > RENEW_BEFORE:
                    return False
            key = ec.generate_private_key(ec.SECP256R1())
            cert = signer.leaf(checked[0][:64], key.public_key(), days=BROKER_DAYS, server=True, sans=checked)
            atomic_write(key_path, _key_pem(key), 0o600)
            atomic_write(cert_path, _cert_pem(cert), 0o644)
            state[role] = {"names": checked, "ca": signer.id, "serial": str(cert.serial_number)}
        log.info("issued the %s's certificate for %s", role, ", ".join(checked))
        return True

    def broker_names(self) -> list[str]:
        return list(self._read().get("broker", {}).get("names", []))

    def trusted_pem(self) -> bytes:
        return self.ca_bundle.read_bytes()

    # -- devices ----------------------------------------------------------------------------------

    def issue_device(self, device_id: str, *, days: int = DEVICE_DAYS) -> Issued:
        """A fresh key and certificate for ``device_id`` from the current CA (earlier ones stay valid until
        revoked)."""
        if not is_device_id(device_id):
            raise PkiError(f"{device_id!r} is not a valid device name: use a-z, 0-9 and '-', at most 63")
        key = ec.generate_private_key(ec.SECP256R1())
        with self._locked() as state:
            ca = self._current(state)
            cert = ca.leaf(device_id, key.public_key(), days=days, server=False)
            state["issued"][str(cert.serial_number)] = {
                "device": device_id, "ca": ca.id, "not_after": cert.not_valid_after_utc.isoformat(),
                "revoked_at": None}
            bundle = self.ca_bundle.read_bytes()
        return Issued(device_id, _cert_pem(cert), _key_pem(key), bundle, cert.serial_number,
                      cert.not_valid_after_utc)

    def issue_devices(self, device_ids: Sequence[str], *, days: int = DEVICE_DAYS) -> dict[str, Issued]:
        """:meth:`issue_device` for many devices under one lock and one state write (simulated fleets)."""
        bad = [d for d in device_ids if not is_device_id(d)]
        if bad:
            raise PkiError(f"not valid device names: {bad[:5]}")
        keys = {d: ec.generate_private_key(ec.SECP256R1()) for d in device_ids}
        out = {}
        with self._locked() as state:
            ca = self._current(state)
            bundle = self.ca_bundle.read_bytes()
            for d, key in keys.items():
                cert = ca.leaf(d, key.public_key(), days=days, server=False)
                state["issued"][str(cert.serial_number)] = {
                    "device": d, "ca": ca.id, "not_after": cert.not_valid_after_utc.isoformat(), "revoked_at": None}
                out[d] = Issued(d, _cert_pem(cert), _key_pem(key), bundle, cert.serial_number,
                                cert.not_valid_after_utc)
        return out

    def serials(self, device_id: str, *, revoked: bool = False) -> list[int]:
        """The serials issued to ``device_id`` that are (``revoked``) or are not revoked."""
        return sorted(int(s) for s, info in self._read()["issued"].items()
                      if info["device"] == device_id and bool(info.get("revoked_at")) == revoked)

    def revoke(self, serials: Sequence[int]) -> list[int]:
        """Put ``serials`` on the CRL (rewritten at once); returns those that were not revoked before."""
        with self._locked() as state:
            now = _now().isoformat()
            done = []
            for serial in serials:
                info = state["issued"].get(str(serial))
                if info is not None and not info.get("revoked_at"):
                    info["revoked_at"] = now
                    done.append(int(serial))
            if done:
                self._write_crl(state)
        if done:
            log.info("revoked %d certificate(s): %s", len(done), ", ".join(f"{s:x}" for s in done))
        return done

    def revoke_device(self, device_id: str, *, keep: int | None = None) -> list[int]:
        """Revoke every certificate of ``device_id`` (all but serial ``keep``)."""
        return self.revoke([s for s in self.serials(device_id) if s != keep])

    def is_revoked(self, serial: int) -> bool:
        info = self._read()["issued"].get(str(serial))
        return bool(info and info.get("revoked_at"))

    # -- the CAs -------------------------------------------------------------------------------------

    def cas(self) -> list[CaInfo]:
        out = []
        for entry in self._read()["cas"]:
            ca = self._load_ca(entry["id"])
            out.append(CaInfo(ca.id, entry["role"], ca.cert.subject.rfc4514_string(),
                              ca.cert.fingerprint(hashes.SHA256()).hex(":"), ca.cert.not_valid_before_utc,
                              ca.cert.not_valid_after_utc))
        return out

    def rotating(self) -> bool:
        return self._role(self._read(), "previous") is not None

    def devices_on(self, ca_id: str) -> set[str]:
        """Devices with an unrevoked, unexpired certificate from ``ca_id`` and none from a later CA."""
        state = self._read()
        now = _now()
        live: dict[str, set[str]] = {}
        for info in state["issued"].values():
            if not info.get("revoked_at") and dt.datetime.fromisoformat(info["not_after"]) > now:
                live.setdefault(info["device"], set()).add(info["ca"])
        return {d for d, cas in live.items() if cas == {ca_id}}

    def rotate(self) -> CaInfo:
        """Start a rotation: a new current CA, the old one kept as previous (both trusted)."""
        with self._locked() as state:
            if self._role(state, "previous") is not None:
                raise PkiError("a CA rotation is already under way: move the devices to the new CA "
                               "(`edgeherd device rotate-credentials`), then `edgeherd server ca rotate --finish`")
            old = self._role(state, "current")
            ca = self._store_ca(_new_ca())
            state["cas"] = [{"id": ca.id, "role": "current"}, {"id": old, "role": "previous"}]
            self._publish(state)
        log.info("CA rotation started: %s is current, %s stays trusted until the rotation finishes", ca.id, old)
        return next(c for c in self.cas() if c.id == ca.id)

    def finish_rotation(self, *, force: bool = False) -> list[str]:
        """End a rotation: stop trusting the previous CA (the broker's certificate is re-issued from the current
        one by the next :meth:`broker_certificate`). PkiError while devices hold only certificates from the
        previous CA, unless ``force``; returns the devices left behind."""
        with self._locked() as state:
            previous = self._role(state, "previous")
            if previous is None:
                raise PkiError("no CA rotation is under way: start one with `edgeherd server ca rotate`")
            behind = sorted(self.devices_on(previous))
            if behind and not force:
                raise PkiError(f"{len(behind)} device(s) still hold only certificates from the previous CA, e.g. "
                               f"{', '.join(behind[:5])}: give them new ones (`edgeherd device rotate-credentials`) "
                               "or finish with --force, which cuts them off until they are re-flashed")
            state["cas"] = [c for c in state["cas"] if c["role"] == "current"]
            self._publish(state)
        log.info("CA rotation finished: %s is no longer trusted", previous)
        return behind
