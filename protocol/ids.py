"""Constrained identifier types shared by every message.

Identifiers end up in MQTT topics, file names and SQL rows, so they are
restricted to characters that are safe in all three: no ``/``, ``+``, ``#``,
whitespace, or path traversal.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

__all__ = [
    "DEVICE_ID_PATTERN",
    "REQUEST_ID_PATTERN",
    "DeviceId",
    "Name",
    "RequestId",
    "Sha256Hex",
    "Version",
    "is_device_id",
]

#: Device ids double as MQTT user names and topic levels.
DEVICE_ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62})$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
"""Lower-case letters, digits and ``-``; 1–63 characters; starts with a letter or digit."""

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""Model, feature, artifact or profile name: 1–64 of ``A–Z a–z 0–9 . _ -``."""

Version = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")]
"""A version label such as ``1.4.0`` or ``2026.11.28+rc1``; 1–32 characters."""

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
"""A sha256 digest as 64 lower-case hex characters."""

#: Request and command ids.
REQUEST_ID_PATTERN = r"^[0-9a-f]{32}$"

RequestId = Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)]
"""A correlation id: 32 lower-case hex characters (a UUID4 without dashes)."""


def is_device_id(value: str) -> bool:
    """Return True when ``value`` is a valid device id."""
    return bool(_DEVICE_ID_RE.match(value))
