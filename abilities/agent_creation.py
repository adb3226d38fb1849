"""Creating agents (docs/access.md, New resources): slug checks, the self-service limit and the insert
shared by create-agent and import-agent.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from datamachine_mcp.abilities.agent_common import normalize_agent_config, sanitize_slug, upsert_grant, valid_slug
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.storage.models import Agent
from datamachine_mcp.storage.timeutil import utcnow


def slug_or_error(raw: str) -> str:
    if not raw.strip():
        raise AbilityError("invalid_agent_slug", "Agent slug is required.")
    slug = sanitize_slug(raw)
    if not slug:
        raise AbilityError("invalid_agent_slug", "Agent slug is required.", agent_slug=raw)
    if len(slug) > 200 or not valid_slug(slug):
        raise AbilityError(
            "invalid_agent_slug",
            f"Agent slug '{slug}' must be 1-200 characters of a-z, 0-9, '_' or '-' and start with a letter or digit.",
            agent_slug=slug,
        )
    return slug


async def slug_free(ctx: AbilityContext, slug: str) -> None:
    existing = (await ctx.session.execute(select(Agent.agent_id).where(Agent.agent_slug == slug))).scalar()
    if existing is not None:
        raise AbilityError(
            "agent_slug_conflict",
            f'Agent with slug "{slug}" already exists (ID: {existing}).',
            existing_agent_id=existing,
        )


# --- creating agents (create-agent, import-agent) --------------------------------------------------


def refuse_agent_bound(ctx: AbilityContext) -> None:
    """Agent-bound principals cannot create agents (docs/access.md, New resources)."""
    if ctx.principal.agent_id is not None:
        raise AccessDenied(
            "permission_denied",
            "Agent-bound sessions cannot create agents; use a user token or the local owner.",
            required_role="admin",
            effective_role=None,
        )


async def enforce_agent_limit(ctx: AbilityContext) -> None:
    """Non-admins may own at most ``max_agents_per_user`` agents (``agent_limit_reached``, DM's messages)."""
    p = ctx.principal
    if p.is_admin:
        return
    limit = (await ctx.settings(access=True)).int("max_agents_per_user")
    owned = (await ctx.session.execute(select(Agent).where(Agent.owner_id == p.user_id))).scalars().all()
    if len(owned) < limit:
        return
    if limit == 0:
        message = "Self-service agent creation is disabled (max_agents_per_user is 0); ask a global administrator."
    elif limit == 1:
        message = f'You already have an agent ("{owned[0].agent_name}"). Non-admin users are limited to 1 agent.'
    else:
        message = f"You already have {len(owned)} agent(s). Non-admin users are limited to {limit} agent(s)."
    raise AbilityError("agent_limit_reached", message, limit=limit, owned=len(owned))


async def insert_agent(
    ctx: AbilityContext, *, slug: str, name: str, owner_id: int, config: dict[str, Any] | None
) -> Agent:
    """Insert an active agent and its owner's admin grant (no audit row: the caller writes it)."""
    now = utcnow()
    agent = Agent(
        agent_slug=slug,
        agent_name=name,
        owner_id=owner_id,
        agent_config=normalize_agent_config(config),
        status="active",
        created_at=now,
        updated_at=now,
    )
    ctx.session.add(agent)
    await ctx.session.flush()
    await upsert_grant(ctx.session, agent.agent_id, owner_id, "admin")
    ctx.access.forget()
    return agent
