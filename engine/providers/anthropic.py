"""``anthropic`` provider: the Messages API."""

from __future__ import annotations

import json
from typing import Any

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.providers.base import (
    AIRequest,
    AIResponse,
    empty_response,
    int_or_zero,
    parse_json,
    provider_error,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"


async def complete(
    request: AIRequest,
    *,
    base_url: str | None,
    api_key: str | None,
    version: str | None,
    outbound: Outbound,
    timeout: float,  # noqa: ASYNC109 (a per-request limit, not a cancel scope)
) -> AIResponse:
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    if not api_key and base == DEFAULT_BASE_URL:
        raise StepError(
            "provider_not_configured",
            "The anthropic provider needs an API key for https://api.anthropic.com "
            "(update-settings ai_providers.anthropic.api_key)",
            retryable=False,
        )
    # The Messages API has no system role in messages: earlier system turns join the system prompt.
    turns = [{"role": role, "content": text} for role, text in request.history if role in ("user", "assistant")]
    system = "\n\n".join([request.system or "", *(t for r, t in request.history if r == "system")]).strip()
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": [*turns, {"role": "user", "content": request.user}],
    }
    if system:
        body["system"] = system
    if request.temperature is not None:
        body["temperature"] = request.temperature
    headers = {"Accept": "application/json", "anthropic-version": version or DEFAULT_VERSION}
    if api_key:
        headers["x-api-key"] = api_key
    url = f"{base}/v1/messages"
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    response = await outbound.post_json(url, payload, headers=headers, timeout=timeout, check=False, allow_private=True)
    if not 200 <= response.status < 300:
        raise provider_error(response, "anthropic", url)
    document = parse_json(response, "anthropic", url)
    blocks = document.get("content")
    text = ""
    if isinstance(blocks, list):
        text = "".join(
            b["text"]
            for b in blocks
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
    if not text.strip():
        raise empty_response("anthropic")
    raw_usage = document.get("usage")
    usage = raw_usage if isinstance(raw_usage, dict) else {}
    prompt = int_or_zero(usage.get("input_tokens"))
    completion = int_or_zero(usage.get("output_tokens"))
    stop = document.get("stop_reason")
    model = document.get("model")
    return AIResponse(
        text=text,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        finish_reason=stop if isinstance(stop, str) else None,
        model=model if isinstance(model, str) and model else request.model,
    )
