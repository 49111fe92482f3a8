"""Key-set statements: how a device learns which bundle-signing keys to trust, so the key can be rotated.

A statement lists keys with a state each, under a serial that only grows::

    {"keyset": {"serial": 2, "issued_at": "...", "keys": [{"key": "ed25519:…", "state": "active"},
                                                         {"key": "ed25519:…", "state": "next"}]},
     "signature": {"alg": "ed25519", "key_id": "…", "value": "…"}}

It is signed by a key the device already trusts: the key it was provisioned with (``server_key``) while it
holds no statement, else a key its newest accepted statement lists as ``active`` or ``next``. Bundles signed
by an ``active`` or ``next`` key are accepted, a ``retired`` key's are refused. What is signed is a fixed
prefix plus the canonical JSON of the ``keyset`` object, so a statement signature can never pass for a
manifest signature or the other way round.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

from cryptography.exceptions import InvalidSignature
from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from protocol._model import WireModel, wire_bytes
from protocol.errors import KeyFormatError, SignatureError
from protocol.signing import Ed25519PrivateKey, Ed25519PublicKey, Signature, key_id, load_public_key

__all__ = ["KeyEntry", "KeySet", "SignedKeySet", "keyset_payload", "sign_keyset", "verify_keyset"]

#: A statement lists at most this many keys (active, next and the retired ones kept for the record).
MAX_KEYS = 16
_DOMAIN = b"edgeherd.keyset.v1\n"

KeyText = Annotated[str, StringConstraints(pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$")]


class KeyEntry(WireModel):
    #: The public key, ``ed25519:<base64 of 32 bytes>``.
    key: KeyText
    state: Literal["active", "next", "retired"]

    def public(self) -> Ed25519PublicKey:
        try:
            return load_public_key(self.key)
        except KeyFormatError as exc:
            raise SignatureError(f"key-set entry {self.key[:20]}…: {exc}") from None


class KeySet(WireModel):
    #: Grows with every statement; a device refuses one not above the serial it holds.
    serial: Annotated[int, Field(ge=1, le=2**53)]
    issued_at: AwareDatetime
    keys: list[KeyEntry] = Field(min_length=1, max_length=MAX_KEYS)

    @model_validator(mode="after")
    def _one_active(self) -> KeySet:
        states = [k.state for k in self.keys]
        if states.count("active") != 1:
            raise ValueError(f"a key set names exactly one active key (this one names {states.count('active')})")
        if states.count("next") > 1:
            raise ValueError("a key set names at most one next key")
        if len({k.key for k in self.keys}) != len(self.keys):
            raise ValueError("a key set lists each key once")
        return self

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        """``{key id: key}`` of the keys whose bundles are accepted (active and next)."""
        return {key_id(pub): pub for pub in (k.public() for k in self.keys if k.state != "retired")}

    def retired(self) -> set[str]:
        return {key_id(k.public()) for k in self.keys if k.state == "retired"}

    def active(self) -> Ed25519PublicKey:
        return next(k.public() for k in self.keys if k.state == "active")


class SignedKeySet(WireModel):
    KIND: ClassVar[str] = "key-set statement"
    MAX_BYTES: ClassVar[int] = 8 * 1024

    keyset: KeySet
    signature: Signature


def keyset_payload(keyset: KeySet) -> bytes:
    """The bytes the signer signs: a fixed prefix, then the canonical JSON of ``keyset``."""
    return _DOMAIN + wire_bytes(keyset)


def sign_keyset(keyset: KeySet, key: Ed25519PrivateKey) -> SignedKeySet:
    value = base64.b64encode(key.sign(keyset_payload(keyset))).decode("ascii")
    return SignedKeySet(keyset=keyset, signature=Signature(key_id=key_id(key.public_key()), value=value))


def verify_keyset(signed: SignedKeySet, trusted: Mapping[str, Ed25519PublicKey]) -> KeySet:
    """Return the key set if it is signed by one of ``trusted`` (``{key id: key}``), else SignatureError."""
    signer = trusted.get(signed.signature.key_id)
    if signer is None:
        raise SignatureError(f"key-set statement {signed.keyset.serial} is signed by key {signed.signature.key_id}, "
                             f"which this device does not trust (trusted: {', '.join(sorted(trusted)) or 'none'})")
    try:
        signer.verify(base64.b64decode(signed.signature.value), keyset_payload(signed.keyset))
    except InvalidSignature:
        raise SignatureError(f"signature of key-set statement {signed.keyset.serial} does not match its "
                             f"contents") from None
    return signed.keyset
