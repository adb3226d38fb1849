"""AI provider requests and responses (docs/engine.md, The AI step)."""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass
from typing import Any

import anyio

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.http import Response, display_url, excerpt, status_error


@dataclass(frozen=True)
class AIRequest:
    model: str
    user: str
    system: str | None = None
    max_tokens: int = 1024
    temperature: float | None = None
    # Earlier turns of a conversation, oldest first, as (role, text) with role user/assistant/system;
    # sent before ``user`` (send-chat-message). AI steps send none.
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AIResponse:
    text: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    finish_reason: str | None
    model: str

    @property
    def token_usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


_LIMITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()


def ai_slots(n: int) -> anyio.CapacityLimiter:
    """The process-wide limiter of AI requests in flight (``ai_max_concurrent_requests``).

    One limiter per event loop, resized to ``n`` on every call (a settings change applies to the
    next acquisitions; holders keep their slots). Use ``async with ai_slots(n): ...``.
    """
    loop = asyncio.get_running_loop()
    limiter = _LIMITERS.get(loop)
    total = max(1, int(n))
    if limiter is None:
        limiter = anyio.CapacityLimiter(total)
        _LIMITERS[loop] = limiter
    elif limiter.total_tokens != total:
        limiter.total_tokens = total
    return limiter


def empty_response(provider: str) -> StepError:
    return StepError(
        "empty_ai_response",
        f"The {provider} provider returned an empty completion",
        retryable=True,
        error_class="upstream",
        provider=provider,
    )


def parse_json(response: Response, provider: str, url: str) -> dict[str, Any]:
    try:
        document = json.loads(response.content)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise StepError(
            "invalid_response",
            f"The {provider} provider returned a body that is not a JSON object",
            http_status=response.status,
            provider=provider,
            diagnostics={"url": display_url(url), "body": excerpt(response.content)},
        )
    return document


def provider_error(response: Response, provider: str, url: str) -> StepError:
    """The ``http_*`` error for a failed provider call, with the provider's own message."""
    message = None
    diagnostics: dict[str, Any] = {"provider": provider}
    try:
        document = json.loads(response.content)
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict):
            if isinstance(error.get("message"), str):
                message = error["message"]
            if isinstance(error.get("type"), str):
                diagnostics["error_type"] = error["type"]
            if isinstance(error.get("code"), str | int):
                diagnostics["error_code"] = error["code"]
        elif isinstance(error, str):
            message = error
        elif isinstance(document.get("message"), str):
            message = document["message"]
    return status_error(
        response.status,
        method="POST",
        url=url,
        headers=response.headers,
        body=response.content,
        message=message,
        diagnostics=diagnostics,
        provider=provider,
    )


def int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
