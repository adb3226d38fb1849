"""Shared pieces of the chat tools: loading a session, scopes, expiry,
titles and the output shapes of sessions and messages, used by the session tools (``abilities.chat``) and
send-chat-message (``abilities.chat_message``).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import ColumnElement, select, true

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.schema import Output, ts
from datamachine_mcp.storage.models import Agent, ChatSession

ContextName = Literal["chat", "pipeline", "system"]
RoleName = Literal["user", "assistant", "system", "tool"]
MAX_METADATA = 64 * 1024
SERVER_KEYS = ("started_at", "message_count", "last_activity")
TITLE_MAX = 100


# --- shared helpers -----------------------------------------------------------------------------


def title_from(text: str) -> str | None:
    """A title from a message: whitespace collapsed, cut to 100 characters ending "..."."""
    flat = " ".join(text.split())
    if not flat:
        return None
    return flat if len(flat) <= TITLE_MAX else flat[: TITLE_MAX - 3] + "..."


async def session_expiry(ctx: AbilityContext, updated_at: datetime) -> datetime | None:
    """Sliding expiry: ``updated_at + chat_session_ttl_hours``; None when the setting is 0."""
    hours = (await ctx.settings()).int("chat_session_ttl_hours")
    return updated_at + timedelta(hours=hours) if hours > 0 else None


def metadata_size_ok(value: dict[str, Any]) -> None:
    size = len(json.dumps(value, separators=(",", ":"), default=str).encode())
    if size > MAX_METADATA:
        raise AbilityError(
            "invalid_input",
            f"metadata is {size} bytes of JSON; the limit is {MAX_METADATA} bytes (64 KiB).",
            errors=[{"field": "metadata", "message": "larger than 64 KiB"}],
        )


async def agent_scope(ctx: AbilityContext) -> ColumnElement[bool]:
    """Agent-bound principals reach only their agent's sessions, and only while their user may read it."""
    p = ctx.principal
    if p.agent_id is None:
        return true()
    if not p.is_admin and p.agent_id not in await ctx.access.agent_roles():
        return ChatSession.agent_id == -1
    return ChatSession.agent_id == p.agent_id


def subject_user(ctx: AbilityContext, user_id: int | None) -> int:
    """Whose sessions: the caller's, or (global admins only) another user's."""
    p = ctx.principal
    if user_id is None or user_id == p.user_id:
        return p.user_id
    ctx.access.require_global_admin(f"Reaching another user's chat sessions (user_id {user_id})")
    return user_id


async def load_session(
    ctx: AbilityContext, session_id: str, user_id: int | None = None, *, mutating: bool = False
) -> ChatSession:
    """The caller's session (or, for global admins passing ``user_id``, that user's).

    Unknown ids and other users' sessions are both ``session_not_found``. A change to a session of an
    inactive agent is ``agent_inactive``.
    """
    subject = subject_user(ctx, user_id)
    sid = session_id.strip()
    stmt = select(ChatSession).where(
        ChatSession.session_id == sid, ChatSession.user_id == subject, await agent_scope(ctx)
    )
    if mutating:
        stmt = ctx.db.for_update(stmt)
    session = (await ctx.session.execute(stmt)).scalar_one_or_none()
    if session is None:
        raise AbilityError(
            "session_not_found",
            f"Chat session '{sid}' not found. Use list-chat-sessions to see your sessions.",
            session_id=sid,
        )
    if mutating and session.agent_id is not None:
        agent = await ctx.session.get(Agent, session.agent_id)
        if agent is not None and agent.status == "inactive":
            raise AbilityError(
                "agent_inactive",
                f"Agent '{agent.agent_slug}' is inactive: its chat sessions are read-only until a global "
                "administrator reactivates it with update-agent.",
                agent_id=agent.agent_id,
            )
    return session


# --- output shapes --------------------------------------------------------------------------------


class ChatMessageOut(Output):
    role: RoleName = Field(description="Role")
    content: str = Field(description="Message text")
    metadata: dict[str, Any] = Field(description="Always has timestamp; AI replies add provider, model, token_usage")


class ChatSessionOut(Output):
    session_id: str = Field(description="Session id (uuid4)")
    user_id: int = Field(description="Owning user")
    agent_id: int | None = Field(description="Agent that answers")
    title: str | None = Field(description="Title")
    context: ContextName = Field(description="chat, pipeline or system")
    provider: str | None = Field(description="AI provider of the session")
    model: str | None = Field(description="AI model of the session")
    metadata: dict[str, Any] = Field(description="Metadata: started_at, message_count, last_activity, caller keys")
    last_read_at: str | None = Field(description="When the owner last marked it read (ISO 8601 UTC)")
    created_at: str = Field(description="ISO 8601 UTC")
    updated_at: str = Field(description="Last activity (ISO 8601 UTC)")
    expires_at: str | None = Field(description="When it expires unless used again (ISO 8601 UTC); null = never")


def session_dict(s: ChatSession) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "user_id": s.user_id,
        "agent_id": s.agent_id,
        "title": s.title,
        "context": s.context,
        "provider": s.provider,
        "model": s.model,
        "metadata": s.meta or {},
        "last_read_at": ts(s.last_read_at),
        "created_at": ts(s.created_at),
        "updated_at": ts(s.updated_at),
        "expires_at": ts(s.expires_at),
    }


def message_dict(m: dict[str, Any]) -> dict[str, Any]:
    return {"role": m.get("role", "user"), "content": str(m.get("content", "")), "metadata": m.get("metadata") or {}}
