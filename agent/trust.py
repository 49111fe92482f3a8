"""Which bundle-signing keys this device trusts: the provisioned ``server_key``, then key-set statements.

The root of trust is the key pinned at provisioning (``server_key`` in agent.toml). A key-set statement
(protocol/keyset.py) arrives in the desired state; it is accepted when it is signed by a key the device
trusts now (the root while it holds no statement, else the active or next key of the statement it holds)
and its serial is above the one held (a replayed older statement is refused). The accepted statement is
kept in ``keyset.json`` in the data directory, written atomically, so a restart keeps the trust it had.
From then on bundles signed by its active or next key verify and those of a retired key are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.errors import InstallFailure
from hardware.files import atomic_write
from protocol import (
    InvalidMessage,
    KeySet,
    Manifest,
    SignatureError,
    SignedKeySet,
    SignedManifest,
    decode_model,
    encode_model,
    key_id,
    verify_keyset,
    verify_manifest,
)
from protocol.signing import Ed25519PublicKey

__all__ = ["KEYSET_FILE", "Trust"]

log = logging.getLogger(__name__)

KEYSET_FILE = "keyset.json"


class Trust:
    """The keys whose bundles this device accepts. ``data_dir`` None: nothing is persisted (tests, tools)."""

    def __init__(self, root: Ed25519PublicKey, data_dir: Path | None = None) -> None:
        self.root = root
        self.path = data_dir / KEYSET_FILE if data_dir is not None else None
        self.statement: SignedKeySet | None = None
        if self.path is not None and self.path.is_file():
            try:
                self.statement = decode_model(SignedKeySet, self.path.read_bytes())
            except (OSError, InvalidMessage) as exc:  # kept atomically: only a hand edit gets here
                raise InstallFailure(f"{self.path} is not a key-set statement ({exc}); delete it to fall back "
                                     f"to server_key, the server sends the statement again") from None

    @property
    def keyset(self) -> KeySet | None:
        return None if self.statement is None else self.statement.keyset

    @property
    def serial(self) -> int:
        return 0 if self.statement is None else self.statement.keyset.serial

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        """``{key id: key}`` whose bundles and statements are accepted now."""
        ks = self.keyset
        return {key_id(self.root): self.root} if ks is None else ks.trusted()

    def accept(self, statement: SignedKeySet) -> bool:
        """Take ``statement`` if it is newer and signed by a trusted key; whether it was taken.

        The same serial again is ignored (False); a lower one, or one signed by a key this device does not
        trust, raises SignatureError with the reason."""
        held = self.serial
        if statement.keyset.serial == held and self.statement == statement:
            return False
        if statement.keyset.serial <= held:
            raise SignatureError(f"key-set statement {statement.keyset.serial} is not newer than the one this "
                                 f"device holds ({held}): refused as a replay")
        keyset = verify_keyset(statement, self.trusted())
        if self.path is not None:
            atomic_write(self.path, encode_model(statement).decode("utf-8"), 0o644)
        self.statement = statement
        log.info("accepted key-set statement %d (signed by %s): active %s", keyset.serial,
                 statement.signature.key_id, key_id(keyset.active()))
        return True

    def verify(self, signed: SignedManifest, *, installed: bool = False) -> Manifest:
        """The manifest if it is signed by a trusted key; SignatureError naming the key otherwise.

        ``installed``: the manifest of a model this device installed earlier (a slot's), checked when it is
        loaded again: a key retired since, or the provisioned key, still verifies it, so a restart after a
        rotation keeps serving the model it ran. What arrives from the network never passes this flag."""
        ks = self.keyset
        signer = signed.signature.key_id
        if installed:
            known = {key_id(self.root): self.root}
            if ks is not None:
                known |= {key_id(pub): pub for pub in (k.public() for k in ks.keys)}
            if signer in known:
                return verify_manifest(signed, known[signer])
        if ks is not None and signer in ks.retired():
            raise SignatureError(f"manifest {signed.manifest.model} {signed.manifest.version} is signed by key "
                                 f"{signer}, which key-set statement {ks.serial} retired")
        trusted = self.trusted()
        pub = trusted.get(signer)
        if pub is None:
            raise SignatureError(f"manifest {signed.manifest.model} {signed.manifest.version} is signed by key "
                                 f"{signer}, which this device does not trust (trusted: {', '.join(sorted(trusted))}"
                                 f"; the pinned server_key is {key_id(self.root)})")
        return verify_manifest(signed, pub)
