"""Exceptions raised by :mod:`protocol`.

Every decoder in this package raises only these, whatever bytes it is fed::

    ProtocolError
    ├── InvalidMessage        payload is not a valid message (bad JSON, schema, size)
    │   ├── PayloadTooLarge   payload is over its message's size limit (rejected unread)
    │   ├── UnsupportedVersion  payload's ``v`` is not a version this receiver speaks
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
    "PayloadTooLarge",
    "ProtocolError",
    "SignatureError",
    "TopicError",
    "UnsupportedVersion",
]


class ProtocolError(Exception):
    """Base class of everything :mod:`protocol` raises."""


class InvalidMessage(ProtocolError):
    """A payload could not be decoded into the expected message.

    ``kind`` names the message type that was expected, ``reason`` says what to
    fix, in words a person can act on. ``request_id`` is the id the payload
    carried, when one could be read from it, so a reply can name the request.
    """

    def __init__(self, kind: str, reason: str, *, request_id: str | None = None) -> None:
        super().__init__(f"invalid {kind} message: {reason}")
        self.kind = kind
        self.reason = reason
        self.request_id = request_id


class PayloadTooLarge(InvalidMessage):
    """A payload is larger than its message's size limit; it was not parsed."""


class UnsupportedVersion(InvalidMessage):
    """A payload's ``v`` is a version this receiver does not speak; ``supported`` lists those it does."""

    def __init__(self, kind: str, version: int, supported: tuple[int, ...], *,
                 request_id: str | None = None) -> None:
        speaks = ", ".join(str(v) for v in supported)
        super().__init__(kind, f"payload version {version} is not supported; supported versions: {speaks}",
                         request_id=request_id)
        self.version = version
        self.supported = supported


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
