"""The ``sampling`` AI provider: the connected MCP client's model via ``sampling/createMessage``
for AI steps and send-chat-message (docs/engine.md, The AI step; Affinity).

The server remembers, per client connection of the handshake ("legacy") era, the latest request
session and who it acts as (:meth:`SamplingBridge.remember`, called through ``Notifications``). An AI
step asks :meth:`SamplingBridge.complete` with the job's ``origin_session_id`` and ``user_id``: the
origin session is tried first if it is still connected, then the user's other connections, most
recently active first (over stdio: the one client). Only clients that declared the ``sampling``
capability are used. send-chat-message passes its own request's session instead.

Errors are :class:`engine.errors.StepError`:

* ``sampling_unavailable`` (retryable): no connected session of the user offers sampling, or its
  protocol era has no back channel;
* ``sampling_timeout`` (retryable, class ``upstream``): the client did not answer within
  ``ai_request_timeout_seconds``;
* ``sampling_rejected`` (not retryable): the client answered with an error (e.g. the user declined);
* ``empty_ai_response`` (retryable): the reply has no text.

No token usage is reported (zeros). Tool messages and images are not used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.message import ServerMessageMetadata

from datamachine_mcp.engine.errors import StepError

if TYPE_CHECKING:  # the providers load httpx: imported when a completion is asked for
    from datamachine_mcp.engine.providers import AIRequest, AIResponse

log = logging.getLogger("datamachine.sampling")

DEFAULT_TIMEOUT = 120.0
CLOSED_CODES = frozenset({types.CONNECTION_CLOSED})


@dataclass
class _Seen:
    session: Any  # mcp.server.session.ServerSession of the connection's latest request
    user_id: int
    session_id: str | None
    at: float


def offers_sampling(session: Any) -> bool:
    caps = getattr(session, "client_capabilities", None)
    return caps is not None and getattr(caps, "sampling", None) is not None


def unavailable(detail: str) -> StepError:
    return StepError(
        "sampling_unavailable",
        f"No connected MCP client can sample for this request: {detail}. Connect a client that supports "
        "sampling (or choose the openai/anthropic provider).",
        retryable=True,
        provider="sampling",
    )


def messages_of(request: AIRequest) -> tuple[str | None, list[types.SamplingMessage]]:
    """(system prompt, messages): history then the user message; system turns join the system prompt."""
    system_parts = [request.system] if request.system else []
    messages: list[types.SamplingMessage] = []
    for role, text in getattr(request, "history", ()) or ():
        if role == "system":
            system_parts.append(text)
        elif role in ("user", "assistant"):
            messages.append(types.SamplingMessage(role=role, content=types.TextContent(type="text", text=text)))
    messages.append(types.SamplingMessage(role="user", content=types.TextContent(type="text", text=request.user)))
    return ("\n\n".join(system_parts) or None), messages


def _text(result: types.CreateMessageResult) -> str:
    content = result.content
    blocks = content if isinstance(content, list) else [content]
    return "".join(b.text for b in blocks if isinstance(b, types.TextContent))


class SamplingBridge:
    """``EngineServices.sampling``: completes AI requests through connected MCP clients.

    Callers pass ``timeout`` (the ``ai_request_timeout_seconds`` setting); ``timeout`` here is the
    fallback, then 120 s.
    """

    def __init__(self, *, timeout: float | None = None) -> None:
        self._seen: dict[Hashable, _Seen] = {}
        self.timeout = timeout

    # -- bookkeeping (called by the server on every request of a handshake-era connection) --------

    def remember(self, key: Hashable, session: Any, user_id: int, session_id: str | None = None) -> None:
        self._seen[key] = _Seen(session, user_id, session_id, time.monotonic())

    def forget(self, key: Hashable) -> None:
        self._seen.pop(key, None)

    def candidates(self, *, origin_session_id: str | None, user_id: int | None) -> list[tuple[Hashable, Any]]:
        """Connections to try, in order: the origin session, then the user's, most recent first."""
        rows = sorted(self._seen.items(), key=lambda kv: kv[1].at, reverse=True)
        first = [(k, s.session) for k, s in rows if origin_session_id is not None and s.session_id == origin_session_id]
        rest = [(k, s.session) for k, s in rows if s.user_id == user_id and (k, s.session) not in first]
        return [(k, s) for k, s in first + rest if offers_sampling(s)]

    # -- completing -----------------------------------------------------------------------------

    async def complete(
        self,
        request: AIRequest,
        *,
        origin_session_id: str | None = None,
        user_id: int | None = None,
        session: Any = None,
        related_request_id: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request limit passed to the SDK)
    ) -> AIResponse:
        """One completion. ``session`` (send-chat-message: the calling request's session) bypasses the
        lookup; otherwise the job's origin session or the user's connections are tried in order."""
        seconds = float(timeout or self.timeout or DEFAULT_TIMEOUT)
        if session is not None:
            if not offers_sampling(session):
                raise unavailable("the calling client did not declare the sampling capability")
            try:
                return await self._ask(session, request, seconds, related_request_id)
            except NoBackChannelError:
                raise unavailable("this connection's protocol era has no back channel for sampling") from None
            except _Gone:
                raise unavailable("the calling client's connection is closed") from None
        tried = self.candidates(origin_session_id=origin_session_id, user_id=user_id)
        if not tried:
            raise unavailable(f"no connected session of user {user_id} declared the sampling capability")
        for key, candidate in tried:
            try:
                return await self._ask(candidate, request, seconds, None)
            except NoBackChannelError:
                continue
            except _Gone:
                self.forget(key)
                continue
        raise unavailable("every connected session of the user is closed or has no back channel")

    async def _ask(self, session: Any, request: AIRequest, seconds: float, related: Any) -> AIResponse:
        from datamachine_mcp.engine.providers import AIResponse
        from datamachine_mcp.engine.providers.base import empty_response

        system, messages = messages_of(request)
        params = types.CreateMessageRequestParams(
            messages=messages,
            system_prompt=system,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            model_preferences=(
                types.ModelPreferences(hints=[types.ModelHint(name=request.model)]) if request.model else None
            ),
        )
        try:
            result = await session.send_request(
                types.CreateMessageRequest(params=params),
                types.CreateMessageResult,
                request_read_timeout_seconds=seconds,
                metadata=ServerMessageMetadata(related_request_id=related),
            )
        except NoBackChannelError:
            raise
        except MCPError as err:
            if err.code in CLOSED_CODES:
                raise _Gone() from None
            if err.code == types.REQUEST_TIMEOUT:
                raise StepError(
                    "sampling_timeout",
                    f"The MCP client did not answer the sampling request within {seconds:g} s",
                    retryable=True,
                    error_class="upstream",
                    provider="sampling",
                ) from None
            raise StepError(
                "sampling_rejected",
                f"The MCP client refused the sampling request: {err.message}",
                retryable=False,
                provider="sampling",
                diagnostics={"mcp_error_code": err.code},
            ) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
            log.debug("sampling session unusable: %r", exc)
            raise _Gone() from None
        text = _text(result)
        if not text.strip():
            raise empty_response("sampling")
        return AIResponse(
            text=text,
            prompt_tokens=0,
            completion_tokens=0,
            total_tokens=0,
            finish_reason=result.stop_reason if isinstance(result.stop_reason, str) else None,
            model=result.model or request.model,
        )


class _Gone(Exception):
    """The connection is closed: forget it and try the next one."""
