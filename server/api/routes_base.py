"""What the operator API's routers share: name patterns, request bodies that reject unknown fields, JSON for
dataclasses, and the error shapes of server/api/app.py (409 for a refusal, 422 naming the field)."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from typing import Annotated, Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEVICE", "NAME", "REF", "Body", "Ref", "as_object", "invalid", "plain", "refused"]

REF = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}:[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$"
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DEVICE = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
Ref = Annotated[str, Field(pattern=REF, description="NAME:VERSION")]


class Body(BaseModel):
    """Request bodies: unknown fields are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


def as_object(value: Any) -> dict[str, Any]:
    """A dataclass or dict as a JSON object."""
    out: dict[str, Any] = plain(value)
    return out


def plain(value: Any) -> Any:
    """Dataclasses, datetimes, tuples and numpy scalars as JSON values; a float that is not finite is null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()  # a numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def refused(exc: Exception) -> HTTPException:
    """409: the registry refuses the action in its current state; the message says why."""
    return HTTPException(409, str(exc))


def invalid(field: str, message: str, kind: str = "value_error") -> HTTPException:
    """422 naming the body field (``""``: the body as a whole) that does not hold, as FastAPI's own are shaped."""
    loc = ["body", *field.split(".")] if field else ["body"]
    return HTTPException(422, [{"loc": loc, "msg": message, "type": kind}])
