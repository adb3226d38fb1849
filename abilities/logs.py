"""Logs toolset: the central log and audit trail (docs/access.md, Audit)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import ColumnElement, delete, func, select

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.questions import confirmation
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, DateTimeIn, Input, Output, PageOut, ts
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.logs import LEVEL_RANK, write_log
from datamachine_mcp.storage.models import LOG_LEVELS, Agent, LogEntry

LevelName = Literal["debug", "info", "warning", "error", "critical"]
RESERVED_CONTEXT = ("audit", "ability", "actor_user_id", "actor_agent_id", "actor_token_id", "transport")
MAX_CONTEXT = 64 * 1024


class LogEntryOut(Output):
    id: int = Field(description="Log row id")
    agent_id: int | None = Field(description="Agent context")
    user_id: int | None = Field(description="User context (the actor on audit rows)")
    job_id: int | None = Field(description="Job the entry is about")
    flow_id: int | None = Field(description="Flow the entry is about")
    pipeline_id: int | None = Field(description="Pipeline the entry is about")
    level: LevelName = Field(description="Severity")
    message: str = Field(description="Message")
    context: dict[str, Any] | None = Field(description="Structured details")
    created_at: str = Field(description="ISO 8601 UTC")


def log_dict(row: LogEntry) -> dict[str, Any]:
    return {
        "id": row.id,
        "agent_id": row.agent_id,
        "user_id": row.user_id,
        "job_id": row.job_id,
        "flow_id": row.flow_id,
        "pipeline_id": row.pipeline_id,
        "level": row.level,
        "message": row.message,
        "context": row.context,
        "created_at": ts(row.created_at),
    }


async def _agent_for(ctx: AbilityContext, agent_id: int) -> Agent:
    agent = await ctx.session.get(Agent, agent_id)
    if agent is None:
        raise AbilityError("agent_not_found", f"Agent {agent_id} not found.", agent_id=agent_id)
    return agent


async def _scope(ctx: AbilityContext, agent_id: int | None) -> list[ColumnElement[bool]]:
    conds = [await ctx.access.scope_filter(LogEntry.agent_id, LogEntry.user_id, shared=False)]
    if agent_id is not None:
        p = ctx.principal
        agent = await ctx.session.get(Agent, agent_id)
        if agent is not None:
            await ctx.access.check_agent_filter(agent.agent_id, agent.agent_slug)
        elif not (p.is_admin and p.agent_id is None):
            raise AbilityError("agent_not_found", f"Agent {agent_id} not found.", agent_id=agent_id)
        # Log rows outlive their agent (no FK): a global administrator may still filter by a deleted
        # agent's id to read its audit trail.
        conds.append(LogEntry.agent_id == agent_id)
    return conds


# --- write-to-log -----------------------------------------------------------------------------


class WriteLogIn(Input):
    level: LevelName = Field(description="Severity")
    message: str = Field(min_length=1, max_length=4000, description="Message")
    context: dict[str, Any] | None = Field(None, description="Extra data, e.g. {job_id, flow_id}")


class WriteLogOut(Output):
    stored: bool = Field(description="False when the level is below the log_level setting")
    log_id: int | None = Field(description="Id of the stored row")
    message: str = Field(description="Human-readable result")


@ability(
    "write-to-log",
    toolset="logs",
    level="operator",
    description="Write an entry to the central log.",
    error_fields={"level": "invalid_level"},
)
async def write_to_log(ctx: AbilityContext, inp: WriteLogIn) -> WriteLogOut:
    p = ctx.principal
    context = dict(inp.context or {})
    reserved = [k for k in RESERVED_CONTEXT if k in context]
    if reserved:
        raise AbilityError(
            "invalid_input",
            f"context may not set {', '.join(reserved)}: the server records the actor itself.",
            errors=[{"field": f"context.{k}", "message": "reserved key"} for k in reserved],
        )
    size = len(json.dumps(context, separators=(",", ":")).encode())
    if size > MAX_CONTEXT:
        raise AbilityError(
            "invalid_input",
            f"context is {size} bytes of JSON; the limit is {MAX_CONTEXT} bytes.",
            errors=[{"field": "context", "message": "larger than 64 KiB"}],
        )
    raw_agent = context.get("agent_id")
    agent_id = raw_agent if isinstance(raw_agent, int) and not isinstance(raw_agent, bool) and raw_agent > 0 else None
    if agent_id is None:
        agent_id = p.agent_id
    if agent_id is not None:
        agent = await _agent_for(ctx, agent_id)
        await ctx.access.authorize(
            agent_owner(agent), "operator", mutating=True, target={"type": "agent", "id": agent_id}
        )
    else:
        await ctx.access.authorize(Owner(agent_id=None, user_id=p.user_id), "operator", mutating=True)
    context.update(p.actor())
    snap = await ctx.settings()
    row = await write_log(
        ctx.session, inp.level, inp.message, context, agent_id=agent_id, user_id=p.user_id, threshold=snap["log_level"]
    )
    if row is None:
        return WriteLogOut(
            stored=False, log_id=None, message=f"Entry below the log_level '{snap['log_level']}'; not stored."
        )
    await ctx.session.flush()
    return WriteLogOut(stored=True, log_id=row.id, message="Log entry written")


# --- read-logs --------------------------------------------------------------------------------


class ReadLogsIn(Input):
    agent_id: int | None = Field(None, ge=1, description="Agent filter")
    level: LevelName | None = Field(None, description="Level filter")
    min_level: LevelName | None = Field(None, description="Minimum level")
    since: DateTimeIn | None = Field(None, description="At or after (UTC)")
    before: DateTimeIn | None = Field(None, description="At or before (UTC)")
    job_id: int | None = Field(None, ge=1, description="Job filter")
    flow_id: int | None = Field(None, ge=1, description="Flow filter")
    pipeline_id: int | None = Field(None, ge=1, description="Pipeline filter")
    audit_only: bool = Field(False, description="Only audit rows")
    search: str | None = Field(None, max_length=200, description="Substring of the message")
    per_page: int = Field(50, ge=1, le=500, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class ReadLogsOut(PageOut):
    items: list[LogEntryOut] = Field(description="Entries, newest first")


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def read_logs_query(ctx: AbilityContext, inp: ReadLogsIn) -> dict[str, Any]:
    conds = await _scope(ctx, inp.agent_id)
    if inp.level is not None:
        conds.append(LogEntry.level == inp.level)
    if inp.min_level is not None:
        conds.append(LogEntry.level.in_([lv for lv in LOG_LEVELS if LEVEL_RANK[lv] >= LEVEL_RANK[inp.min_level]]))
    if inp.since is not None:
        conds.append(LogEntry.created_at >= inp.since)
    if inp.before is not None:
        conds.append(LogEntry.created_at <= inp.before)
    for column, value in (
        (LogEntry.job_id, inp.job_id),
        (LogEntry.flow_id, inp.flow_id),
        (LogEntry.pipeline_id, inp.pipeline_id),
    ):
        if value is not None:
            conds.append(column == value)
    if inp.audit_only:
        conds.append(LogEntry.context["audit"].as_boolean().is_(True))
    if inp.search:
        conds.append(LogEntry.message.ilike(_like(inp.search), escape="\\"))
    total = (await ctx.session.execute(select(func.count()).select_from(LogEntry).where(*conds))).scalar() or 0
    rows = await ctx.session.execute(
        select(LogEntry)
        .where(*conds)
        .order_by(LogEntry.created_at.desc(), LogEntry.id.desc())
        .limit(inp.per_page)
        .offset(inp.offset)
    )
    return {
        "items": [log_dict(r) for r in rows.scalars()],
        "total": total,
        "per_page": inp.per_page,
        "offset": inp.offset,
    }


@ability(
    "read-logs",
    core=True,
    toolset="logs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Read log entries, newest first, filtered by agent, level, time, job, flow or text."),
)
async def read_logs(ctx: AbilityContext, inp: ReadLogsIn) -> ReadLogsOut:
    return ReadLogsOut.model_validate(await read_logs_query(ctx, inp))


# --- get-log-metadata -------------------------------------------------------------------------


class LogMetadataIn(Input):
    agent_id: int | None = Field(None, ge=1, description="Agent filter")


class LevelCounts(Output):
    debug: int = Field(description="Entries at debug")
    info: int = Field(description="Entries at info")
    warning: int = Field(description="Entries at warning")
    error: int = Field(description="Entries at error")
    critical: int = Field(description="Entries at critical")


class LogMetadataOut(Output):
    total_entries: int = Field(description="Readable entries")
    oldest: str | None = Field(description="Oldest entry time (ISO 8601 UTC)")
    newest: str | None = Field(description="Newest entry time (ISO 8601 UTC)")
    level_counts: LevelCounts = Field(description="Entries per level")


@ability(
    "get-log-metadata",
    toolset="logs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="Get log counts, per level, and time range.",
)
async def get_log_metadata(ctx: AbilityContext, inp: LogMetadataIn) -> LogMetadataOut:
    conds = await _scope(ctx, inp.agent_id)
    rows = await ctx.session.execute(
        select(LogEntry.level, func.count(), func.min(LogEntry.created_at), func.max(LogEntry.created_at))
        .where(*conds)
        .group_by(LogEntry.level)
    )
    counts = dict.fromkeys(LOG_LEVELS, 0)
    oldest = newest = None
    for level, n, lo, hi in rows.all():
        counts[level] = n
        oldest = lo if oldest is None or (lo is not None and lo < oldest) else oldest
        newest = hi if newest is None or (hi is not None and hi > newest) else newest
    return LogMetadataOut.model_validate(
        {
            "total_entries": sum(counts.values()),
            "oldest": ts(oldest) if oldest else None,
            "newest": ts(newest) if newest else None,
            "level_counts": counts,
        }
    )


# --- clear-logs -------------------------------------------------------------------------------


class ClearLogsIn(Input):
    agent_id: int | None = Field(None, ge=1, description="Agent (omit: all)")


class ClearLogsOut(Output):
    deleted: int = Field(description="Rows deleted")
    message: str = Field(description="Human-readable result")


@ability(
    "clear-logs",
    ask=confirmation(
        lambda i: (
            f"Delete every log entry of agent {i.agent_id}?" if i.agent_id else "Delete every log entry of every agent?"
        )
    ),
    toolset="logs",
    level="admin",
    destructive=True,
    idempotent=True,
    description="Delete an agent's log entries, or all (global admin).",
)
async def clear_logs(ctx: AbilityContext, inp: ClearLogsIn) -> ClearLogsOut:
    if inp.agent_id is not None:
        agent = await _agent_for(ctx, inp.agent_id)
        await ctx.access.authorize(
            agent_owner(agent), "admin", mutating=True, target={"type": "agent", "id": agent.agent_id}
        )
        result = await ctx.session.execute(delete(LogEntry).where(LogEntry.agent_id == inp.agent_id))
        target: tuple[str, Any] = ("agent", inp.agent_id)
    else:
        ctx.access.require_global_admin("Clearing all logs", {"type": "logs", "id": "all"})
        result = await ctx.session.execute(delete(LogEntry))
        target = ("logs", "all")
    deleted = rowcount(result)
    # Written after the delete, so the log is never empty after a clear.
    await ctx.audit(f"{deleted} log entries cleared", target=target, agent_id=inp.agent_id, deleted=deleted)
    return ClearLogsOut(deleted=deleted, message="Logs cleared successfully")
