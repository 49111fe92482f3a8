"""Who is calling the operator API and what they may do: bearer tokens checked against the registry, failed
attempts throttled per client address, and :func:`permit`, the dependency each route names its permission with.
The routes import this module; :mod:`server.api.app` assembles them into the application."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from server import audit
from server.api.tokens import Caller, TokenError, authenticate
from server.governance import Governance, GovernanceError, Permission
from server.registry import Registry
from server.tui.data import FleetData

__all__ = ["FAILURE_WINDOW", "MAX_FAILURES", "MAX_JSON_BODY", "PREFIX", "PUSH_SCOPE", "ApiContext", "FailureLimiter",
           "Operator", "context", "permit"]

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
#: Largest JSON request body, bytes.
MAX_JSON_BODY = 64 * 1024
#: What a ``push``-scoped token (a CI pipeline) may do, whatever its operator's role allows beyond that.
PUSH_SCOPE = frozenset({Permission.READ, Permission.PUSH_MODEL})
#: Failed authentications from one address within :data:`FAILURE_WINDOW` seconds before it gets 429.
MAX_FAILURES = 10
FAILURE_WINDOW = 60.0


class FailureLimiter:
    """Counts failed authentications per client address over a sliding window."""

    def __init__(self, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        q = self._failures.setdefault(address, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(address, now)
            return q[0] + self.window - now if len(q) >= self.limit else 0.0

    def fail(self, address: str) -> bool:
        """Count a failure; True when this one reached the limit (audit it once)."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(address, now)
            q.append(now)
            if len(self._failures) > 10_000:  # bounded: forget addresses with nothing recent
                for key in [k for k, v in self._failures.items() if not v or v[-1] <= now - self.window]:
                    del self._failures[key]
            return len(q) == self.limit


class ApiContext:
    """What every route needs: the registry and who may do what."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.limiter = FailureLimiter()

    def governance(self) -> Governance:
        """operators.toml as it is now (an admin may have added an operator since the last request)."""
        try:
            return Governance.load(self.registry.data, self.registry.engine)
        except GovernanceError as exc:
            raise HTTPException(503, f"the server's operators file cannot be used: {exc}") from None


@dataclass(frozen=True)
class Operator:
    """An authenticated, authorised caller, with the registry views bound to them."""

    caller: Caller
    governance: Governance
    context: ApiContext

    @property
    def name(self) -> str:
        return self.caller.operator

    @property
    def registry(self) -> Registry:
        return self.context.registry

    def fleet(self) -> FleetData:
        return FleetData(self.context.registry, self.governance, self.caller.operator)


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.context
    return ctx


_bearer = HTTPBearer(auto_error=False, description="An operator token: `edgeherd operator add` prints one.")


def authenticated(request: Request, ctx: Annotated[ApiContext, Depends(context)],
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """The token's caller; 401 (or 429 after repeated failures from the same address)."""
    address = request.client.host if request.client is not None else "unknown"
    wait = ctx.limiter.blocked_for(address)
    if wait > 0:
        raise HTTPException(429, f"too many failed authentications from {address}; try again in {wait:.0f} s",
                            headers={"Retry-After": str(int(wait) + 1)})
    try:
        with Session(ctx.registry.engine) as db:
            return authenticate(db, credentials.credentials if credentials is not None else None)
    except TokenError as exc:
        if ctx.limiter.fail(address):
            log.warning("operator API: %d failed authentications from %s within %.0f s; throttling",
                        ctx.limiter.limit, address, ctx.limiter.window)
            audit.append_with_retry(ctx.registry.engine, "system", "api.auth_throttled", f"address:{address}",
                                    {"failures": ctx.limiter.limit, "window_s": ctx.limiter.window,
                                     "last_error": str(exc)[:200]})
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


def permit(permission: Permission) -> Callable[..., Operator]:
    """A dependency: the caller, once their role and token scope allow ``permission``; else 403 saying why."""

    def dependency(ctx: Annotated[ApiContext, Depends(context)],
                   caller: Annotated[Caller, Depends(authenticated)]) -> Operator:
        gov = ctx.governance()
        if caller.scope == "push" and permission not in PUSH_SCOPE:
            raise HTTPException(403, f"token {caller.token_id} is scoped to pushing (read, push models and "
                                     f"features); {permission.value} needs a full-scope token")
        try:
            gov.require(caller.operator, permission)
        except GovernanceError as exc:
            raise HTTPException(403, str(exc)) from None
        return Operator(caller, gov, ctx)

    dependency.__name__ = f"permit_{permission.name.lower()}"
    return dependency
