"""What the agent logs in to the broker with, and its rotation: a password, or a certificate.

Passwords
---------
A rotation (``rotate_credentials`` with ``password``) writes the new password
to ``password_file`` after adding the one it replaces to
``<password_file>.previous`` (newest first, at most :data:`KEEP_PREVIOUS`),
both atomically and mode 0600, and the agent acknowledges it; the server then
makes the broker take the new password instead of the old. The next
connection logs in with the new password. A broker that re-checks connected
clients when its password file changes (Mosquitto does, on reload) ends the
connection made with the old password at that moment; the agent, expecting
it, reconnects at once and resumes its MQTT session (agent/session.py), so
what was sent to it in between is delivered.

Should the acknowledgement never reach the server, the broker keeps the old
password. So the agent tries the current password first and the previous ones
after it, and forgets the previous ones only once the current one has been
accepted: a rotation that the server did not finish never locks a device out.

Certificates
------------
A device of the managed broker logs in with its own certificate (its common
name is the device id, which the broker takes as its user name), and pins the
CA that signed the broker's: ``tls_cert``, ``tls_key`` and ``tls_ca``.
:meth:`Certificates.context` builds the TLS context from these files before
every connection attempt, trusting only the pinned CA bundle (never the
system's CAs) and checking that the broker's certificate names the host in
``broker_url``; a file that cannot be read, or a key that is not the
certificate's, is a configuration error naming the file.

A rotation (``rotate_credentials`` with ``certificate``, ``key`` and ``ca``,
PEM) is checked first (:func:`check_certificate`: the key is the
certificate's, the certificate names this device and is signed by a CA of
the bundle sent with it; else the agent rejects it, saying why). The files
the broker takes now are copied to ``<file>.previous``, then the new key,
certificate and bundle replace the current ones, each atomically and mode
0600, and the agent acknowledges ``done``. The server then revokes the old
certificate and ends the device's session; the agent, expecting it,
reconnects at once with the new files.

As with passwords, the previous files are tried when the current ones fail:
when the broker refuses the new certificate (or the new bundle does not
verify the broker's), the next attempt uses the ``.previous`` files at once,
and once the broker accepts the current files the previous ones are deleted.
A broker that takes only the previous files (the server did not finish the
rotation) keeps them, with a warning; a later rotation then keeps those
previous files, the ones that work, and replaces only the current ones.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent.config import AgentConfig
from agent.errors import ConfigError
from hardware.files import atomic_write

__all__ = ["KEEP_PREVIOUS", "Certificates", "Credentials", "TlsFiles", "check_certificate"]

log = logging.getLogger(__name__)
#: Previous passwords kept until the current one is accepted (rotations in a row the server did not finish).
KEEP_PREVIOUS = 4


class Credentials:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.file = cfg.password_file

    @property
    def previous_file(self) -> Path | None:
        return None if self.file is None else self.file.with_name(self.file.name + ".previous")

    @property
    def rotatable(self) -> bool:
        """Whether a rotation can be stored: the password lives in a file."""
        return self.file is not None

    def _previous(self) -> list[str]:
        prev = self.previous_file
        if prev is None:
            return []
        try:
            lines = prev.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return [line.strip() for line in lines if line.strip()]

    def candidates(self) -> list[str | None]:
        """Passwords to try, in order: the current one, then those rotations replaced (newest first)."""
        if self.file is None:
            return [self.cfg.password]
        out: list[str | None] = []
        try:
            out.append(self.cfg.broker_password())
        except ConfigError as exc:
            log.error("%s", exc)
        out += [p for p in self._previous() if p not in out]
        return out or [None]

    def rotate(self, new: str) -> None:
        """Store ``new`` as the password for the next connection, keeping the current one among the previous.

        Raises OSError when the files cannot be written; then the current password is unchanged.
        """
        if self.file is None or self.previous_file is None:
            raise ConfigError("the broker password is not in a file (password_file), so a new one cannot be stored")
        current = self.cfg.broker_password()
        if current == new:
            return
        keep = list(dict.fromkeys(p for p in [current, *self._previous()] if p and p != new))[:KEEP_PREVIOUS]
        if keep:
            atomic_write(self.previous_file, "".join(p + "\n" for p in keep), 0o600)
        atomic_write(self.file, new + "\n", 0o600)
        log.info("stored a new broker password in %s; it is used from the next connection", self.file)

    def accepted(self, index: int) -> None:
        """The broker accepted the ``index``-th of :meth:`candidates`."""
        prev = self.previous_file
        if prev is None or not prev.exists():
            return
        if index == 0:
            prev.unlink(missing_ok=True)
            log.info("the broker accepted the current password; forgot the previous ones")
        else:
            log.warning("the broker refused the current password in %s but took a previous one: the server did not "
                        "finish the last credential rotation. Keeping them all; rotate again from the server.",
                        self.file)


# -- certificates ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The files one connection attempt uses: the pinned CA bundle and the client certificate and key (either may be
    None: the system's CAs; a broker that takes passwords)."""

    ca: Path | None
    cert: Path | None
    key: Path | None
    #: Whether these are the ``.previous`` copies a rotation kept.
    previous: bool = False

    @property
    def role(self) -> str:
        return "previous" if self.previous else "current"


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".previous")


