"""The server's bundle-signing key pair on disk: ``signing.key`` (private, 0600) and ``signing.pub`` beside it, in a
directory only its owner can enter. Written atomically, so a crash never leaves half a key."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hardware.files import atomic_write
from protocol import generate_signing_key, private_key_to_pem, public_key_to_pem

__all__ = ["PRIVATE", "PUBLIC", "write_key_pair"]

PRIVATE, PUBLIC = "signing.key", "signing.pub"


def write_key_pair(directory: Path, key: Ed25519PrivateKey | None = None) -> Ed25519PrivateKey:
    """Write ``key`` (a new one when None) and its public half into ``directory``; returns the key."""
    key = key or generate_signing_key()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    atomic_write(directory / PRIVATE, private_key_to_pem(key).decode("ascii"), 0o600)
    atomic_write(directory / PUBLIC, public_key_to_pem(key.public_key()).decode("ascii"), 0o644)
    return key
