"""AI providers over HTTP (docs/engine.md, The AI step): ``openai`` and ``anthropic``.

``complete(provider, request, *, base_url, api_key, version, outbound, timeout)`` sends one
request through :class:`engine.http.Outbound` (provider base URLs are set by global admins, so the
private-network rule does not apply to them) and returns an :class:`AIResponse`. Errors are
:class:`engine.errors.StepError` with the ``http_*`` codes (``provider`` set, so the retry
classification's message heuristic applies), ``provider_not_configured`` and ``empty_ai_response``
(retryable, class ``upstream``). ``sampling`` is served by the MCP bridge, not here. Hold
``ai_slots(settings.int("ai_max_concurrent_requests"))`` around each call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.providers import anthropic, openai
from datamachine_mcp.engine.providers.base import AIRequest, AIResponse, ai_slots

__all__ = ["HTTP_PROVIDERS", "AIRequest", "AIResponse", "ai_slots", "complete", "provider_settings"]

HTTP_PROVIDERS = ("openai", "anthropic")


def provider_settings(snap: Mapping[str, Any], provider: str) -> dict[str, Any]:
    """``{base_url, version}`` of a provider from the ``ai_providers`` setting (API keys: decrypt separately)."""
    fields = dict((snap.get("ai_providers") or {}).get(provider) or {})
    return {"base_url": fields.get("base_url"), "version": fields.get("version")}


async def complete(
    provider: str,
    request: AIRequest,
    *,
    base_url: str | None,
    api_key: str | None,
    version: str | None = None,
    outbound: Outbound,
    timeout: float | None = None,  # noqa: ASYNC109 (a per-request limit, not a cancel scope)
) -> AIResponse:
    """One completion from ``provider``; ``timeout`` defaults to ``ai_request_timeout_seconds``."""
    seconds = float(timeout if timeout is not None else int(outbound.settings["ai_request_timeout_seconds"]))
    if provider == "openai":
        return await openai.complete(request, base_url=base_url, api_key=api_key, outbound=outbound, timeout=seconds)
    if provider == "anthropic":
        return await anthropic.complete(
            request, base_url=base_url, api_key=api_key, version=version, outbound=outbound, timeout=seconds
        )
    raise StepError(
        "provider_not_configured",
        f"Provider '{provider}' is not an HTTP provider (HTTP providers: {', '.join(HTTP_PROVIDERS)})",
        retryable=False,
    )
