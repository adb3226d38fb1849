"""get-pipelines: its input and output shapes and the paged, access-filtered query behind it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import ColumnElement, func, select

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.pipeline_common import owner_of
from datamachine_mcp.abilities.pipeline_views import PipelineOut, flows_out, pipeline_dict
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Input, Output
from datamachine_mcp.storage.models import Agent, Flow, Pipeline

OutputMode = Literal["full", "list", "summary", "ids"]


async def readable_flow_filter(ctx: AbilityContext) -> ColumnElement[bool]:
    return await ctx.access.scope_filter(Flow.agent_id, Flow.user_id)


class GetPipelinesIn(Input):
    pipeline_id: int | None = Field(None, ge=1, description="One pipeline")
    agent_id: int | None = Field(None, ge=1, description="Agent filter")
    user_id: int | None = Field(None, ge=0, description="User filter (0 = shared)")
    search: str | None = Field(None, max_length=255, description="Substring of the name")
    output_mode: OutputMode = Field("full", description="Row shape")
    include_flows: bool = Field(True, description="full: embed flows")
    per_page: int = Field(20, ge=1, le=100, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class PipelineSummaryOut(Output):
    pipeline_id: int = Field(description="Pipeline id")
    pipeline_name: str = Field(description="Name")
    flow_count: int = Field(description="Number of flows")


class GetPipelinesOut(Output):
    pipelines: list[PipelineOut | PipelineSummaryOut | int] = Field(
        description="Pipelines by pipeline_id: Pipeline (full, list), {pipeline_id, pipeline_name, flow_count} "
        "(summary) or ids"
    )
    total: int = Field(description="Readable pipelines matching the filters (before paging)")
    per_page: int = Field(description="Page size used")
    offset: int = Field(description="Offset used")
    output_mode: OutputMode = Field(description="Row shape used")


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def _readable_flows(ctx: AbilityContext, pipeline_ids: list[int]) -> list[Flow]:
    if not pipeline_ids:
        return []
    rows = await ctx.session.execute(
        select(Flow).where(Flow.pipeline_id.in_(pipeline_ids), await readable_flow_filter(ctx)).order_by(Flow.flow_id)
    )
    return list(rows.scalars())


async def _readable_flow_counts(ctx: AbilityContext, pipeline_ids: list[int]) -> dict[int, int]:
    if not pipeline_ids:
        return {}
    rows = await ctx.session.execute(
        select(Flow.pipeline_id, func.count())
        .where(Flow.pipeline_id.in_(pipeline_ids), await readable_flow_filter(ctx))
        .group_by(Flow.pipeline_id)
    )
    return {pid: n for pid, n in rows.all()}


async def pipeline_rows(
    ctx: AbilityContext, pipelines: list[Pipeline], mode: OutputMode, include_flows: bool
) -> list[Any]:
    if mode == "ids":
        return [p.pipeline_id for p in pipelines]
    ids = [p.pipeline_id for p in pipelines]
    if mode == "full" and include_flows:
        flows = await _readable_flows(ctx, ids)
        rendered = await flows_out(ctx, flows)
        by_pipeline: dict[int, list[dict[str, Any]]] = {pid: [] for pid in ids}
        for flow, row in zip(flows, rendered, strict=True):
            by_pipeline[flow.pipeline_id].append(row)
        return [
            pipeline_dict(p, flow_count=len(by_pipeline[p.pipeline_id]), flows=by_pipeline[p.pipeline_id])
            for p in pipelines
        ]
    counts = await _readable_flow_counts(ctx, ids)
    if mode == "summary":
        return [
            {"pipeline_id": p.pipeline_id, "pipeline_name": p.pipeline_name, "flow_count": counts.get(p.pipeline_id, 0)}
            for p in pipelines
        ]
    return [pipeline_dict(p, flow_count=counts.get(p.pipeline_id, 0)) for p in pipelines]


async def list_pipelines(ctx: AbilityContext, inp: GetPipelinesIn) -> GetPipelinesOut:
    s = ctx.session
    if inp.pipeline_id is not None:
        pipeline = await s.get(Pipeline, inp.pipeline_id)
        pipelines: list[Pipeline] = []
        if pipeline is not None:
            await ctx.access.authorize(
                await owner_of(ctx, pipeline.agent_id, pipeline.user_id),
                "viewer",
                mutating=False,
                target={"type": "pipeline", "id": pipeline.pipeline_id},
            )
            pipelines = [pipeline]
        total = len(pipelines)
    else:
        conds: list[ColumnElement[bool]] = [await ctx.access.scope_filter(Pipeline.agent_id, Pipeline.user_id)]
        if inp.agent_id is not None:
            agent = await s.get(Agent, inp.agent_id)
            await ctx.access.check_agent_filter(inp.agent_id, agent.agent_slug if agent is not None else None)
            conds.append(Pipeline.agent_id == inp.agent_id)
        elif inp.user_id is not None:
            ctx.access.check_user_filter(inp.user_id)
            conds.append(Pipeline.user_id == inp.user_id)
        if inp.search:
            conds.append(Pipeline.pipeline_name.ilike(_like(inp.search), escape="\\"))
        total = (await s.execute(select(func.count()).select_from(Pipeline).where(*conds))).scalar() or 0
        rows = await s.execute(
            select(Pipeline).where(*conds).order_by(Pipeline.pipeline_id).limit(inp.per_page).offset(inp.offset)
        )
        pipelines = list(rows.scalars())
    return GetPipelinesOut.model_validate(
        {
            "pipelines": await pipeline_rows(ctx, pipelines, inp.output_mode, inp.include_flows),
            "total": total,
            "per_page": inp.per_page,
            "offset": inp.offset,
            "output_mode": inp.output_mode,
        }
    )