def _pem_certificates(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


def check_certificate(certificate: bytes, key: bytes, ca: bytes, device_id: str,
                      now: dt.datetime | None = None) -> str | None:
    """Why ``certificate`` and ``key`` (PEM) cannot be this device's next credentials, or None when they can: the key
    is the certificate's, the certificate names ``device_id`` as its common name, is valid now (or soon: the server
    backdates it) and is signed by one of the CAs in ``ca``."""
    chain = _pem_certificates(certificate)
    if not chain:
        return "the certificate is not a PEM certificate"
    leaf = chain[0]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        return f"the key is not an unencrypted PEM private key ({exc})"
    if _spki(private.public_key()) != _spki(leaf.public_key()):
        return "the key is not the certificate's key"
    names = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        return f"the certificate is for {', '.join(map(str, names)) or 'no common name'}, not for {device_id}"
    now = now or dt.datetime.now(dt.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        return f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    cas = _pem_certificates(ca)
    if not cas:
        return "the CA bundle holds no PEM certificate"
    if not any(_issued_by(leaf, c) for c in cas):
        return "the certificate is not signed by any CA in the CA bundle sent with it"
    return None


def _spki(public: Any) -> bytes:
    return bytes(public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca:
        return False
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class Certificates:
    """The TLS files the agent connects with (``tls_ca``, ``tls_cert``, ``tls_key``), their rotation and the
    fallback to the ``.previous`` ones (see the module's docstring)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        #: Which files the broker last accepted (None: none yet in this process).
        self.in_use: TlsFiles | None = None

    @property
    def rotatable(self) -> bool:
        """Whether a new certificate can be stored: the agent logs in with a certificate from files."""
        return self.cfg.tls and self.cfg.tls_cert is not None and self.cfg.tls_key is not None

    def _files(self) -> tuple[Path, Path, Path]:
        cfg = self.cfg
        if not self.rotatable or cfg.tls_ca is None or cfg.tls_cert is None or cfg.tls_key is None:
            raise ConfigError("the agent logs in without a certificate of its own (tls_cert and tls_key, with "
                              "tls_ca and an mqtts:// broker_url), so a new one cannot be stored")
        return cfg.tls_ca, cfg.tls_cert, cfg.tls_key

    def candidates(self) -> list[TlsFiles]:
        """The files to connect with, in order: the current ones, then those a rotation replaced (when all three
        ``.previous`` files are there)."""
        cfg = self.cfg
        out = [TlsFiles(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)]
        if self.rotatable:
            ca, cert, key = (_previous(p) for p in self._files())
            if ca.exists() and cert.exists() and key.exists():
                out.append(TlsFiles(ca, cert, key, previous=True))
        return out

    def context(self, files: TlsFiles) -> ssl.SSLContext:
        """A client context that trusts only ``files.ca`` (the system's CAs without it), checks the broker's host
        name and presents ``files.cert``; ConfigError naming the file that is unreadable or wrong."""
        prefix = "previous " if files.previous else ""
        cert_pem = _read(files.cert, f"{prefix}tls_cert") if files.cert is not None else None
        key_pem = _read(files.key, f"{prefix}tls_key") if files.key is not None else None
        if files.cert is not None and files.key is not None and cert_pem is not None and key_pem is not None:
            chain = _pem_certificates(cert_pem)
            if not chain:
                raise ConfigError(f"{prefix}tls_cert {files.cert} holds no PEM certificate")
            try:
                private = serialization.load_pem_private_key(key_pem, password=None)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{prefix}tls_key {files.key} is not an unencrypted PEM private key ({exc})") \
                    from None
            if _spki(private.public_key()) != _spki(chain[0].public_key()):
                raise ConfigError(f"{prefix}tls_key {files.key} is not the key of {prefix}tls_cert {files.cert}: "
                                  "they come from different enrolments; copy the matching pair")
        try:
            ctx = ssl.create_default_context(cafile=str(files.ca) if files.ca is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{prefix}tls_ca {files.ca} cannot be used as the pinned CA bundle: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if files.cert is not None and files.key is not None:
            try:
                ctx.load_cert_chain(str(files.cert), str(files.key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{prefix}tls_cert {files.cert} and tls_key {files.key} cannot be loaded: "
                                  f"{exc}") from None
        return ctx

    def rotate(self, certificate: bytes, key: bytes, ca: bytes) -> None:
        """Store a new certificate, key and CA bundle for the next connection, keeping the files the broker takes
        now as ``.previous``. The caller has checked them (:func:`check_certificate`). Raises OSError when the
        files cannot be written: then the next connection still has files the broker takes."""
        ca_file, cert_file, key_file = self._files()
        if self.in_use is None or not self.in_use.previous:
            # the current files are the ones that work: they become the previous (a crash half-way through the
            # second loop leaves current files that do not fit, and the previous ones are tried next)
            for path in (ca_file, cert_file, key_file):
                atomic_write(_previous(path), path.read_bytes(), 0o600)
        # else the broker takes the previous files and not the current ones (a rotation the server did not
        # finish): those stay the previous, and only the current are replaced
        atomic_write(key_file, key, 0o600)
        atomic_write(cert_file, certificate, 0o600)
        atomic_write(ca_file, ca, 0o600)
        log.info("stored a new certificate in %s (key %s, CA bundle %s); it is used from the next connection",
                 cert_file, key_file, ca_file)

    def accepted(self, files: TlsFiles) -> None:
        """The broker accepted a connection made with ``files``."""
        self.in_use = files
        if not self.rotatable:
            return
        previous = [_previous(p) for p in self._files()]
        if not any(p.exists() for p in previous):
            return
        if not files.previous:
            for path in previous:
                path.unlink(missing_ok=True)
            log.info("the broker accepted the new certificate in %s; forgot the previous one", files.cert)
        else:
            log.warning("the broker refused the certificate in %s but took the previous one (%s): the server did "
                        "not finish the last credential rotation. Keeping both; rotate again from the server.",
                        self.cfg.tls_cert, files.cert)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key} {path} cannot be read: {exc.strerror or exc}") from None
