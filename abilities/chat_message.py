"""send-chat-message: a user message in a chat session and the AI's reply.

Three phases, so no transaction is open while the provider answers:

1. a read transaction: the session (owner only), its agent (viewer, active), settings, provider and
   model resolution, the conversation so far and its message count;
2. the provider call (engine.providers ``openai``/``anthropic``, or the MCP client's model through
   the sampling bridge with the calling request's session), under the per-process
   ``ai_max_concurrent_requests`` limiter shared with AI steps;
3. one write transaction that re-reads the session under a row lock, re-checks its message count
   (``session_conflict`` if anything was appended meanwhile), appends the user message and the
   reply, and updates provider/model, title, metadata and the sliding expiry.

Any error leaves the session unchanged (not even the user message is saved). No retries are made.

Choices made here:

* The resolved provider and model are stored on the session (not only an explicit override), so the
  session keeps answering with the model it started with even if agent or settings defaults change.
* The user message's timestamp is when the call arrived, the reply's when it was saved; only the
  reply carries ``provider``, ``model`` (as reported by the provider) and ``token_usage``.
* The output's ``model`` is the resolved (requested) model; the reply's metadata has the provider's.
* Provider errors carry ``retry_after`` (seconds) in their data when the provider sent one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from pydantic import Field

from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.chat_common import ChatMessageOut, load_session, session_expiry, title_from
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.engine.ai_call import complete_http, resolve_provider_model
from datamachine_mcp.engine.errors import StepError, classify
from datamachine_mcp.engine.providers import AIRequest, AIResponse
from datamachine_mcp.storage.crypto import SecretUnavailable
from datamachine_mcp.storage.models import Agent
from datamachine_mcp.storage.settings_schema import PROVIDERS
from datamachine_mcp.storage.timeutil import iso, utcnow

HISTORY = 100
HISTORY_ROLES = ("user", "assistant", "system")


class SendChatMessageIn(Input):
    session_id: str = Field(max_length=50, description="Session")
    message: str = Field(max_length=100000, description="User message")
    provider: Literal["openai", "anthropic", "sampling"] | None = Field(None, description="Provider")
    model: str | None = Field(None, max_length=100, description="Model")
    max_tokens: int = Field(1024, ge=1, le=32000, description="Reply token cap")
    temperature: float | None = Field(None, ge=0, le=2, description="Temperature")


class TokenUsage(Output):
    prompt_tokens: int = Field(description="Prompt tokens")
    completion_tokens: int = Field(description="Completion tokens")
    total_tokens: int = Field(description="Total tokens")


class SendChatMessageOut(Output):
    session_id: str = Field(description="Session id")
    reply: ChatMessageOut = Field(description="The assistant's reply as saved")
    message_count: int = Field(description="Messages in the session after the call")
    provider: str = Field(description="Provider that answered")
    model: str = Field(description="Model used (as resolved for the session)")
    token_usage: TokenUsage = Field(description="Tokens of this exchange (zeros for sampling)")
    title: str | None = Field(description="Session title (set from the first user message if it had none)")


def resolve(inp: SendChatMessageIn, session: Any, agent_cfg: dict[str, Any], snap: Any) -> tuple[str, str]:
    """Provider and model, each from the first non-empty of input, session, agent chat mode, agent default,
    settings default."""
    overrides = [(inp.provider, inp.model), (session.provider, session.model)]
    return resolve_provider_model(overrides, agent_cfg, "chat", snap)


def provider_error(err: StepError, provider: str) -> AbilityError:
    retryable, _ = classify(err)
    if err.code == "provider_not_configured":
        return AbilityError(err.code, err.message, provider=provider)
    data: dict[str, Any] = {"provider": provider, "retryable": retryable}
    if err.retry_after is not None:
        data["retry_after"] = err.retry_after
    return AbilityError(err.code, err.message, **data)


async def _call(ctx: AbilityContext, provider: str, request: AIRequest, snap: Any) -> AIResponse:
    engine = ctx.runtime.engine
    limiter = engine.ai_limiter(snap.int("ai_max_concurrent_requests")) if engine is not None else None
    async with limiter if limiter is not None else contextlib.nullcontext():
        if provider == "sampling":
            if engine is None or ctx.client is None:
                raise StepError(
                    "sampling_unavailable",
                    "This server has no MCP client connection to sample through.",
                    retryable=True,
                )
            return await engine.sampling.complete(
                request,
                session=ctx.client,
                related_request_id=ctx.request_id,
                timeout=snap.int("ai_request_timeout_seconds"),
            )
        try:
            api_key = ctx.runtime.settings.decrypt_api_key(snap, provider)
        except SecretUnavailable as err:
            raise StepError("secret_unavailable", f"The {provider} API key cannot be decrypted: {err}") from None
        return await complete_http(provider, request, settings=snap, api_key=api_key, version=ctx.runtime.version)


@ability(
    "send-chat-message",
    toolset="chat",
    level="any",
    open_world=True,
    transaction="manual",
    description=("Send a message in a chat session and get the AI reply."),
)
async def send_chat_message(ctx: AbilityContext, inp: SendChatMessageIn) -> SendChatMessageOut:
    text = inp.message.strip()
    if not text:
        raise AbilityError("message_required", "message is required: give the text of your message.")
    received = utcnow()
    # 1. Read what the call needs; no transaction stays open afterwards.
    async with ctx.reading():
        session = await load_session(ctx, inp.session_id)
        agent_cfg: dict[str, Any] = {}
        if session.agent_id is not None:
            agent = await ctx.session.get(Agent, session.agent_id)
            if agent is not None:
                await ctx.access.authorize(
                    agent_owner(agent), "viewer", mutating=True, target={"type": "agent", "id": agent.agent_id}
                )
                agent_cfg = dict(agent.agent_config or {})
        snap = await ctx.settings()
        session_id = session.session_id
        count = len(session.messages or [])
        history = tuple(
            (str(m["role"]), str(m.get("content", "")))
            for m in (session.messages or [])
            if isinstance(m, dict) and m.get("role") in HISTORY_ROLES
        )[-HISTORY:]
        provider, model = resolve(inp, session, agent_cfg, snap)
    if not provider or not model or provider not in PROVIDERS:
        missing = "provider" if not provider else "model" if not model else f"a known provider ('{provider}' is not)"
        raise AbilityError(
            "provider_not_configured",
            f"No AI {missing} for this session: pass provider ({', '.join(PROVIDERS)}) and model, set them on the "
            "session or its agent (agent_config.default_provider/default_model), or set the default_provider/"
            "default_model settings.",
            provider=provider or None,
        )
    system = agent_cfg.get("system_prompt")
    request = AIRequest(
        model=model,
        user=text,
        system=system if isinstance(system, str) and system.strip() else None,
        max_tokens=inp.max_tokens,
        temperature=inp.temperature,
        history=history,
    )
    # 2. The provider call, outside any transaction.
    try:
        response = await _call(ctx, provider, request, snap)
    except StepError as err:
        raise provider_error(err, provider) from None
    usage = response.token_usage
    # 3. Save both messages in one transaction, if the session did not change meanwhile.
    async with ctx.transaction():
        session = await load_session(ctx, session_id, mutating=True)
        messages = list(session.messages or [])
        if len(messages) != count:
            raise AbilityError(
                "session_conflict",
                f"Session {session_id} changed while the reply was generated ({len(messages)} messages, "
                f"not {count}); nothing was saved. Re-read it with get-chat-session and send again.",
                message_count=len(messages),
            )
        now = utcnow()
        reply = {
            "role": "assistant",
            "content": response.text,
            "metadata": {"timestamp": iso(now), "provider": provider, "model": response.model, "token_usage": usage},
        }
        messages.append({"role": "user", "content": text, "metadata": {"timestamp": iso(received)}})
        messages.append(reply)
        changed = ["messages"]
        if session.title is None:
            first_user = next((str(m.get("content", "")) for m in messages if m.get("role") == "user"), "")
            session.title = title_from(first_user)
            changed.append("title")
        for name, value in (("provider", provider), ("model", model)):
            if getattr(session, name) != value:
                setattr(session, name, value)
                changed.append(name)
        meta = dict(session.meta or {})
        meta.update(message_count=len(messages), last_activity=iso(now))
        session.messages = messages
        session.meta = meta
        session.updated_at = now
        session.expires_at = await session_expiry(ctx, now)
        await ctx.audit(
            f"chat session {session_id}: message sent, reply from {provider}",
            target=("chat_session", session_id),
            changes=changed,
            agent_id=session.agent_id,
            provider=provider,
            model=model,
            token_usage=usage,
        )
        ctx.notify_updated(f"datamachine://chat/{session_id}")
        title = session.title
    return SendChatMessageOut.model_validate(
        {
            "session_id": session_id,
            "reply": reply,
            "message_count": len(messages),
            "provider": provider,
            "model": model,
            "token_usage": usage,
            "title": title,
        }
    )
