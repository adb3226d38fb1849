"""The HTTP listener as one ASGI app: MCP streamable HTTP at ``/mcp``, the webhook routes, ``GET /health``.

``/mcp`` serves the same tools, resources and notifications as stdio, in both protocol eras the SDK
speaks (the 2025-11-25 handshake with ``Mcp-Session-Id``, and the stateless 2026-07-28 era with
``subscriptions/listen``), through the SDK's session manager. In front of it, outermost first: the
Host/Origin check, the bearer token (401 before any MCP processing) and the body limit. Every route's
body must arrive within a deadline. Calls that do work are rate-limited per token inside the MCP server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.engine.host import EngineHost
from datamachine_mcp.resources.registry import load_all as load_resources
from datamachine_mcp.server.app import DataMachineServer
from datamachine_mcp.server.http_auth import BearerGate, request_principal
from datamachine_mcp.server.http_guards import BODY_TIMEOUT_SECONDS, BodyDeadline, BodyLimit, OriginGuard
from datamachine_mcp.server.http_limits import RateLimit
from datamachine_mcp.server.webhooks_http import webhook_routes

MCP_PATH = "/mcp"
MAX_BODY_BYTES = 4 * 1024 * 1024  # tool inputs are at most 1 MiB per object argument; room for several
SESSION_IDLE_SECONDS = 30 * 60  # a handshake session unused this long is closed (its client initializes again)


@dataclass(frozen=True)
class HttpOptions:
    security: TransportSecuritySettings
    worker: bool = True
    concurrency: int = 4
    max_body_bytes: int = MAX_BODY_BYTES
    session_idle_seconds: float = SESSION_IDLE_SECONDS
    body_timeout_seconds: float = BODY_TIMEOUT_SECONDS


def build_app(runtime: Runtime, options: HttpOptions) -> Starlette:
    """The listener's app; its lifespan runs the MCP sessions, the change watch and (unless disabled) the
    in-process engine."""
    mcp = DataMachineServer(runtime, runtime.catalog, load_resources(), request_principal)
    mcp.server.middleware.append(RateLimit(runtime))
    manager = StreamableHTTPSessionManager(
        app=mcp.server,
        security_settings=options.security,
        max_request_body_size=options.max_body_bytes,
        session_idle_timeout=options.session_idle_seconds,
    )
    endpoint: ASGIApp = BodyLimit(manager.handle_request, options.max_body_bytes)
    endpoint = BearerGate(endpoint, runtime)
    endpoint = OriginGuard(endpoint, options.security)
    engine = runtime.engine
    assert engine is not None  # open_runtime attaches one

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        host = EngineHost(engine, concurrency=options.concurrency) if options.worker else None
        async with manager.run(), anyio.create_task_group() as tg:
            tg.start_soon(mcp.notifications.watch_other_processes, runtime.db)
            if host is not None:
                await host.start()
            try:
                yield
            finally:
                if host is not None:
                    await host.stop()
                mcp.notifications.close()
                tg.cancel_scope.cancel()

    routes = [
        Route(MCP_PATH, endpoint),  # an ASGI app: every method reaches it
        Route("/health", health, methods=["GET"]),
        *webhook_routes(engine),
    ]
    # Every route's body must arrive in time (the MCP endpoint's and the webhooks').
    deadline = Middleware(BodyDeadline, seconds=options.body_timeout_seconds)
    return Starlette(routes=routes, lifespan=lifespan, middleware=[deadline])
