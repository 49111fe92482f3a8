"""Agent releases: the agent itself as a signed bundle (docs/agent.md, "Updating the agent").

An agent release names one edgeherd version built for one device Python, and one artifact: a tar of a
wheelhouse (``wheelhouse/*.whl``) and the ``requirements.txt`` that pins every wheel by sha256, kept in the
server's content store and fetched in chunks like a model artifact. The release is signed by the same key
as model bundles (Ed25519 over :data:`SIGNING_PREFIX` and its canonical JSON), so a device installs only what
its server signed.

The device reports how an update went in :class:`AgentUpdate` (in its state message).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, ClassVar, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, Field, StringConstraints

from protocol._model import WireModel, wire_bytes
from protocol.canonical import sha256_hex
from protocol.errors import SignatureError
from protocol.ids import Sha256Hex, Version
from protocol.signing import Signature, key_id

__all__ = [
    "AGENT_RELEASE_SCHEMA",
    "MAX_AGENT_ARTIFACT_BYTES",
    "AgentRelease",
    "AgentUpdate",
    "AgentUpdateStep",
    "SignedAgentRelease",
    "release_digest",
    "sign_agent_release",
    "verify_agent_release",
]

AGENT_RELEASE_SCHEMA: Literal["edgeherd.agent-release/1"] = "edgeherd.agent-release/1"
#: Signed before the canonical JSON, so a release's signature can never pass for a manifest's or a statement's.
SIGNING_PREFIX = b"edgeherd.agent-release.v1\n"
#: An agent's wheelhouse with its dependencies is tens of MB; 512 MiB is the most a device fetches.
MAX_AGENT_ARTIFACT_BYTES = 512 * 1024**2
PythonVersion = Annotated[str, StringConstraints(pattern=r"^3\.[0-9]{1,2}$")]
Reason = Annotated[str, StringConstraints(max_length=1000)]


class AgentRelease(WireModel):
    """One agent version for one device Python: what the signature covers."""

    schema_: Literal["edgeherd.agent-release/1"] = Field(default=AGENT_RELEASE_SCHEMA, alias="schema")
    version: Version
    #: ``major.minor`` of the Python the wheels are for; a device running another Python refuses the release.
    python: PythonVersion
    #: sha256 and size of the tar (``wheelhouse/`` + ``requirements.txt``) in the content store.
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=1, le=MAX_AGENT_ARTIFACT_BYTES)]
    created_at: AwareDatetime
    notes: Annotated[str, StringConstraints(max_length=1000)] = ""


class SignedAgentRelease(WireModel):
    KIND: ClassVar[str] = "signed agent release"
    MAX_BYTES: ClassVar[int] = 4096

    release: AgentRelease
    signature: Signature


def release_digest(release: AgentRelease) -> str:
    """sha256 of the release's canonical JSON: its identity in the registry."""
    return sha256_hex(wire_bytes(release))


def sign_agent_release(release: AgentRelease, key: Ed25519PrivateKey) -> SignedAgentRelease:
    sig = key.sign(SIGNING_PREFIX + wire_bytes(release))
    return SignedAgentRelease(release=release, signature=Signature(
        key_id=key_id(key.public_key()), value=base64.b64encode(sig).decode("ascii")))


def verify_agent_release(signed: SignedAgentRelease, trusted: Mapping[str, Ed25519PublicKey]) -> AgentRelease:
    """The release if it is signed by one of ``trusted`` (``{key id: key}``); SignatureError naming the key."""
    signer = signed.signature.key_id
    pub = trusted.get(signer)
    if pub is None:
        raise SignatureError(f"agent release {signed.release.version} is signed by key {signer}, which this "
                             f"device does not trust (trusted: {', '.join(sorted(trusted))})")
    try:
        pub.verify(base64.b64decode(signed.signature.value), SIGNING_PREFIX + wire_bytes(signed.release))
    except InvalidSignature:
        raise SignatureError(f"signature of agent release {signed.release.version} does not match its contents: "
                             f"it was altered after signing, or signed with another key") from None
    return signed.release


class AgentUpdateStep(str, Enum):
    """How far the device got with an agent release."""

    INSTALLING = "installing"  # downloading, verifying, making the new environment
    TRIAL = "trial"  # switched; the new agent must report healthy before the deadline
    DONE = "done"  # the new agent runs and reported healthy
    FAILED = "failed"  # refused or could not be installed; the old agent runs on
    ROLLED_BACK = "rolled_back"  # the new agent did not come up healthy; switched back to the old one


class AgentUpdate(WireModel):
    """In the device's state: the agent release it was last asked to run, and how that went."""

    version: Version
    step: AgentUpdateStep
    #: Why it failed or was rolled back.
    error: Reason | None = None
