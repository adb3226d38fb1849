"""Shared pieces of the flow tools: the schedule input, names, owners of new flows."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import normalize_schedule
from datamachine_mcp.abilities.json_schema import UNPUBLISHED
from datamachine_mcp.abilities.pipeline_common import owner_of
from datamachine_mcp.abilities.pipeline_views import flows_out
from datamachine_mcp.abilities.schema import Input
from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.storage.models import Agent, Flow

DEFAULT_FLOW_NAME = "Flow"
SCHEDULE_DESC = "Schedule"


class ScheduleIn(Input):
    """The client keys of a scheduling_config; derived keys are accepted and ignored."""

    interval: str = Field(
        max_length=200,
        description="manual, one_time, an interval key (hourly…) or a cron expression",
    )
    timestamp: int | str | None = Field(None, description="one_time: Unix seconds or ISO 8601")
    cron_expression: str | None = Field(None, max_length=200, description="cron: 5 fields or a macro (@daily)")
    timezone: str | None = Field(None, max_length=100, description="cron: IANA zone (default UTC)")
    enabled: bool | None = Field(None, description="false = paused")
    allow_overlap: bool | None = Field(None, description="Runs may overlap")
    # Keys get-flows shows but the server derives: accepted (a shown config can be sent back) and ignored;
    # not published.
    interval_seconds: Any = Field(None, description="Ignored (derived)", json_schema_extra=UNPUBLISHED)
    first_run: Any = Field(None, description="Ignored (derived)", json_schema_extra=UNPUBLISHED)
    next_run: Any = Field(None, description="Ignored (derived)", json_schema_extra=UNPUBLISHED)
    last_skip: Any = Field(None, description="Ignored (derived)", json_schema_extra=UNPUBLISHED)
    webhook: Any = Field(None, description="Ignored (webhook tools)", json_schema_extra=UNPUBLISHED)

    def client(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k in sched.CLIENT_KEYS and v is not None}


def schedule_from(value: ScheduleIn | None) -> dict[str, Any]:
    """Validated client keys (docs/engine.md, Schedule types); no input means manual."""
    return normalize_schedule(value.client() if value is not None else {"interval": "manual"})


def clean_name(raw: str | None, default: str) -> str:
    name = (raw or "").strip()
    return name[:255] if name else default


async def flow_data(ctx: AbilityContext, flow: Flow) -> dict[str, Any]:
    await ctx.session.flush()
    return (await flows_out(ctx, [flow]))[0]


def flow_target(flow_id: int | None) -> dict[str, Any]:
    return {"type": "flow", "id": flow_id}


async def new_flow_owner(
    ctx: AbilityContext, agent_id: int | None, fallback_agent: int | None
) -> tuple[int | None, Owner]:
    """Owner of a new flow: the agent_id input, else the pipeline's agent, else the caller's."""
    p = ctx.principal
    if agent_id is not None:
        if await ctx.session.get(Agent, agent_id) is None:
            raise AbilityError("agent_not_found", f"Agent {agent_id} not found.", agent_id=agent_id)
        chosen: int | None = agent_id
    else:
        chosen = fallback_agent if fallback_agent is not None else p.agent_id
    owner = await owner_of(ctx, chosen, p.user_id)
    target = {"type": "agent", "id": chosen} if chosen is not None else {"type": "user", "id": p.user_id}
    await ctx.access.authorize(owner, "admin", mutating=True, target=target)
    return chosen, owner
