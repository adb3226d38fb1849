"""What the AI step (docs/engine.md, The AI step) and send-chat-message share: provider/model
resolution and one completion from an HTTP provider (``openai``/``anthropic``).

Each caller keeps its own resolution order (the sources before the agent), its own sampling path,
API-key decryption and error messages; ``ai_max_concurrent_requests`` is the caller's to hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.providers import AIRequest, AIResponse, complete, provider_settings


def first_text(*values: Any) -> str:
    """The first value that is a non-blank string, stripped ("" when there is none)."""
    for value in values:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def resolve_provider_model(
    overrides: Iterable[tuple[Any, Any]], agent_cfg: Mapping[str, Any], mode: str, settings: Mapping[str, Any]
) -> tuple[str, str]:
    """Provider and model, each separately from the first non-empty of: the ``(provider, model)`` pairs of
    ``overrides`` in order, the agent's ``mode_models[mode]``, its ``default_provider``/``default_model``,
    the settings' ``default_provider``/``default_model``."""
    mode_models = (agent_cfg.get("mode_models") or {}).get(mode) or {}
    if not isinstance(mode_models, dict):
        mode_models = {}
    sources = [
        *overrides,
        (mode_models.get("provider"), mode_models.get("model")),
        (agent_cfg.get("default_provider"), agent_cfg.get("default_model")),
        (settings["default_provider"], settings["default_model"]),
    ]
    return first_text(*(p for p, _ in sources)), first_text(*(m for _, m in sources))


async def complete_http(
    provider: str, request: AIRequest, *, settings: Any, api_key: str | None, version: str
) -> AIResponse:
    """One completion from an HTTP provider with its ``ai_providers`` options (base_url, version) and the
    ``ai_request_timeout_seconds`` limit; ``version`` is the server's (the User-Agent)."""
    options = provider_settings(settings, provider)
    timeout = settings.int("ai_request_timeout_seconds")
    async with Outbound(settings, version=version, timeout=timeout) as outbound:
        return await complete(
            provider,
            request,
            base_url=options["base_url"],
            api_key=api_key,
            version=options["version"],
            outbound=outbound,
            timeout=timeout,
        )
