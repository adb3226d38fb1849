"""The AI step (docs/engine.md, The AI step): resolve provider and model, build the messages, call the provider."""

from __future__ import annotations

from typing import Any

from datamachine_mcp.engine.ai_call import complete_http, resolve_provider_model
from datamachine_mcp.engine.catalog import StepType
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.providers import AIRequest, AIResponse
from datamachine_mcp.engine.steps import StepResult, StepRun, failure
from datamachine_mcp.engine.steps.queues import take
from datamachine_mcp.storage.crypto import SecretUnavailable
from datamachine_mcp.storage.models import Agent
from datamachine_mcp.storage.timeutil import iso

DEFAULT_MAX_TOKENS = 1024
IDENTITY_KEYS = ("source_type", "handler", "flow_step_id", "pipeline_id", "flow_id", "item_identifier", "source_url")


async def agent_config(run: StepRun) -> dict[str, Any]:
    if run.job.agent_id is None:
        return {}
    async with run.services.db.read() as session:
        agent = await session.get(Agent, run.job.agent_id)
        return dict(agent.agent_config or {}) if agent is not None else {}


def resolve(step: dict[str, Any], agent_cfg: dict[str, Any], settings: Any) -> tuple[str, str]:
    """Provider and model, each from the first non-empty of step, agent pipeline mode, agent default, settings."""
    return resolve_provider_model([(step.get("provider"), step.get("model"))], agent_cfg, "pipeline", settings)


def user_message(prompt: str | None, packet: dict[str, Any] | None) -> str:
    parts = [prompt] if prompt else []
    if packet is not None:
        data = packet.get("data") or {}
        meta = packet.get("metadata") or {}
        text = f"Title: {data.get('title') or ''}\n\n{data.get('content_string') or data.get('body') or ''}"
        if meta.get("source_url"):
            text += f"\n\nSource: {meta['source_url']}"
        parts.append(text)
    return "\n\n".join(parts)


def first_line_title(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip().lstrip("#").strip()
        if stripped:
            return stripped[:200]
    return ""


async def call_provider(run: StepRun, provider: str, request: AIRequest) -> AIResponse:
    settings = run.settings
    if provider == "sampling":
        origin = (run.engine_data.get("job") or {}).get("origin_session_id")
        return await run.services.sampling.complete(
            request,
            origin_session_id=origin,
            user_id=run.job.user_id,
            timeout=settings.int("ai_request_timeout_seconds"),
        )
    providers = settings["ai_providers"]
    if provider not in providers:
        raise StepError("provider_not_configured", f"Unknown AI provider '{provider}'.", retryable=False)
    try:
        api_key = run.services.settings.decrypt_api_key(settings, provider)
    except SecretUnavailable as err:
        raise StepError("secret_unavailable", str(err), retryable=False) from None
    return await complete_http(provider, request, settings=settings, api_key=api_key, version=run.services.version)


async def run(run: StepRun) -> StepResult:
    step = run.step
    agent_cfg = await agent_config(run)
    provider, model = resolve(step, agent_cfg, run.settings)
    if not provider or not model:
        return failure(
            "provider_not_configured",
            "No AI provider/model: set provider and model on the pipeline step, the agent, or the settings "
            "default_provider/default_model.",
            retryable=False,
            provider=provider or None,
        )
    queued, empty = await take(run, "prompt_queue")
    if empty:
        return StepResult(status="completed_no_items", reason="empty_drain_queue")
    prompt = (queued or {}).get("prompt") if isinstance(queued, dict) else None
    packets = run.job.packets or []
    packet = packets[0] if packets else None
    text = user_message(prompt, packet)
    if not text.strip():
        return failure(
            "empty_ai_input", "The AI step has neither a queued prompt nor an input packet.", retryable=False
        )
    system_parts = [p for p in (agent_cfg.get("system_prompt"), step.get("system_prompt")) if p]
    request = AIRequest(
        model=model,
        system="\n\n".join(system_parts) or None,
        user=text,
        max_tokens=int(step.get("max_tokens") or DEFAULT_MAX_TOKENS),
        temperature=step.get("temperature"),
    )
    limiter = run.services.ai_limiter(run.settings.int("ai_max_concurrent_requests"))
    async with limiter:
        response = await call_provider(run, provider, request)
    usage = {
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "total_tokens": response.total_tokens,
    }
    marker = step.get("skip_marker")
    body = response.text
    if marker and body.strip().startswith(marker):
        rest = body.strip()[len(marker) :].splitlines()[0] if body.strip()[len(marker) :] else ""
        reason = rest.strip().lstrip(":").strip() or "ai_skipped"
        return StepResult(status="skipped", reason=reason[:500], token_usage=usage, handlers=[provider])
    in_meta = (packet or {}).get("metadata") or {}
    meta = {k: in_meta[k] for k in IDENTITY_KEYS if k in in_meta}
    meta.update(
        provider=provider, model=response.model or model, finish_reason=response.finish_reason, token_usage=usage
    )
    title = ((packet or {}).get("data") or {}).get("title") or first_line_title(body)
    out = {"type": "ai_response", "timestamp": iso(run.now()), "data": {"title": title, "body": body}, "metadata": meta}
    return StepResult(status="succeeded", packets=[out], token_usage=usage, handlers=[provider])


STEP_TYPES = StepType(
    "ai",
    "AI",
    "Transform the item with an AI model (provider, model, prompts).",
    False,
    queue_slot="prompt_queue",
    run=run,
    position=20,
)
