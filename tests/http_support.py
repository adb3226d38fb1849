"""The HTTP listener on 127.0.0.1 for tests: the real app under the real uvicorn server, in this process,
and MCP clients (the SDK's streamable HTTP client) that present a bearer token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.server.http_app import HttpOptions, build_app
from datamachine_mcp.server.http_guards import security_settings
from datamachine_mcp.server.http_serve import bind, listener

MODERN = "2026-07-28"


@asynccontextmanager
async def listening(
    runtime: Runtime, *, worker: bool = False, allow_origins: tuple[str, ...] = (), **options: Any
) -> AsyncIterator[str]:
    """Serve ``runtime`` over HTTP on a free port; yields the base URL (also the runtime's public URL)."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    runtime.public_base_url = base
    assert runtime.engine is not None
    runtime.engine.public_base_url = base
    app = build_app(
        runtime,
        HttpOptions(security=security_settings("127.0.0.1", port, base, allow_origins), worker=worker, **options),
    )
    server = listener(app, signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no awaitable start
                await anyio.sleep(0.02)
        try:
            yield base
        finally:
            server.should_exit = True
    sock.close()


@asynccontextmanager
async def mcp_client(base: str, token: str | None, *, mode: str = "legacy", **kwargs: Any) -> AsyncIterator[Client]:
    """An SDK client on ``{base}/mcp`` sending ``Authorization: Bearer <token>``; ``mode`` is ``legacy``
    (the 2025-11-25 handshake) or the 2026-07-28 version (stateless)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http:
        transport = streamable_http_client(f"{base}/mcp", http_client=http)
        async with Client(transport, mode=mode, **kwargs) as client:
            yield client


def rpc(method: str, params: dict[str, Any] | None = None, id_: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params or {}}


INIT = rpc(
    "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
)
POST_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
