"""Base model shared by every wire message and the manifest."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict

from protocol.canonical import canonical_json, load_json
from protocol.errors import InvalidMessage

__all__ = ["WireModel", "decode_model", "encode_model", "validate_value", "wire_bytes"]

#: Default cap on any free-text string; identifiers have tighter patterns.
MAX_STRING = 4096


class WireModel(BaseModel):
    """Frozen, strict, closed: unknown fields and coerced types are rejected."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        str_max_length=MAX_STRING,
        populate_by_name=True,
    )

    #: Largest encoded payload accepted for this message type.
    MAX_BYTES: ClassVar[int] = 64 * 1024
    #: Human name used in error messages.
    KIND: ClassVar[str] = "message"


M = TypeVar("M", bound=WireModel)


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode_model(cls: type[M], payload: bytes) -> M:
    """Decode untrusted bytes into ``cls``; raises only :class:`InvalidMessage`."""
    load_json(payload, kind=cls.KIND, max_bytes=cls.MAX_BYTES)
    try:
        return cls.model_validate_json(bytes(payload), strict=True)
    except pydantic.ValidationError as exc:
        raise InvalidMessage(cls.KIND, _describe(exc)) from None
    except (ValueError, RecursionError) as exc:  # defensive: parser limits
        raise InvalidMessage(cls.KIND, str(exc)) from None


def validate_value(cls: type[M], value: Any) -> M:
    """Validate an already-parsed JSON value (from :func:`load_json`)."""
    try:
        return cls.model_validate_json(canonical_json(value), strict=True)
    except pydantic.ValidationError as exc:
        raise InvalidMessage(cls.KIND, _describe(exc)) from None


def wire_bytes(msg: WireModel) -> bytes:
    """Canonical JSON of ``msg`` as sent and signed: aliases used, ``null`` fields left out."""
    return canonical_json(msg.model_dump(mode="json", by_alias=True, exclude_none=True))


def encode_model(msg: WireModel) -> bytes:
    """Canonical JSON bytes of ``msg``; raises :class:`InvalidMessage` if over its cap."""
    data = wire_bytes(msg)
    if len(data) > msg.MAX_BYTES:
        raise InvalidMessage(msg.KIND, f"encoded size {len(data)} exceeds the limit of {msg.MAX_BYTES} bytes")
    return data
