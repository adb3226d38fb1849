"""A test-only loopback proxy that adds ``Authorization: Bearer <token>`` to every request it forwards.

The MCP conformance suite's CLI cannot send a header; the server has no unauthenticated mode (and never
will), so the suite talks to this proxy, which streams each request and response through unchanged
(Host and Origin included, for the DNS-rebinding scenario) apart from the credential.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import uvicorn

from datamachine_mcp.server.http_serve import bind

HOP_BY_HOP = {b"authorization", b"connection", b"content-length", b"transfer-encoding", b"keep-alive"}


class BearerProxy:
    def __init__(self, upstream: str, token: str, client: httpx.AsyncClient) -> None:
        self.upstream = upstream.rstrip("/")
        self.token = token
        self.client = client

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        headers.append((b"authorization", f"Bearer {self.token}".encode()))
        query = b"?" + scope["query_string"] if scope["query_string"] else b""
        url = self.upstream + (scope["raw_path"] + query).decode()
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        response = await self.client.send(request, stream=True)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP],
                }
            )
            async with anyio.create_task_group() as tg:

                async def until_client_leaves() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(until_client_leaves)
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()
        finally:
            await response.aclose()


@asynccontextmanager
async def bearer_proxy(upstream: str, token: str) -> AsyncIterator[str]:
    """Serve the proxy on a free loopback port; yields its base URL."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
        server = uvicorn.Server(uvicorn.Config(BearerProxy(upstream, token, client), log_config=None, lifespan="on"))
        server.capture_signals = contextlib.nullcontext  # the test runner keeps its own signal handlers
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - uvicorn offers no awaitable start
                    await anyio.sleep(0.02)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
    sock.close()
