"""Shared pieces of the agent tools: slugs, the agent selector, output shapes."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, TypeVar

from pydantic import Field
from sqlalchemy import Row, bindparam, case, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.base import Executable

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.schema import Input, Output, ts
from datamachine_mcp.storage.models import Agent, AgentAccess
from datamachine_mcp.storage.timeutil import utcnow

RoleName = Literal["viewer", "operator", "admin"]


class _Identified(Protocol):
    @property
    def agent_id(self) -> int: ...


T = TypeVar("T", bound=_Identified)
_TAGS = re.compile(r"<[^>]*>")
_SLUG_OK = re.compile(r"^[a-z0-9][a-z0-9_-]{0,199}$")


def sanitize_slug(raw: str) -> str:
    """WordPress ``sanitize_title``: strip tags, ASCII, lowercase, separators to '-', drop the rest."""
    text = _TAGS.sub("", raw)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = text.lower()
    text = re.sub(r"[\s.]+", "-", text)
    text = re.sub(r"[^a-z0-9_-]", "", text)
    text = re.sub(r"-{2,}", "-", text).strip("-")
    return text


def valid_slug(slug: str) -> bool:
    return bool(_SLUG_OK.match(slug))


def normalize_agent_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Legacy ``provider``/``model`` become ``default_provider``/``default_model`` (DM)."""
    out = dict(config or {})
    for legacy, new in (("provider", "default_provider"), ("model", "default_model")):
        if legacy in out:
            value = out.pop(legacy)
            out.setdefault(new, value)
    return out


def agent_owner(agent: Agent | Row[Any]) -> Owner:
    return Owner(
        agent_id=agent.agent_id, user_id=agent.owner_id, agent_status=agent.status, agent_slug=agent.agent_slug
    )


_BY_SLUG = select(Agent).where(Agent.agent_slug == bindparam("slug"))


class AgentSelector(Input):
    agent_id: int | None = Field(None, ge=1, description="Agent id")
    agent_slug: str | None = Field(None, max_length=200, description="Agent slug")


async def _select(
    agent_id: int | None,
    agent_slug: str | None,
    by_id: Callable[[int], Awaitable[T | None]],
    by_slug: Callable[[str], Awaitable[T | None]],
) -> T | None:
    """The selector's rules over any lookup: None when neither part is given; raises on a mismatch or an
    unknown agent."""
    slug = sanitize_slug(agent_slug) if agent_slug and agent_slug.strip() else None
    if agent_id is None and slug is None:
        return None
    found_by_id = await by_id(agent_id) if agent_id is not None else None
    if agent_id is not None and found_by_id is None:
        raise AbilityError("agent_not_found", f"Agent {agent_id} not found.", agent_id=agent_id)
    if slug is not None:
        found_by_slug = await by_slug(slug)
        if found_by_slug is None:
            raise AbilityError("agent_not_found", f"Agent '{slug}' not found.", agent_slug=slug)
        if found_by_id is not None and found_by_id.agent_id != found_by_slug.agent_id:
            raise AbilityError(
                "agent_identity_mismatch",
                f"agent_id {agent_id} and agent_slug '{slug}' name different agents; give one of them.",
                agent_id=agent_id,
                agent_slug=slug,
            )
        return found_by_slug
    return found_by_id


async def find_agent(session: AsyncSession, agent_id: int | None, agent_slug: str | None) -> Agent | None:
    """Resolve a selector; None when neither part is given. Raises on mismatch or unknown agent."""

    async def by_id(ident: int) -> Agent | None:
        return await session.get(Agent, ident)

    async def by_slug(slug: str) -> Agent | None:
        return (await session.execute(_BY_SLUG, {"slug": slug})).scalar_one_or_none()

    return await _select(agent_id, agent_slug, by_id, by_slug)


async def require_agent(session: AsyncSession, agent_id: int | None, agent_slug: str | None) -> Agent:
    agent = await find_agent(session, agent_id, agent_slug)
    if agent is None:
        raise AbilityError("agent_identity_required", "Agent identity required: provide agent_id or agent_slug")
    return agent


