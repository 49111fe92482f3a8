"""Canonical JSON and content hashes.

Canonical JSON is what gets signed and what goes on the wire: UTF-8, keys
sorted, no insignificant whitespace, no NaN or Infinity. Parsing is strict:
duplicate keys, NaN/Infinity literals, invalid UTF-8 and payloads over the
caller's size cap are rejected with :class:`~protocol.errors.InvalidMessage`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from protocol.errors import InvalidMessage, PayloadTooLarge

__all__ = ["canonical_json", "load_json", "sha256_hex"]


def canonical_json(value: Any) -> bytes:
    """Serialise a JSON-compatible value to its canonical bytes."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """Content address of ``data``: its sha256 as 64 lower-case hex characters."""
    return hashlib.sha256(data).hexdigest()


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = val
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in edgeherd JSON")


def load_json(payload: bytes, *, kind: str, max_bytes: int) -> Any:
    """Parse untrusted JSON bytes strictly.

    Raises :class:`InvalidMessage` (never anything else) when the payload is
    larger than ``max_bytes`` (:class:`PayloadTooLarge`), not UTF-8, not JSON,
    nested too deeply, or uses duplicate keys or NaN/Infinity.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise InvalidMessage(kind, f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise PayloadTooLarge(kind, f"payload is {len(payload)} bytes, the limit is {max_bytes}")
    try:
        text = bytes(payload).decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError as exc:
        raise InvalidMessage(kind, f"payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise InvalidMessage(kind, "JSON is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, so are our hooks
        raise InvalidMessage(kind, f"payload is not valid JSON: {exc}") from None
