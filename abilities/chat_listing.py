"""list-chat-sessions: its input and output shapes and the rows behind it (first message, unread count)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.chat_common import (
    TITLE_MAX,
    ContextName,
    agent_scope,
    subject_user,
)
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Input, Output, PageOut, ts
from datamachine_mcp.storage.models import Agent, ChatSession
from datamachine_mcp.storage.timeutil import parse_datetime


class ListSessionsIn(Input):
    user_id: int | None = Field(None, ge=1, description="Owner (global admins)")
    agent_id: int | None = Field(None, ge=1, description="Agent filter")
    context: ContextName | None = Field(None, description="Only this context")
    per_page: int = Field(20, ge=1, le=100, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class SessionRow(Output):
    session_id: str = Field(description="Session id")
    title: str | None = Field(description="Title")
    context: ContextName = Field(description="chat, pipeline or system")
    agent_id: int | None = Field(description="Agent that answers")
    agent_slug: str | None = Field(description="Its slug")
    agent_name: str | None = Field(description="Its display name")
    provider: str | None = Field(description="AI provider")
    model: str | None = Field(description="AI model")
    first_message: str | None = Field(description="First user message (at most 100 characters)")
    message_count: int = Field(description="Messages in the conversation")
    unread_count: int = Field(description="Assistant messages newer than last_read_at (all if never read)")
    created_at: str = Field(description="ISO 8601 UTC")
    updated_at: str = Field(description="Last activity (ISO 8601 UTC)")
    expires_at: str | None = Field(description="Expiry (ISO 8601 UTC); null = never")


class ListSessionsOut(PageOut):
    sessions: list[SessionRow] = Field(description="Sessions, most recently active first")


def _stamp(message: dict[str, Any]) -> datetime | None:
    raw = (message.get("metadata") or {}).get("timestamp")
    try:
        return parse_datetime(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


def unread_count(messages: list[Any], last_read_at: datetime | None) -> int:
    """Assistant replies (not tool calls or results) after ``last_read_at``; all when never read.

    Message timestamps have whole seconds, so ``last_read_at`` is compared at that precision.
    """
    cutoff = last_read_at.replace(microsecond=0) if last_read_at is not None else None
    count = 0
    for m in messages:
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        if (m.get("metadata") or {}).get("type") in ("tool_call", "tool_result"):
            continue
        stamp = _stamp(m)
        if cutoff is None or (stamp is not None and stamp > cutoff):
            count += 1
    return count


def _first_user_message(messages: list[Any]) -> str | None:
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content", ""))[:TITLE_MAX]
    return None


async def list_sessions(ctx: AbilityContext, inp: ListSessionsIn) -> ListSessionsOut:
    conds = [ChatSession.user_id == subject_user(ctx, inp.user_id), await agent_scope(ctx)]
    if inp.agent_id is not None:
        conds.append(ChatSession.agent_id == inp.agent_id)
    if inp.context is not None:
        conds.append(ChatSession.context == inp.context)
    total = (await ctx.session.execute(select(func.count()).select_from(ChatSession).where(*conds))).scalar() or 0
    rows = await ctx.session.execute(
        select(ChatSession, Agent.agent_slug, Agent.agent_name)
        .outerjoin(Agent, Agent.agent_id == ChatSession.agent_id)
        .where(*conds)
        .order_by(ChatSession.updated_at.desc(), ChatSession.session_id)
        .limit(inp.per_page)
        .offset(inp.offset)
    )
    sessions = []
    for s, slug, name in rows.all():
        messages = s.messages or []
        sessions.append(
            {
                "session_id": s.session_id,
                "title": s.title,
                "context": s.context,
                "agent_id": s.agent_id,
                "agent_slug": slug,
                "agent_name": name,
                "provider": s.provider,
                "model": s.model,
                "first_message": _first_user_message(messages),
                "message_count": len(messages),
                "unread_count": unread_count(messages, s.last_read_at),
                "created_at": ts(s.created_at),
                "updated_at": ts(s.updated_at),
                "expires_at": ts(s.expires_at),
            }
        )
    return ListSessionsOut.model_validate(
        {"sessions": sessions, "total": total, "per_page": inp.per_page, "offset": inp.offset}
    )
