"""``openai`` provider: any OpenAI-compatible Chat Completions endpoint."""

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

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def _content(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


async def complete(
    request: AIRequest,
    *,
    base_url: str | None,
    api_key: str | None,
    outbound: Outbound,
    timeout: float,  # noqa: ASYNC109 (a per-request limit, not a cancel scope)
) -> AIResponse:
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    if not api_key and base == DEFAULT_BASE_URL:
        raise StepError(
            "provider_not_configured",
            "The openai provider needs an API key for https://api.openai.com/v1 "
            "(update-settings ai_providers.openai.api_key, or set base_url to a local OpenAI-compatible server)",
            retryable=False,
        )
    messages = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.extend({"role": role, "content": text} for role, text in request.history)
    messages.append({"role": "user", "content": request.user})
    body: dict[str, Any] = {"model": request.model, "messages": messages, "max_tokens": request.max_tokens}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = f"{base}/chat/completions"
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    response = await outbound.post_json(url, payload, headers=headers, timeout=timeout, check=False, allow_private=True)
    if not 200 <= response.status < 300:
        raise provider_error(response, "openai", url)
    document = parse_json(response, "openai", url)
    choices = document.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    text = _content(choice.get("message"))
    if not text.strip():
        raise empty_response("openai")
    raw_usage = document.get("usage")
    usage = raw_usage if isinstance(raw_usage, dict) else {}
    prompt = int_or_zero(usage.get("prompt_tokens"))
    completion = int_or_zero(usage.get("completion_tokens"))
    total = int_or_zero(usage.get("total_tokens")) or prompt + completion
    finish = choice.get("finish_reason")
    model = document.get("model")
    return AIResponse(
        text=text,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        finish_reason=finish if isinstance(finish, str) else None,
        model=model if isinstance(model, str) and model else request.model,
    )
