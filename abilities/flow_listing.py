"""get-flows: its input and output shapes and the paged, access-filtered query behind it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_common import (
    flow_target,
)
from datamachine_mcp.abilities.pipeline_common import owner_of
from datamachine_mcp.abilities.pipeline_views import FlowOut, flows_out
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Input, Output
from datamachine_mcp.storage.models import Agent, Flow


class GetFlowsIn(Input):
    flow_id: int | None = Field(None, ge=1, description="One flow")
    pipeline_id: int | None = Field(None, ge=1, description="Pipeline filter")
    agent_id: int | None = Field(None, ge=1, description="Agent filter")
    user_id: int | None = Field(None, ge=0, description="User filter (0 = shared)")
    handler_slug: str | None = Field(None, max_length=100, description="Flows using this handler")
    output_mode: Literal["full", "list", "summary", "ids"] = Field(
        "full",
        description="Row shape",
    )
    per_page: int = Field(20, ge=1, le=100, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class FlowSummaryOut(Output):
    flow_id: int = Field(description="Flow id")
    flow_name: str = Field(description="Name")
    pipeline_id: int = Field(description="Pipeline id")
    last_run_status: str | None = Field(description="Display status of the newest finished run")


class GetFlowsOut(Output):
    flows: list[FlowOut | FlowSummaryOut | int] = Field(description="Rows in the shape of output_mode, by flow_id")
    total: int = Field(description="Readable flows matching the filters")
    per_page: int = Field(description="Page size used")
    offset: int = Field(description="Offset used")
    output_mode: str = Field(description="Row shape used")
    filters_applied: dict[str, Any] = Field(description="The filters that were applied")


def _uses_handler(flow: Flow, slug: str) -> bool:
    return any(
        isinstance(step, dict) and slug in (step.get("handler_slugs") or [])
        for step in (flow.flow_config or {}).values()
    )


async def _rows(ctx: AbilityContext, flows: list[Flow], mode: str) -> list[Any]:
    if mode == "ids":
        return [f.flow_id for f in flows]
    if mode == "summary":
        return [
            {
                "flow_id": f.flow_id,
                "flow_name": f.flow_name,
                "pipeline_id": f.pipeline_id,
                "last_run_status": f.last_run_status,
            }
            for f in flows
        ]
    return await flows_out(ctx, flows, full=mode == "full")


async def list_flows(ctx: AbilityContext, inp: GetFlowsIn) -> GetFlowsOut:
    common = {"per_page": inp.per_page, "offset": inp.offset, "output_mode": inp.output_mode}
    if inp.flow_id is not None:
        flow = await ctx.session.get(Flow, inp.flow_id)
        rows: list[Any] = []
        if flow is not None:
            await ctx.access.authorize(
                await owner_of(ctx, flow.agent_id, flow.user_id),
                "viewer",
                mutating=False,
                target=flow_target(flow.flow_id),
            )
            rows = await _rows(ctx, [flow], inp.output_mode)
        return GetFlowsOut.model_validate(
            {"flows": rows, "total": len(rows), **common, "filters_applied": {"flow_id": inp.flow_id}}
        )
    applied: dict[str, Any] = {}
    conds = [await ctx.access.scope_filter(Flow.agent_id, Flow.user_id)]
    if inp.pipeline_id is not None:
        conds.append(Flow.pipeline_id == inp.pipeline_id)
        applied["pipeline_id"] = inp.pipeline_id
    if inp.agent_id is not None:
        agent = await ctx.session.get(Agent, inp.agent_id)
        if agent is None:
            raise AbilityError("agent_not_found", f"Agent {inp.agent_id} not found.", agent_id=inp.agent_id)
        await ctx.access.check_agent_filter(agent.agent_id, agent.agent_slug)
        conds.append(Flow.agent_id == inp.agent_id)
        applied["agent_id"] = inp.agent_id
    elif inp.user_id is not None:
        ctx.access.check_user_filter(inp.user_id)
        conds.append(Flow.user_id == inp.user_id)
        applied["user_id"] = inp.user_id
    if inp.handler_slug is not None:
        applied["handler_slug"] = inp.handler_slug
        everything = (await ctx.session.execute(select(Flow).where(*conds).order_by(Flow.flow_id))).scalars().all()
        matching = [f for f in everything if _uses_handler(f, inp.handler_slug)]
        total = len(matching)
        page = matching[inp.offset : inp.offset + inp.per_page]
    else:
        total = (await ctx.session.execute(select(func.count()).select_from(Flow).where(*conds))).scalar() or 0
        page = list(
            (
                await ctx.session.execute(
                    select(Flow).where(*conds).order_by(Flow.flow_id).limit(inp.per_page).offset(inp.offset)
                )
            ).scalars()
        )
    return GetFlowsOut.model_validate(
        {"flows": await _rows(ctx, page, inp.output_mode), "total": total, **common, "filters_applied": applied}
    )
