"""Who an HTTP request to the MCP endpoint acts as: its bearer token, verified on every request
(docs/access.md, Per transport).

Missing, malformed, unknown, expired and revoked tokens, and tokens of an inactive agent, get 401 with
``WWW-Authenticate: Bearer error="invalid_token"`` before any MCP processing. A verified request carries
its principal in the ASGI scope, and the SDK's authenticated user names the token, so the SDK's session
manager binds a handshake-era session to the token that opened it (another token gets 404). There is no
OAuth: nothing here advertises authorization-server metadata.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.abilities.tokens import TokenRejected, verify_token

log = logging.getLogger("datamachine.http")

PRINCIPAL_KEY = "datamachine.principal"
INVALID_TOKEN = json.dumps({"error": "invalid_token"}).encode()


async def send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def bearer(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class BearerGate:
    """Admits a request to ``app`` only with a valid token; puts its principal in the scope."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        token = bearer(headers)
        principal = None
        if token is not None:
            try:
                principal = await verify_token(
                    self.runtime.db,
                    self.runtime.settings,
                    token,
                    transport="http",
                    session_id=headers.get(MCP_SESSION_ID_HEADER),
                )
            except TokenRejected as exc:
                log.debug("request refused: token %s", exc.reason)
        if principal is None:
            await send_json(send, 401, INVALID_TOKEN, [(b"www-authenticate", b'Bearer error="invalid_token"')])
            return
        scope[PRINCIPAL_KEY] = principal
        # The SDK binds a session to the identity that opened it; the token id is that identity.
        scope["user"] = AuthenticatedUser(AccessToken(token="", client_id=f"token-{principal.token_id}", scopes=[]))
        await self.app(scope, receive, send)


async def request_principal(ctx: ServerRequestContext[Any, Any]) -> Principal:
    """The principal ``BearerGate`` resolved for the HTTP request behind ``ctx``."""
    request = ctx.request
    principal = getattr(request, "scope", {}).get(PRINCIPAL_KEY) if request is not None else None
    if not isinstance(principal, Principal):
        raise AbilityError("unauthenticated", "This request carries no verified bearer token.")
    return principal
