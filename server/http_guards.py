"""Listener hygiene for the HTTP transport: checks that run before a request reaches MCP or a webhook.

* ``OriginGuard``: the SDK's DNS-rebinding check (Host and Origin against allowed values) → 421 / 403.
* ``BodyLimit``: the SDK's body-size limit, answered as a JSON-RPC ``input_too_large`` error with 413.
* ``BodyDeadline``: the whole body must arrive within a deadline (408), so a client trickling bytes
  cannot hold a request open.
* ``HeadTimeoutH11``: uvicorn's h11 protocol, closing a connection whose request head does not arrive
  in time (uvicorn itself only times out idle keep-alive connections).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import mcp_types as types
from mcp.server.transport_security import (
    RequestBodyLimitMiddleware,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
)
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from datamachine_mcp.server.http_auth import send_json

HEAD_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT_SECONDS = 30.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def security_settings(
    bind_host: str, port: int, public_url: str, extra_origins: tuple[str, ...]
) -> TransportSecuritySettings:
    """Hosts and origins a request may name: loopback on any port, the listener, the public URL, and the
    origins given with ``--allow-origin``."""
    hosts = [f"{h}:*" for h in LOOPBACK_HOSTS] + list(LOOPBACK_HOSTS)
    origins = [f"http://{h}:*" for h in LOOPBACK_HOSTS] + [f"http://{h}" for h in LOOPBACK_HOSTS]
    listener = f"[{bind_host}]" if ":" in bind_host else bind_host
    hosts.append(f"{listener}:{port}")
    public = public_url.rstrip("/")
    scheme, _, rest = public.partition("://")
    authority = rest.split("/", 1)[0]
    hosts.append(authority)
    origins.append(f"{scheme}://{authority}")
    origins.extend(o.rstrip("/") for o in extra_origins)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=sorted(set(hosts)),
        allowed_origins=sorted(set(origins)),
    )


class OriginGuard:
    def __init__(self, app: ASGIApp, settings: TransportSecuritySettings) -> None:
        self.app = app
        self.check = TransportSecurityMiddleware(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = await self.check.validate_request(Request(scope), is_post=False)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """The SDK's ``RequestBodyLimitMiddleware`` around ``app``; its plain 413 becomes a JSON-RPC error."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        body = {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": types.INVALID_REQUEST,
                "message": f"input_too_large: the request body is over {max_bytes} bytes; send a smaller request.",
                "data": {"code": "input_too_large", "limit_bytes": max_bytes},
            },
        }
        self._refusal = json.dumps(body).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reached = False

        async def inner(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal reached
            reached = True
            await self.app(scope, receive, send)

        async def answer(message: Message) -> None:
            if reached:
                await send(message)
            elif message["type"] == "http.response.start":  # only the limiter answers without the app: too large
                await send_json(send, 413, self._refusal)

        await RequestBodyLimitMiddleware(inner, self.max_bytes)(scope, receive, answer)


class BodyTimeout(Exception):
    pass


class BodyDeadline:
    def __init__(self, app: ASGIApp, seconds: float = BODY_TIMEOUT_SECONDS) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.seconds
        complete = False
        started = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:  # afterwards only a disconnect can arrive; a stream may wait for it indefinitely
                return await receive()
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as scope_:
                message = await receive()
            if scope_.cancelled_caught:
                raise BodyTimeout
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, tracked_send)
        except BodyTimeout:
            if not started:
                await send_json(
                    send, 408, json.dumps({"error": "request_timeout"}).encode(), [(b"connection", b"close")]
                )


class HeadTimeoutH11(H11Protocol):
    """Closes a connection whose request line and headers are not complete within HEAD_TIMEOUT_SECONDS."""

    head_timeout = HEAD_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request head arrived
        elif waiting and self._head_timer is None:
            self._arm()  # the first bytes of a next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()