async def require_agent_row(
    ctx: AbilityContext, sel: AgentSelector, by_id: Executable, by_slug: Executable
) -> Row[Any]:
    """``require_agent`` for reads that change nothing: Core rows of ``by_id``/``by_slug`` (statements
    taking ``:agent_id``/``:agent_slug`` that select at least the agent's columns) through ``ctx.read``."""

    async def one(statement: Executable, params: dict[str, Any]) -> Row[Any] | None:
        return (await ctx.read(statement, params)).one_or_none()

    row = await _select(
        sel.agent_id,
        sel.agent_slug,
        lambda ident: one(by_id, {"agent_id": ident}),
        lambda slug: one(by_slug, {"agent_slug": slug}),
    )
    if row is None:
        raise AbilityError("agent_identity_required", "Agent identity required: provide agent_id or agent_slug")
    return row


async def load_agent(
    ctx: AbilityContext, sel: AgentSelector, required: RoleName, *, mutating: bool
) -> tuple[Agent, str]:
    """Selector + role check on the agent. Returns the agent and the caller's effective role."""
    agent = await require_agent(ctx.session, sel.agent_id, sel.agent_slug)
    role = await ctx.access.authorize(
        agent_owner(agent), required, mutating=mutating, target={"type": "agent", "id": agent.agent_id}
    )
    return agent, role


async def upsert_grant(
    session: AsyncSession, agent_id: int, user_id: int, role: str
) -> tuple[AgentAccess, bool, str | None]:
    """Insert or change a grant. Returns (grant, created, previous role)."""
    grant = (
        await session.execute(
            select(AgentAccess).where(AgentAccess.agent_id == agent_id, AgentAccess.user_id == user_id)
        )
    ).scalar_one_or_none()
    if grant is None:
        grant = AgentAccess(agent_id=agent_id, user_id=user_id, role=role, granted_at=utcnow())
        session.add(grant)
        await session.flush()
        return grant, True, None
    previous = grant.role
    if previous != role:
        grant.role = role
        grant.granted_at = utcnow()
    return grant, False, previous


class AgentOut(Output):
    agent_id: int = Field(description="Agent id")
    agent_slug: str = Field(description="Unique slug")
    agent_name: str = Field(description="Display name")
    owner_id: int = Field(description="Owning user (always admin on the agent)")
    status: Literal["active", "inactive"] = Field(description="inactive freezes it")
    agent_config: dict[str, Any] = Field(description="Free-form config (description, system_prompt, ...)")
    created_at: str = Field(description="ISO 8601 UTC")
    updated_at: str = Field(description="ISO 8601 UTC")


class AccessGrantOut(Output):
    agent_id: int = Field(description="Agent id")
    user_id: int = Field(description="Grantee")
    role: RoleName = Field(description="Role on the agent")
    granted_at: str = Field(description="When the role was set (ISO 8601 UTC)")
    is_owner: bool = Field(description="The grantee owns the agent")


class ResourceCounts(Output):
    pipelines: int = Field(description="Pipelines owned by the agent")
    flows: int = Field(description="Flows owned by the agent")
    active_jobs: int = Field(description="Pending, processing or waiting jobs of the agent")
    chat_sessions: int = Field(description="Chat sessions bound to the agent")


class AgentDetail(AgentOut):
    resource_counts: ResourceCounts = Field(description="Counts of the agent's resources")
    access: list[AccessGrantOut] | None = Field(
        description="Access grants, owner first (null unless you are admin of the agent)"
    )
    caller_role: RoleName | None = Field(description="Your role on the agent, capped at your token's scope")


def agent_dict(agent: Agent | Row[Any]) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id,
        "agent_slug": agent.agent_slug,
        "agent_name": agent.agent_name,
        "owner_id": agent.owner_id,
        "status": agent.status,
        "agent_config": agent.agent_config or {},
        "created_at": ts(agent.created_at),
        "updated_at": ts(agent.updated_at),
    }


def grant_dict(grant: AgentAccess | Row[Any], owner_id: int) -> dict[str, Any]:
    return {
        "agent_id": grant.agent_id,
        "user_id": grant.user_id,
        "role": grant.role,
        "granted_at": ts(grant.granted_at),
        "is_owner": grant.user_id == owner_id,
    }


def grants_order(owner_id: Any) -> tuple[Any, ...]:
    """Owner first, then by granted_at (``owner_id`` may be a bind parameter)."""
    return (case((AgentAccess.user_id == owner_id, 0), else_=1), AgentAccess.granted_at, AgentAccess.id)


def agent_uri(slug: str) -> str:
    return f"datamachine://agents/{slug}"
