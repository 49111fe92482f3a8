"""Ed25519 keys and manifest signatures.

The server signs the canonical JSON of a :class:`~protocol.manifest.Manifest`;
the agent verifies it against the public key pinned at provisioning and
refuses anything else. Verification re-serialises the *parsed* manifest, so
what is verified is exactly what the agent then acts on.

Key formats: private keys as unencrypted PKCS#8 PEM; public keys as
SubjectPublicKeyInfo PEM or the one-line text form ``ed25519:<base64 of the
32 raw bytes>`` used in agent config files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, ClassVar, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import StringConstraints

from protocol._model import WireModel, decode_model, encode_model, wire_bytes
from protocol.errors import KeyFormatError, SignatureError
from protocol.manifest import Manifest

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "Signature",
    "SignedManifest",
    "decode_signed_manifest",
    "generate_signing_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "private_key_to_pem",
    "public_key_to_pem",
    "public_key_to_text",
    "sign_manifest",
    "verify_manifest",
]

_TEXT_PREFIX = "ed25519:"


class Signature(WireModel):
    alg: Literal["ed25519"] = "ed25519"
    #: First 16 hex characters of sha256(raw public key): which key signed.
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
    #: base64 of the 64-byte Ed25519 signature.
    value: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]


class SignedManifest(WireModel):
    KIND: ClassVar[str] = "signed manifest"
    MAX_BYTES: ClassVar[int] = Manifest.MAX_BYTES + 1024

    manifest: Manifest
    signature: Signature


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: 16 hex characters."""
    return hashlib.sha256(_raw_public(pub)).hexdigest()[:16]


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_to_pem(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_to_text(pub: Ed25519PublicKey) -> str:
    """One-line form for config files: ``ed25519:<base64>``."""
    return _TEXT_PREFIX + base64.b64encode(_raw_public(pub)).decode("ascii")


def load_private_key(data: bytes) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS#8 PEM Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(bytes(data), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"not an unencrypted PEM private key: {exc}") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for odd keys
        raise KeyFormatError(f"cannot load private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(data: bytes | str) -> Ed25519PublicKey:
    """Load a public key from PEM or from the ``ed25519:<base64>`` text form."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    text = raw.strip()
    if text.startswith(_TEXT_PREFIX.encode()):
        try:
            key_bytes = base64.b64decode(text[len(_TEXT_PREFIX):], validate=True)
            return Ed25519PublicKey.from_public_bytes(key_bytes)
        except (binascii.Error, ValueError) as exc:
            raise KeyFormatError(f"'ed25519:' key must be base64 of 32 bytes: {exc}") from None
    try:
        key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"public key is neither PEM nor 'ed25519:<base64>': {exc}") from None
    except Exception as exc:
        raise KeyFormatError(f"cannot load public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"expected an Ed25519 public key, got {type(key).__name__}")
    return key


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> SignedManifest:
    sig = key.sign(wire_bytes(manifest))
    return SignedManifest(
        manifest=manifest,
        signature=Signature(key_id=key_id(key.public_key()), value=base64.b64encode(sig).decode("ascii")),
    )


def verify_manifest(signed: SignedManifest, pub: Ed25519PublicKey) -> Manifest:
    """Return the manifest if its signature verifies against ``pub``.

    Raises :class:`SignatureError` naming the signing key when it does not.
    """
    expected = key_id(pub)
    if signed.signature.key_id != expected:
        raise SignatureError(
            f"manifest {signed.manifest.model} {signed.manifest.version} was signed by key "
            f"{signed.signature.key_id}, but the pinned server key is {expected}"
        )
    sig = base64.b64decode(signed.signature.value)
    try:
        pub.verify(sig, wire_bytes(signed.manifest))
    except InvalidSignature:
        raise SignatureError(
            f"signature of manifest {signed.manifest.model} {signed.manifest.version} does not match "
            f"its contents: it was altered after signing, or signed with another key"
        ) from None
    return signed.manifest


def decode_signed_manifest(payload: bytes, pub: Ed25519PublicKey) -> Manifest:
    """Decode and verify a signed manifest from untrusted bytes."""
    return verify_manifest(decode_model(SignedManifest, payload), pub)


def encode_signed_manifest(signed: SignedManifest) -> bytes:
    return encode_model(signed)
