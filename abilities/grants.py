"""Agents toolset: role grants on agents (docs/access.md, Roles)."""

from __future__ import annotations

from pydantic import Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.agent_common import (
    AccessGrantOut,
    AgentSelector,
    RoleName,
    grant_dict,
    grants_order,
    load_agent,
    upsert_grant,
)
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Output, PageOut
from datamachine_mcp.storage.models import AgentAccess


class GrantIn(AgentSelector):
    user_id: int = Field(ge=1, description="User")
    role: RoleName = Field("viewer", description="Role")


class GrantOut(Output):
    grant: AccessGrantOut = Field(description="The grant after the call")
    created: bool = Field(description="A new grant row was inserted")
    changed: bool = Field(description="A row was inserted or its role changed")
    previous_role: RoleName | None = Field(description="Role before the call (null for a new grant)")


@ability(
    "grant-agent-access",
    toolset="agents",
    level="admin",
    idempotent=True,
    description="Grant a user a role on an agent, or change it.",
)
async def grant_agent_access(ctx: AbilityContext, inp: GrantIn) -> GrantOut:
    agent, _ = await load_agent(ctx, inp, "admin", mutating=True)
    if inp.user_id == agent.owner_id and inp.role != "admin":
        raise AbilityError(
            "cannot_revoke_owner",
            f"User {inp.user_id} owns agent '{agent.agent_slug}' and always keeps admin; transfer ownership first.",
            user_id=inp.user_id,
        )
    grant, created, previous = await upsert_grant(ctx.session, agent.agent_id, inp.user_id, inp.role)
    changed = created or previous != inp.role
    if changed:
        ctx.access.forget()
        await ctx.audit(
            f"user {inp.user_id} granted {inp.role} on agent '{agent.agent_slug}'",
            target=("agent_access", f"{agent.agent_id}:{inp.user_id}"),
            changes=["role"],
            agent_id=agent.agent_id,
            role={"from": previous, "to": inp.role},
        )
    return GrantOut.model_validate(
        {
            "grant": grant_dict(grant, agent.owner_id),
            "created": created,
            "changed": changed,
            "previous_role": previous,
        }
    )


class RevokeIn(AgentSelector):
    user_id: int = Field(ge=1, description="User")


class RevokeOut(Output):
    agent_id: int = Field(description="Agent id")
    user_id: int = Field(description="User whose grant was removed")
    previous_role: RoleName = Field(description="Role the user held")
    message: str = Field(description="Human-readable result")


@ability(
    "revoke-agent-access",
    toolset="agents",
    level="admin",
    destructive=True,
    idempotent=True,
    description="Remove a user's grant on an agent (not the owner's).",
)
async def revoke_agent_access(ctx: AbilityContext, inp: RevokeIn) -> RevokeOut:
    agent, _ = await load_agent(ctx, inp, "admin", mutating=True)
    if inp.user_id == agent.owner_id:
        raise AbilityError(
            "cannot_revoke_owner",
            f"User {inp.user_id} owns agent '{agent.agent_slug}'; the owner's access cannot be revoked.",
            user_id=inp.user_id,
        )
    grant = (
        await ctx.session.execute(
            select(AgentAccess).where(AgentAccess.agent_id == agent.agent_id, AgentAccess.user_id == inp.user_id)
        )
    ).scalar_one_or_none()
    if grant is None:
        raise AbilityError("grant_not_found", "No access grant found for this user.", user_id=inp.user_id)
    previous = grant.role
    await ctx.session.delete(grant)
    ctx.access.forget()
    await ctx.audit(
        f"user {inp.user_id}'s {previous} grant on agent '{agent.agent_slug}' revoked",
        target=("agent_access", f"{agent.agent_id}:{inp.user_id}"),
        changes=["role"],
        agent_id=agent.agent_id,
        role={"from": previous, "to": None},
    )
    return RevokeOut(
        agent_id=agent.agent_id,
        user_id=inp.user_id,
        previous_role=previous,
        message=f"Access of user {inp.user_id} to agent '{agent.agent_slug}' revoked.",
    )


class ListAccessIn(AgentSelector):
    role: RoleName | None = Field(None, description="Role filter")
    per_page: int = Field(50, ge=1, le=100, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class ListAccessOut(PageOut):
    agent_id: int = Field(description="Agent id")
    grants: list[AccessGrantOut] = Field(description="Grants, owner first, then by granted_at")


@ability(
    "list-agent-access",
    toolset="agents",
    level="admin",
    read_only=True,
    idempotent=True,
    description="List the users holding grants on an agent, with roles.",
)
async def list_agent_access(ctx: AbilityContext, inp: ListAccessIn) -> ListAccessOut:
    agent, _ = await load_agent(ctx, inp, "admin", mutating=False)
    query = select(AgentAccess).where(AgentAccess.agent_id == agent.agent_id)
    if inp.role is not None:
        query = query.where(AgentAccess.role == inp.role)
    total = (await ctx.session.execute(select(func.count()).select_from(query.subquery()))).scalar() or 0
    rows = await ctx.session.execute(
        query.order_by(*grants_order(agent.owner_id)).limit(inp.per_page).offset(inp.offset)
    )
    return ListAccessOut.model_validate(
        {
            "agent_id": agent.agent_id,
            "grants": [grant_dict(g, agent.owner_id) for g in rows.scalars()],
            "total": total,
            "per_page": inp.per_page,
            "offset": inp.offset,
        }
    )
