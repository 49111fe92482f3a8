"""Base model shared by every wire message and the manifest."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, TypeVar, get_args

import pydantic
from pydantic import BaseModel, ConfigDict

from protocol.canonical import canonical_json, load_json
from protocol.errors import InvalidMessage, PayloadTooLarge, UnsupportedVersion
from protocol.ids import REQUEST_ID_PATTERN

__all__ = ["WireModel", "decode_model", "encode_model", "validate_value", "wire_bytes"]

#: Default cap on any free-text string; identifiers have tighter patterns.
MAX_STRING = 4096
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


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


def _versions(cls: type[WireModel]) -> tuple[int, ...]:
    """Payload versions ``cls`` accepts in ``v`` (empty for models without one, such as the manifest)."""
    field = cls.model_fields.get("v")
    return tuple(a for a in get_args(field.annotation) if isinstance(a, int)) if field is not None else ()


def _request_id_in(value: Any) -> str | None:
    rid = value.get("request_id") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) and _REQUEST_ID.fullmatch(rid) else None


def _read_request_id(cls: type[WireModel], payload: bytes) -> str | None:
    """The request id of a payload that failed strict parsing (duplicate keys, NaN...), read leniently so
    the reply can still name the request; the caller has checked the payload is within ``cls.MAX_BYTES``."""
    if "request_id" not in cls.model_fields:
        return None
    try:
        return _request_id_in(json.loads(bytes(payload).decode("utf-8", "replace")))
    except (ValueError, RecursionError):
        return None


def _check_version(cls: type[WireModel], value: Any) -> None:
    """A ``v`` outside the versions ``cls`` speaks is :class:`UnsupportedVersion`, before any other field is
    looked at: a newer version may well have fields this one does not know."""
    supported = _versions(cls)
    v = value.get("v") if isinstance(value, dict) else None
    if supported and isinstance(v, int) and not isinstance(v, bool) and v not in supported:
        rid = _request_id_in(value) if "request_id" in cls.model_fields else None
        raise UnsupportedVersion(cls.KIND, v, supported, request_id=rid)


def decode_model(cls: type[M], payload: bytes) -> M:
    """Decode untrusted bytes into ``cls``; raises only :class:`InvalidMessage`.

    The error carries the payload's ``request_id`` when it has one that can be read, even if the payload
    is otherwise invalid (within the size limit: an oversize payload is not read at all).
    """
    try:
        value = load_json(payload, kind=cls.KIND, max_bytes=cls.MAX_BYTES)
    except PayloadTooLarge:
        raise
    except InvalidMessage as exc:
        raise InvalidMessage(cls.KIND, exc.reason, request_id=_read_request_id(cls, payload)) from None
    _check_version(cls, value)
    rid = _request_id_in(value) if "request_id" in cls.model_fields else None
    try:
        return cls.model_validate_json(bytes(payload), strict=True)
    except pydantic.ValidationError as exc:
        raise InvalidMessage(cls.KIND, _describe(exc), request_id=rid) from None
    except (ValueError, RecursionError) as exc:  # defensive: parser limits
        raise InvalidMessage(cls.KIND, str(exc), request_id=rid) from None


def validate_value(cls: type[M], value: Any) -> M:
    """Validate an already-parsed JSON value (from :func:`load_json`)."""
    _check_version(cls, value)
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
