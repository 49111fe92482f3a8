"""Operators' API tokens: issued once, stored as a hash, expiring, revocable.

A token is ``eh_<id>_<secret>``: ``id`` is a public handle (``tok_…`` in listings, for revoking), ``secret`` 32
random bytes in URL-safe base64. The database keeps only the SHA-256 of the whole token (the secret is 256 bits of
randomness, so a fast hash is enough: nothing to brute-force), compared in constant time by lookup on that hash.

Scopes: ``full`` (whatever the operator's role allows) and ``push`` (read, push models and feature definitions:
what a CI pipeline needs, whatever the operator's role).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlmodel import Session, col, select

from server import audit
from server.db.models import OperatorToken
from server.errors import ServerError

__all__ = ["DEFAULT_TTL", "MAX_TTL", "SCOPES", "Caller", "TokenError", "authenticate", "issue", "revoke",
           "tokens_of"]

SCOPES = ("full", "push")
DEFAULT_TTL = timedelta(days=90)
MAX_TTL = timedelta(days=366)
_TOKEN = re.compile(r"^eh_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")


class TokenError(ServerError):
    """The token is missing, malformed, unknown, expired or revoked (the message says which, never the token)."""


@dataclass(frozen=True)
class Caller:
    """Who a request acts as: from the token, never from anything else the client sends."""

    operator: str
    token_id: str
    scope: str


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)  # SQLite hands back naive UTC


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue(db: Session, operator: str, *, created_by: str, scope: str = "full", ttl: timedelta = DEFAULT_TTL,
          label: str = "") -> tuple[str, OperatorToken]:
    """A new token for ``operator`` (the caller checked who may ask), audited; returns (token, row). The token is
    not stored: show it once."""
    if scope not in SCOPES:
        raise TokenError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if not timedelta(minutes=1) <= ttl <= MAX_TTL:
        raise TokenError(f"a token lives between 1 minute and {MAX_TTL.days} days")
    if len(label) > 128:
        raise TokenError("label: at most 128 characters")
    handle = secrets.token_hex(6)
    token = f"eh_{handle}_{secrets.token_urlsafe(32)}"
    row = OperatorToken(id=f"tok_{handle}", operator=operator, token_sha256=_digest(token), scope=scope,
                        label=label, created_by=created_by, expires_at=_now() + ttl)
    audit.lock(db)
    db.add(row)
    audit.append(db, created_by, "operator.token_issue", f"operator:{operator}",
                 {"token": row.id, "scope": scope, "expires_at": row.expires_at.isoformat(), "label": label})
    db.commit()
    db.refresh(row)
    return token, row


def authenticate(db: Session, token: str | None) -> Caller:
    """The caller a token stands for; :class:`TokenError` saying what is wrong with it."""
    if not token:
        raise TokenError("no token: send 'Authorization: Bearer <token>' (edgeherd login stores one)")
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise TokenError("malformed token: expected eh_<id>_<secret> as printed by edgeherd operator add")
    row = db.get(OperatorToken, f"tok_{match.group(1)}")
    if row is None or not hmac.compare_digest(row.token_sha256, _digest(token)):
        raise TokenError("unknown token")
    if row.revoked_at is not None:
        raise TokenError(f"token {row.id} was revoked")
    now = _now()
    if _utc(row.expires_at) <= now:
        raise TokenError(f"token {row.id} expired at {_utc(row.expires_at):%Y-%m-%d %H:%M} UTC; ask an admin for "
                         f"a new one")
    if row.last_used_at is None or now - _utc(row.last_used_at) > timedelta(minutes=1):
        row.last_used_at = now  # at most one write a minute per token
        db.add(row)
        db.commit()
    return Caller(row.operator, row.id, row.scope)


def tokens_of(db: Session, operator: str | None = None) -> list[OperatorToken]:
    """Every token (of ``operator``), newest first; the hashes stay in the database."""
    q = select(OperatorToken).order_by(col(OperatorToken.created_at).desc())
    if operator is not None:
        q = q.where(OperatorToken.operator == operator)
    return list(db.exec(q))


def revoke(db: Session, token_id: str, *, actor: str) -> OperatorToken:
    """Revoke a token by its id (``tok_…``), audited; revoking a revoked token changes nothing."""
    row = db.get(OperatorToken, token_id)
    if row is None:
        raise TokenError(f"no token {token_id!r} (edgeherd operator tokens lists them)")
    if row.revoked_at is None:
        audit.lock(db)
        row.revoked_at = _now()
        db.add(row)
        audit.append(db, actor, "operator.token_revoke", f"operator:{row.operator}", {"token": row.id})
        db.commit()
        db.refresh(row)
    return row
