"""get-agent's agent object: the agent, its resource counts, its grants (for admins) and the caller's role.

update-agent answers with the same object.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BindParameter, Row, bindparam, func, select

from datamachine_mcp.abilities.access import ROLE_RANK
from datamachine_mcp.abilities.agent_common import agent_dict, grant_dict, grants_order
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.storage.models import Agent, AgentAccess, ChatSession, Flow, Job, Pipeline

ACTIVE = ("pending", "processing", "waiting")


def _count(model: Any, *conds: Any) -> Any:
    return select(func.count()).select_from(model).where(*conds).scalar_subquery()


def _counts(aid: Any) -> tuple[Any, ...]:
    return (
        _count(Pipeline, Pipeline.agent_id == aid).label("pipelines"),
        _count(Flow, Flow.agent_id == aid).label("flows"),
        _count(Job, Job.agent_id == aid, Job.status.in_(ACTIVE)).label("active_jobs"),
        _count(ChatSession, ChatSession.agent_id == aid).label("chat_sessions"),
    )


_AID: BindParameter[int] = bindparam("aid")
# Built once: statement construction is a large share of a short read's cost.
COUNTS = select(*_counts(_AID))
_GRANTS = select(AgentAccess.__table__).where(AgentAccess.agent_id == _AID).order_by(*grants_order(bindparam("owner")))
# get-agent reads the agent and its counts in one statement.
_DETAIL = select(Agent.__table__, *_counts(Agent.agent_id))
DETAIL_BY_ID = _DETAIL.where(Agent.agent_id == bindparam("agent_id"))
DETAIL_BY_SLUG = _DETAIL.where(Agent.agent_slug == bindparam("agent_slug"))


async def agent_detail(
    ctx: AbilityContext, agent: Agent | Row[Any], role: str | None, counted: Row[Any] | None = None
) -> dict[str, Any]:
    """get-agent's agent object: Agent + resource_counts + access (admins) + caller_role. ``counted``: a
    row that already holds the counts."""
    aid = agent.agent_id
    if counted is None:
        counted = (await ctx.read(COUNTS, {"aid": aid})).one()
    counts = {key: getattr(counted, key) for key in ("pipelines", "flows", "active_jobs", "chat_sessions")}
    caller_role = ctx.principal.cap_role(role)
    access = None
    if ctx.principal.is_admin or (caller_role is not None and ROLE_RANK[caller_role] >= ROLE_RANK["admin"]):
        rows = await ctx.read(_GRANTS, {"aid": aid, "owner": agent.owner_id})
        access = [grant_dict(g, agent.owner_id) for g in rows.all()]
    return {**agent_dict(agent), "resource_counts": counts, "access": access, "caller_role": caller_role}
