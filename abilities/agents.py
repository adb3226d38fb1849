"""Agents toolset: create, read, list, update, rename and delete agents.

The creation helpers shared with import-agent are in ``abilities.agent_creation``; get-agent's agent
object in ``abilities.agent_detail``; export-agent and import-agent in ``abilities.agent_export`` and
``abilities.agent_import``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import and_, func, or_, select

from datamachine_mcp.abilities.agent_common import (
    AgentDetail,
    AgentSelector,
    agent_dict,
    agent_owner,
    agent_uri,
    load_agent,
    normalize_agent_config,
    require_agent_row,
    upsert_grant,
)
from datamachine_mcp.abilities.agent_creation import (
    enforce_agent_limit,
    insert_agent,
    refuse_agent_bound,
    slug_free,
    slug_or_error,
)
from datamachine_mcp.abilities.agent_detail import DETAIL_BY_ID, DETAIL_BY_SLUG, agent_detail
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Input, Opt, Output, PageOut
from datamachine_mcp.storage.models import Agent, AgentAccess, AgentToken, ChatSession, Flow, Job, Pipeline
from datamachine_mcp.storage.timeutil import utcnow

# --- create-agent -----------------------------------------------------------------------------


class CreateAgentIn(Input):
    agent_slug: str = Field(max_length=400, description="Unique slug ([a-z0-9_-])")
    agent_name: str | None = Field(None, max_length=200, description="Display name")
    owner_id: int | None = Field(None, ge=1, description="Owner (global admins)")
    agent_config: dict[str, Any] = Field(
        default_factory=dict,
        description="system_prompt, default_provider, default_model…",
    )


class CreateAgentOut(Output):
    # The create-agent answer: no timestamps (get-agent has them).
    agent_id: int = Field(description="Agent id")
    agent_slug: str = Field(description="Unique slug")
    agent_name: str = Field(description="Display name")
    owner_id: int = Field(description="Owning user (always admin on the agent)")
    status: Literal["active", "inactive"] = Field(description="Always active for a new agent")
    agent_config: dict[str, Any] = Field(description="Normalised config")
    message: str = Field(description="Human-readable result")


@ability(
    "create-agent",
    core=True,
    toolset="agents",
    level="admin",
    description=("Create an agent: an identity owning pipelines, flows, jobs and chats. Its owner gets admin access."),
)
async def create_agent(ctx: AbilityContext, inp: CreateAgentIn) -> CreateAgentOut:
    p = ctx.principal
    refuse_agent_bound(ctx)
    slug = slug_or_error(inp.agent_slug)
    owner_id = inp.owner_id if (p.is_admin and inp.owner_id is not None) else p.user_id
    await enforce_agent_limit(ctx)
    await slug_free(ctx, slug)
    agent = await insert_agent(
        ctx, slug=slug, name=(inp.agent_name or "").strip() or slug, owner_id=owner_id, config=inp.agent_config
    )
    await ctx.audit(
        f"agent '{slug}' created (owner {owner_id})", target=("agent", agent.agent_id), agent_id=agent.agent_id
    )
    ctx.notify_updated(agent_uri(slug))
    ctx.notify_list_changed()
    fields = {k: v for k, v in agent_dict(agent).items() if k in CreateAgentOut.model_fields}
    return CreateAgentOut(**fields, message=f"Agent '{slug}' created.")


# --- get-agent --------------------------------------------------------------------------------


class GetAgentOut(Output):
    agent: AgentDetail = Field(description="The agent with resource counts, grants (admins) and your role")


@ability(
    "get-agent",
    toolset="agents",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="Get one agent: config, status, counts, grants.",
)
async def get_agent(ctx: AbilityContext, inp: AgentSelector) -> GetAgentOut:
    # Prebuilt Core statements through ctx.read: a read-only call opens no ORM session for them.
    agent = await require_agent_row(ctx, inp, DETAIL_BY_ID, DETAIL_BY_SLUG)
    role = await ctx.access.authorize(
        agent_owner(agent), "viewer", mutating=False, target={"type": "agent", "id": agent.agent_id}
    )
    return GetAgentOut.model_validate({"agent": await agent_detail(ctx, agent, role, agent)})


# --- list-agents ------------------------------------------------------------------------------


class ListAgentsIn(Input):
    scope: Literal["mine", "all"] = Field("mine", description="all: global admins")
    user_id: int | None = Field(None, ge=1, description="Subject user (global admins)")
    status: Literal["active", "inactive"] | None = Field(None, description="Status filter")
    include_role: bool = Field(False, description="Add user_role")
    per_page: int = Field(50, ge=1, le=100, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class AgentRow(Output):
    agent_id: int = Field(description="Agent id")
    agent_slug: str = Field(description="Slug")
    agent_name: str = Field(description="Display name")
    owner_id: int = Field(description="Owning user")
    status: Literal["active", "inactive"] = Field(description="Status")
    description: str = Field(description="agent_config.description, or empty")
    is_owner: bool = Field(description="The subject user owns the agent")
    user_role: Literal["viewer", "operator", "admin"] | None = Opt("The subject's role (with include_role)")


class ListAgentsOut(PageOut):
    agents: list[AgentRow] = Field(description="Agents ordered by agent_id")


@ability(
    "list-agents",
    core=True,
    toolset="agents",
    level="any",
    read_only=True,
    idempotent=True,
    description="List the agents you can access (or all, for global admins).",
)
async def list_agents(ctx: AbilityContext, inp: ListAgentsIn) -> ListAgentsOut:
    p = ctx.principal
    if inp.scope == "all" and not p.is_admin:
        raise AbilityError("agent_scope_forbidden", "scope=all needs a global administrator; use scope=mine.")
    subject = inp.user_id if inp.user_id is not None else p.user_id
    if subject != p.user_id and not p.is_admin:
        raise AbilityError(
            "agent_user_scope_forbidden",
            f"Only global administrators may list another user's agents (user_id {subject}); omit user_id.",
        )
    grant = and_(AgentAccess.agent_id == Agent.agent_id, AgentAccess.user_id == subject)
    query = select(Agent, AgentAccess.role).outerjoin(AgentAccess, grant)
    if inp.scope == "mine":
        query = query.where(or_(Agent.owner_id == subject, AgentAccess.user_id == subject))
    if p.agent_id is not None:
        query = query.where(Agent.agent_id == p.agent_id)
        if not p.is_admin and p.agent_id not in await ctx.access.agent_roles():
            query = query.where(Agent.agent_id == -1)
    if inp.status is not None:
        query = query.where(Agent.status == inp.status)
    total = (await ctx.session.execute(select(func.count()).select_from(query.subquery()))).scalar() or 0
    rows = await ctx.session.execute(query.order_by(Agent.agent_id).limit(inp.per_page).offset(inp.offset))
    agents = []
    for agent, role in rows.all():
        is_owner = agent.owner_id == subject
        row: dict[str, Any] = {
            "agent_id": agent.agent_id,
            "agent_slug": agent.agent_slug,
            "agent_name": agent.agent_name,
            "owner_id": agent.owner_id,
            "status": agent.status,
            "description": str((agent.agent_config or {}).get("description") or ""),
            "is_owner": is_owner,
        }
        if inp.include_role:
            row["user_role"] = "admin" if is_owner else role
        agents.append(row)
    return ListAgentsOut.model_validate(
        {"agents": agents, "total": total, "per_page": inp.per_page, "offset": inp.offset}
    )


# --- update-agent -----------------------------------------------------------------------------


class UpdateAgentIn(AgentSelector):
    agent_name: str | None = Field(None, max_length=200, description="New display name")
    agent_config: dict[str, Any] | None = Field(None, description="New config (replaces it)")
    status: Literal["active", "inactive"] | None = Field(None, description="inactive freezes it")
    owner_id: int | None = Field(None, ge=1, description="New owner (global admins)")


class UpdateAgentOut(Output):
    agent: AgentDetail = Field(description="The agent after the change (as get-agent)")
    updated_fields: list[str] = Field(description="Names of the fields that changed")
    message: str = Field(description="Human-readable result")


@ability(
    "update-agent",
    toolset="agents",
    level="admin",
    destructive=True,
    idempotent=True,
    description=("Update an agent's name, status, owner or config (replaced whole)."),
)
async def update_agent(ctx: AbilityContext, inp: UpdateAgentIn) -> UpdateAgentOut:
    if inp.agent_name is None and inp.agent_config is None and inp.status is None and inp.owner_id is None:
        raise AbilityError(
            "invalid_agent_update", "No fields to update. Provide agent_name, agent_config, status or owner_id."
        )
    p = ctx.principal
    # A global administrator is the one principal who may change an inactive agent (to reactivate it).
    agent, role = await load_agent(ctx, inp, "admin", mutating=not p.is_admin)
    if inp.owner_id is not None and not p.is_admin:
        raise AccessDenied(
            "permission_denied",
            "Transferring an agent (owner_id) needs a global administrator.",
            required_role="global_admin",
            effective_role=role,
            target={"type": "agent", "id": agent.agent_id},
            agent_id=agent.agent_id,
        )
    changed: list[str] = []
    if inp.agent_name is not None:
        name = inp.agent_name.strip()
        if not name:
            raise AbilityError("invalid_agent_name", "agent_name cannot be empty; give a display name.")
        if name != agent.agent_name:
            agent.agent_name = name
            changed.append("agent_name")
    if inp.agent_config is not None:
        config = normalize_agent_config(inp.agent_config)
        if config != (agent.agent_config or {}):
            agent.agent_config = config
            changed.append("agent_config")
    previous_status = agent.status
    if inp.status is not None and inp.status != agent.status:
        agent.status = inp.status
        changed.append("status")
    if inp.owner_id is not None and inp.owner_id != agent.owner_id:
        old_owner = agent.owner_id
        agent.owner_id = inp.owner_id
        await upsert_grant(ctx.session, agent.agent_id, inp.owner_id, "admin")
        await upsert_grant(ctx.session, agent.agent_id, old_owner, "admin")
        ctx.access.forget()
        changed.append("owner_id")
    if changed:
        agent.updated_at = utcnow()
        extra: dict[str, Any] = {}
        if "status" in changed:
            extra["status"] = {"from": previous_status, "to": agent.status}
        await ctx.audit(
            f"agent '{agent.agent_slug}' updated ({', '.join(changed)})",
            target=("agent", agent.agent_id),
            changes=changed,
            agent_id=agent.agent_id,
            **extra,
        )
        ctx.notify_updated(agent_uri(agent.agent_slug))
    await ctx.session.flush()
    caller_role = await ctx.access.effective_role(agent_owner(agent))
    detail = await agent_detail(ctx, agent, caller_role)
    message = f"Agent '{agent.agent_slug}' updated." if changed else "Nothing changed."
    return UpdateAgentOut.model_validate({"agent": detail, "updated_fields": changed, "message": message})


# --- rename-agent -----------------------------------------------------------------------------


class RenameAgentIn(Input):
    old_slug: str = Field(max_length=400, description="Current slug")
    new_slug: str = Field(max_length=400, description="New slug ([a-z0-9_-])")


class RenameAgentOut(Output):
    agent_id: int = Field(description="Agent id (unchanged)")
    old_slug: str = Field(description="Previous slug")
    new_slug: str = Field(description="Slug now in effect")
    message: str = Field(description="Human-readable result")


@ability(
    "rename-agent",
    toolset="agents",
    level="admin",
    idempotent=True,
    description="Change an agent's slug; ids, resources, grants and tokens stay.",
)
async def rename_agent(ctx: AbilityContext, inp: RenameAgentIn) -> RenameAgentOut:
    new_slug = slug_or_error(inp.new_slug)
    if not inp.old_slug.strip():
        raise AbilityError("invalid_agent_slug", "old_slug is required.")
    agent, _ = await load_agent(ctx, AgentSelector(agent_slug=inp.old_slug), "admin", mutating=True)
    if new_slug == agent.agent_slug:
        raise AbilityError("invalid_agent_slug", f"new_slug '{new_slug}' is the current slug; choose another.")
    await slug_free(ctx, new_slug)
    old = agent.agent_slug
    agent.agent_slug = new_slug
    agent.updated_at = utcnow()
    await ctx.audit(
        f"agent {agent.agent_id} renamed '{old}' -> '{new_slug}'",
        target=("agent", agent.agent_id),
        changes=["agent_slug"],
        agent_id=agent.agent_id,
    )
    ctx.notify_updated(agent_uri(old))
    ctx.notify_updated(agent_uri(new_slug))
    ctx.notify_list_changed()
    return RenameAgentOut(
        agent_id=agent.agent_id, old_slug=old, new_slug=new_slug, message=f"Agent renamed from '{old}' to '{new_slug}'."
    )


# --- delete-agent -----------------------------------------------------------------------------


class DeletedCounts(Output):
    access_grants: int = Field(description="Grants deleted")
    tokens: int = Field(description="Tokens deleted")


class DetachedCounts(Output):
    pipelines: int = Field(description="Pipelines whose agent_id became NULL")
    flows: int = Field(description="Flows whose agent_id became NULL")
    jobs: int = Field(description="Jobs whose agent_id became NULL")
    chat_sessions: int = Field(description="Chat sessions whose agent_id became NULL")


class DeleteAgentOut(Output):
    agent_id: int = Field(description="Deleted agent's id")
    agent_slug: str = Field(description="Deleted agent's slug")
    deleted: DeletedCounts = Field(description="Rows deleted with the agent")
    detached: DetachedCounts = Field(description="Rows kept, now owned by their users")
    message: str = Field(description="Human-readable result")


@ability(
    "delete-agent",
    toolset="agents",
    level="admin",
    destructive=True,
    idempotent=True,
    description=("Delete an agent with its grants and tokens (its pipelines, flows and jobs stay)."),
)
async def delete_agent(ctx: AbilityContext, inp: AgentSelector) -> DeleteAgentOut:
    agent, _ = await load_agent(ctx, inp, "admin", mutating=True)
    s = ctx.session
    aid = agent.agent_id

    async def count(model: Any, column: Any) -> int:
        return int((await s.execute(select(func.count()).select_from(model).where(column == aid))).scalar() or 0)

    deleted = {
        "access_grants": await count(AgentAccess, AgentAccess.agent_id),
        "tokens": await count(AgentToken, AgentToken.agent_id),
    }
    detached = {
        "pipelines": await count(Pipeline, Pipeline.agent_id),
        "flows": await count(Flow, Flow.agent_id),
        "jobs": await count(Job, Job.agent_id),
        "chat_sessions": await count(ChatSession, ChatSession.agent_id),
    }
    slug = agent.agent_slug
    await s.delete(agent)
    await s.flush()
    await ctx.audit(f"agent '{slug}' deleted", target=("agent", aid), agent_id=aid, deleted=deleted, detached=detached)
    ctx.notify_updated(agent_uri(slug))
    ctx.notify_list_changed()
    return DeleteAgentOut.model_validate(
        {
            "agent_id": aid,
            "agent_slug": slug,
            "deleted": deleted,
            "detached": detached,
            "message": f"Agent '{slug}' deleted.",
        }
    )
