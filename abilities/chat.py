"""Chat toolset: private multi-turn sessions (docs/storage.md, datamachine_chat_sessions).

Sessions belong to one user. Someone else's session id is ``session_not_found``; global admins reach
other users' sessions by passing ``user_id`` (get, list, delete). Agent-bound principals see and create
only sessions of their agent. Expiry slides: ``expires_at = updated_at + chat_session_ttl_hours``.
send-chat-message (which calls an AI provider) is in ``abilities.chat_message``, list-chat-sessions' rows
in ``abilities.chat_listing``; the pieces they share are in ``abilities.chat_common``.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field

from datamachine_mcp.abilities.agent_common import agent_owner, find_agent
from datamachine_mcp.abilities.chat_common import (
    SERVER_KEYS,
    TITLE_MAX,
    ChatMessageOut,
    ChatSessionOut,
    ContextName,
    RoleName,
    load_session,
    message_dict,
    metadata_size_ok,
    session_dict,
    session_expiry,
    title_from,
)
from datamachine_mcp.abilities.chat_listing import ListSessionsIn, ListSessionsOut, list_sessions
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output, ts
from datamachine_mcp.storage.models import Agent, ChatSession
from datamachine_mcp.storage.timeutil import iso, utcnow

# --- create-chat-session --------------------------------------------------------------------------


class CreateSessionIn(Input):
    agent_id: int | None = Field(None, ge=1, description="Answering agent")
    agent_slug: str | None = Field(None, max_length=200, description="Agent slug (or agent_id)")
    context: ContextName = Field("chat", description="Session context")
    title: str | None = Field(None, max_length=TITLE_MAX, description="Title")
    provider: str | None = Field(None, max_length=50, description="AI provider")
    model: str | None = Field(None, max_length=100, description="AI model")
    source: str | None = Field(None, max_length=50, description="Origin (metadata.source)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Extra metadata")


class CreateSessionOut(Output):
    session_id: str = Field(description="New session id")
    session: ChatSessionOut = Field(description="The new session")


@ability(
    "create-chat-session",
    toolset="chat",
    level="any",
    description=("Start a chat session, optionally answered by an agent."),
)
async def create_chat_session(ctx: AbilityContext, inp: CreateSessionIn) -> CreateSessionOut:
    p = ctx.principal
    metadata_size_ok(inp.metadata)
    agent = await find_agent(ctx.session, inp.agent_id, inp.agent_slug)
    if agent is None and p.agent_id is not None:
        agent = await ctx.session.get(Agent, p.agent_id)
    if agent is not None:
        await ctx.access.authorize(
            agent_owner(agent), "viewer", mutating=True, target={"type": "agent", "id": agent.agent_id}
        )
    now = utcnow()
    stamp = iso(now)
    metadata = {**inp.metadata, "started_at": stamp, "message_count": 0, "last_activity": stamp}
    if inp.source is not None:
        metadata["source"] = inp.source
    session = ChatSession(
        session_id=str(uuid.uuid4()),
        user_id=p.user_id,
        agent_id=agent.agent_id if agent is not None else None,
        title=(inp.title or "").strip() or None,
        messages=[],
        meta=metadata,
        provider=inp.provider or None,
        model=inp.model or None,
        context=inp.context,
        created_at=now,
        updated_at=now,
        expires_at=await session_expiry(ctx, now),
        last_read_at=None,
    )
    ctx.session.add(session)
    await ctx.session.flush()
    await ctx.audit(
        f"chat session {session.session_id} created",
        target=("chat_session", session.session_id),
        agent_id=session.agent_id,
    )
    return CreateSessionOut.model_validate({"session_id": session.session_id, "session": session_dict(session)})


# --- get-chat-session -----------------------------------------------------------------------------


class GetSessionIn(Input):
    session_id: str = Field(max_length=50, description="Session id")
    user_id: int | None = Field(None, ge=1, description="Owner (global admins)")


class GetSessionOut(ChatSessionOut):
    conversation: list[ChatMessageOut] = Field(description="Messages, oldest first")


@ability(
    "get-chat-session",
    toolset="chat",
    level="any",
    read_only=True,
    idempotent=True,
    description="Get a chat session with its conversation.",
)
async def get_chat_session(ctx: AbilityContext, inp: GetSessionIn) -> GetSessionOut:
    s = await load_session(ctx, inp.session_id, inp.user_id)
    conversation = [message_dict(m) for m in s.messages or [] if isinstance(m, dict)]
    return GetSessionOut.model_validate({**session_dict(s), "conversation": conversation})


# --- list-chat-sessions (the rows: abilities.chat_listing) ------------------------------------------


@ability(
    "list-chat-sessions",
    toolset="chat",
    level="any",
    read_only=True,
    idempotent=True,
    description="List chat sessions, most recent first.",
)
async def list_chat_sessions(ctx: AbilityContext, inp: ListSessionsIn) -> ListSessionsOut:
    return await list_sessions(ctx, inp)


# --- update-chat-session --------------------------------------------------------------------------


class ChatMessageIn(Input):
    role: RoleName = Field(description="Role")
    content: str = Field(max_length=100000, description="Text")
    metadata: dict[str, Any] | None = Field(None, description="Metadata (timestamp: now)")


class UpdateSessionIn(Input):
    session_id: str = Field(max_length=50, description="Session")
    append_messages: list[ChatMessageIn] | None = Field(
        None, min_length=1, max_length=100, description="Messages to append"
    )
    title: str | None = Field(None, max_length=TITLE_MAX, description='New title; "" clears it')
    metadata: dict[str, Any] | None = Field(None, description="Merged (null deletes)")
    provider: str | None = Field(None, max_length=50, description="Provider")
    model: str | None = Field(None, max_length=100, description="Model")
    expected_message_count: int | None = Field(None, ge=0, description="Optimistic lock")


class UpdateSessionOut(Output):
    session_id: str = Field(description="Session id")
    message_count: int = Field(description="Messages after the update")
    appended: int = Field(description="Messages appended by this call")
    updated_fields: list[str] = Field(description="Fields that changed (messages, title, metadata, provider, model)")
    updated_at: str = Field(description="Last activity (ISO 8601 UTC)")
    expires_at: str | None = Field(description="New expiry (ISO 8601 UTC); null = never")


def _merged_metadata(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    protected = [k for k in SERVER_KEYS if k in patch]
    if protected:
        raise AbilityError(
            "invalid_input",
            f"metadata may not set {', '.join(protected)}: the server maintains them.",
            errors=[{"field": f"metadata.{k}", "message": "maintained by the server"} for k in protected],
        )
    out = dict(current)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    metadata_size_ok(out)
    return out


@ability(
    "update-chat-session",
    toolset="chat",
    level="any",
    description="Append messages to a chat session or change its settings.",
)
async def update_chat_session(ctx: AbilityContext, inp: UpdateSessionIn) -> UpdateSessionOut:
    given = ("append_messages", "title", "metadata", "provider", "model")
    if all(getattr(inp, name) is None for name in given):
        raise AbilityError(
            "invalid_session_update",
            "Nothing to update: give append_messages, title, metadata, provider or model.",
        )
    s = await load_session(ctx, inp.session_id, mutating=True)
    messages = list(s.messages or [])
    if inp.expected_message_count is not None and inp.expected_message_count != len(messages):
        raise AbilityError(
            "session_conflict",
            f"Session {s.session_id} has {len(messages)} messages, not {inp.expected_message_count}; "
            "re-read it with get-chat-session and retry.",
            message_count=len(messages),
        )
    now = utcnow()
    changed: list[str] = []
    metadata = dict(s.meta or {})
    if inp.metadata is not None:
        merged = _merged_metadata(metadata, inp.metadata)
        if merged != metadata:
            metadata = merged
            changed.append("metadata")
    appended = 0
    title = s.title
    if inp.append_messages:
        for m in inp.append_messages:
            meta = dict(m.metadata or {})
            meta.setdefault("timestamp", iso(now))
            messages.append({"role": m.role, "content": m.content, "metadata": meta})
        appended = len(inp.append_messages)
        changed.append("messages")
        first_user = next((m.content for m in inp.append_messages if m.role == "user"), None)
        if title is None and inp.title is None and first_user is not None:
            title = title_from(first_user)
    if inp.title is not None:
        title = inp.title.strip() or None
    if title != s.title:
        s.title = title
        changed.append("title")
    for name in ("provider", "model"):
        value = getattr(inp, name)
        if value is not None and (value or None) != getattr(s, name):
            setattr(s, name, value or None)
            changed.append(name)
    if changed:
        stamp = iso(now)
        metadata.update(message_count=len(messages), last_activity=stamp)
        s.messages = messages
        s.meta = metadata
        s.updated_at = now
        s.expires_at = await session_expiry(ctx, now)
        await ctx.audit(
            f"chat session {s.session_id} updated ({', '.join(changed)})",
            target=("chat_session", s.session_id),
            changes=changed,
            agent_id=s.agent_id,
            appended=appended,
        )
    return UpdateSessionOut(
        session_id=s.session_id,
        message_count=len(messages),
        appended=appended,
        updated_fields=changed,
        updated_at=ts(s.updated_at) or "",
        expires_at=ts(s.expires_at),
    )


# --- delete-chat-session / mark-session-read ------------------------------------------------------


class DeleteSessionIn(Input):
    session_id: str = Field(max_length=50, description="Session")
    user_id: int | None = Field(None, ge=1, description="Owner (global admins)")


class DeleteSessionOut(Output):
    session_id: str = Field(description="Deleted session id")
    deleted: bool = Field(description="Always true")


@ability(
    "delete-chat-session",
    toolset="chat",
    level="any",
    destructive=True,
    idempotent=True,
    description="Delete a chat session.",
)
async def delete_chat_session(ctx: AbilityContext, inp: DeleteSessionIn) -> DeleteSessionOut:
    s = await load_session(ctx, inp.session_id, inp.user_id, mutating=True)
    sid, agent_id, owner = s.session_id, s.agent_id, s.user_id
    await ctx.session.delete(s)
    await ctx.session.flush()
    await ctx.audit(f"chat session {sid} of user {owner} deleted", target=("chat_session", sid), agent_id=agent_id)
    return DeleteSessionOut(session_id=sid, deleted=True)


class MarkReadIn(Input):
    session_id: str = Field(max_length=50, description="Session")


class MarkReadOut(Output):
    session_id: str = Field(description="Session id")
    last_read_at: str = Field(description="Now (ISO 8601 UTC)")


@ability(
    "mark-session-read",
    toolset="chat",
    level="any",
    idempotent=True,
    description="Mark a chat session read.",
)
async def mark_session_read(ctx: AbilityContext, inp: MarkReadIn) -> MarkReadOut:
    s = await load_session(ctx, inp.session_id, mutating=True)
    s.last_read_at = utcnow()
    await ctx.audit(
        f"chat session {s.session_id} marked read",
        target=("chat_session", s.session_id),
        changes=["last_read_at"],
        agent_id=s.agent_id,
    )
    return MarkReadOut(session_id=s.session_id, last_read_at=ts(s.last_read_at) or "")
