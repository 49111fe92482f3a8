"""Exceptions raised by :mod:`protocol`.

Every decoder in this package raises only these, whatever bytes it is fed::

    ProtocolError
    ├── InvalidMessage        payload is not a valid message (bad JSON, schema, size)
    │   └── ChunkFormatError  artifact chunk frame is malformed or its hash is wrong
    ├── TopicError            topic is not part of the edgeherd/v1 tree
    ├── SignatureError        manifest signature is missing, malformed or does not verify
    └── KeyFormatError        a signing key cannot be loaded
"""

from __future__ import annotations

__all__ = [
    "ChunkFormatError",
    "InvalidMessage",
    "KeyFormatError",
    "ProtocolError",
    "SignatureError",
    "TopicError",
]


class ProtocolError(Exception):
    """Base class of everything :mod:`protocol` raises."""


class InvalidMessage(ProtocolError):
    """A payload could not be decoded into the expected message.

    ``kind`` names the message type that was expected, ``reason`` says what to
    fix, in words a person can act on.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"invalid {kind} message: {reason}")
        self.kind = kind
        self.reason = reason


class ChunkFormatError(InvalidMessage):
    """An artifact chunk frame is truncated, oversize, or fails its hash."""

    def __init__(self, reason: str) -> None:
        super().__init__("artifact chunk", reason)


class TopicError(ProtocolError):
    """A topic string is not one of the edgeherd/v1 topics."""


class SignatureError(ProtocolError):
    """A signed manifest does not verify against the pinned key."""


class KeyFormatError(ProtocolError):
    """A key file's contents cannot be parsed as an Ed25519 key."""
