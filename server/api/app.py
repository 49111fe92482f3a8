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
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol.version import __version__
from server.api.auth import MAX_JSON_BODY, PREFIX, ApiContext
from server.registry import Registry

__all__ = ["BodyLimit", "create_app"]

log = logging.getLogger(__name__)

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
