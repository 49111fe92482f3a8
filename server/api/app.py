"""The operator API: JSON under ``/api/v1``, served over HTTPS by ``edgeherd server run`` (server/api/serve.py).

Every request but ``/api/v1/health`` and the OpenAPI schema carries ``Authorization: Bearer <token>``
(server/api/tokens.py). Who acts is the token's operator; what they may do is their role in
``operators.toml`` (server/governance.py) and the token's scope, checked here before anything runs:

- 401 for a missing, malformed, unknown, expired or revoked token;
- 429 once one client address has failed 10 times within a minute (each throttling is audited);
- 403 naming the role (or scope) an action needs;
- 404 for a device, version or rollout that does not exist;
- 409 for an action the registry refuses in its current state (an illegal lifecycle move, four-eyes, a rollout
  that cannot take the command), with the reason;
- 413 for a body over its cap (64 KiB of JSON; bundles up to ``EDGEHERD_API_MAX_BUNDLE``);
- 422 naming the field for a body or parameter that does not validate.

Routes live in :mod:`server.api.routes`; the objects they share (the registry, the governance, the caller)
come from :class:`ApiContext` through FastAPI's dependencies.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol.version import __version__
from server import audit
from server.api.tokens import Caller, TokenError, authenticate
from server.governance import Governance, GovernanceError, Permission
from server.registry import Registry
from server.tui.data import FleetData

__all__ = ["MAX_JSON_BODY", "ApiContext", "Operator", "create_app", "permit"]

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


class BodyLimit:
    """ASGI middleware: 413 for a request body over its cap, whether announced (Content-Length) or streamed.

    ``limits`` maps a path suffix to its cap; anything else gets ``default``."""

    def __init__(self, app: ASGIApp, *, default: int, limits: dict[str, int]) -> None:
        self.app, self.default, self.limits = app, default, limits

    def _cap(self, path: str) -> int:
        return next((cap for suffix, cap in self.limits.items() if path.endswith(suffix)), self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self._cap(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > cap):
                await _too_large(send, cap)
                return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:  # an HTTPException: FastAPI turns any other error raised while reading into a 400
                    raise _TooLarge(cap)
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except _TooLarge:
            if not started:
                await _too_large(send, cap)


class _TooLarge(HTTPException):
    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body over {cap} bytes")


async def _too_large(send: Send, cap: int) -> None:
    body = json.dumps({"detail": f"request body over {cap} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(registry: Registry, *, max_bundle: int) -> FastAPI:
    """The API over ``registry``; bundles up to ``max_bundle`` bytes."""
    from server.api import routes

    app = FastAPI(title="edgeherd operator API", version=__version__, openapi_url=f"{PREFIX}/openapi.json",
                  docs_url=None, redoc_url=None,
                  description="Operate an edgeherd fleet: devices, models and their approvals, rollouts, features "
                              "and drift, the audit log. Authenticate with `Authorization: Bearer <token>`.")
    app.state.context = ApiContext(registry)
    app.state.max_bundle = max_bundle

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own shape (a list of problems, each with the field's location), without echoing the input back
        problems = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                    for e in exc.errors()[:20]]
        return JSONResponse({"detail": problems}, status_code=422)

    for router in routes.ROUTERS:
        app.include_router(router, prefix=PREFIX)
    app.add_middleware(BodyLimit, default=MAX_JSON_BODY, limits={"/models/upload": max_bundle})
    return app


Handler = Callable[..., Awaitable[Any]]
