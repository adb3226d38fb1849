"""Flows toolset, part 1: get, create, update and delete flows.

get-flows' query is in ``abilities.flow_listing``; duplicate-flow in ``abilities.flow_duplicate``;
pausing, resuming and scheduling in ``abilities.flow_schedule``; flow steps in ``abilities.flow_steps``
and ``abilities.flow_steps_config``; prompt queues in ``abilities.queues`` and webhook triggers in
``abilities.webhook_triggers``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import delete, func, or_, select

from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_common import (
    DEFAULT_FLOW_NAME,
    SCHEDULE_DESC,
    ScheduleIn,
    clean_name,
    flow_data,
    new_flow_owner,
    schedule_from,
)
from datamachine_mcp.abilities.flow_listing import GetFlowsIn, GetFlowsOut, list_flows
from datamachine_mcp.abilities.flow_ops import StepConfigInput, create_flow_record, set_schedule
from datamachine_mcp.abilities.pipeline_common import load_flow, load_pipeline, ordered_steps
from datamachine_mcp.abilities.pipeline_views import FlowOut, flow_step_dict, mask_schedule, notify_flow
from datamachine_mcp.abilities.questions import confirmation
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.abilities.uris import FLOW
from datamachine_mcp.storage.models import Agent, Flow, Job, ProcessedItem
from datamachine_mcp.storage.timeutil import iso, utcnow

# --- get-flows (the query: abilities.flow_listing) --------------------------------------------


@ability(
    "get-flows",
    core=True,
    toolset="flows",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Get one flow or list flows: step configs, schedule, last and next run."),
)
async def get_flows(ctx: AbilityContext, inp: GetFlowsIn) -> GetFlowsOut:
    return await list_flows(ctx, inp)


# --- create-flow ------------------------------------------------------------------------------


class CreateFlowIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline")
    flow_name: str | None = Field(None, max_length=255, description='Name (default "Flow")')
    agent_id: int | None = Field(None, ge=1, description="Owner agent")
    scheduling_config: ScheduleIn | None = Field(None, description=SCHEDULE_DESC + " (default manual)")
    step_configs: dict[str, StepConfigInput] | None = Field(
        None,
        description="Keyed by pipeline_step_id or step_type",
    )
    validate_only: bool = Field(False, description="Dry run")


class CreateFlowOut(Output):
    flow_id: int = Field(description="New flow id")
    flow_name: str = Field(description="Name")
    pipeline_id: int = Field(description="Pipeline id")
    agent_id: int | None = Field(description="Owning agent")
    flow_data: FlowOut = Field(description="The new flow")
    synced_steps: list[str] = Field(description="flow_step_ids created from the pipeline's steps, in execution order")
    configured_steps: list[str] = Field(description="flow_step_ids that step_configs changed")
    next_run: str | None = Field(description="Next scheduled run (ISO 8601 UTC)")
    warnings: list[str] = Field(description="Steps still missing required handler fields, and similar notes")


class WouldCreate(Output):
    flow_name: str = Field(description="Name the flow would get")
    agent_id: int | None = Field(description="Owning agent it would get")
    scheduling_config: dict[str, Any] = Field(description="Schedule it would get")
    steps: list[dict[str, Any]] = Field(description="Its steps in execution order (FlowStep without ids)")


class CreateFlowPreview(Output):
    valid: bool = Field(description="Always true (an invalid request fails with its error code)")
    mode: Literal["validate_only"] = Field(description="validate_only")
    would_create: WouldCreate = Field(description="What create-flow would create")


def _preview_step(entry: dict[str, Any], pipeline_config: dict[str, Any] | None) -> dict[str, Any]:
    out = flow_step_dict(entry, pipeline_config)
    for key in ("flow_step_id", "flow_id"):
        out.pop(key, None)
    return out


@ability(
    "create-flow",
    core=True,
    links={"flow_id": FLOW},
    toolset="flows",
    level="admin",
    description=("Create a flow (a configured, schedulable instance of a pipeline)."),
)
async def create_flow(ctx: AbilityContext, inp: CreateFlowIn) -> CreateFlowOut | CreateFlowPreview:
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "viewer", mutating=False)
    agent_id, _ = await new_flow_owner(ctx, inp.agent_id, pipeline.agent_id)
    schedule = schedule_from(inp.scheduling_config)
    name = clean_name(inp.flow_name, DEFAULT_FLOW_NAME)
    kwargs: dict[str, Any] = {
        "flow_name": name,
        "agent_id": agent_id,
        "user_id": ctx.principal.user_id,
        "schedule": schedule,
        "step_configs": dict(inp.step_configs) if inp.step_configs else None,
    }
    if inp.validate_only:
        # Build the flow inside a savepoint and roll it back: the preview runs exactly the real code.
        savepoint = await ctx.session.begin_nested()
        try:
            flow, _, _ = await create_flow_record(ctx, pipeline, **kwargs)
            await ctx.session.flush()
            preview = {
                "flow_name": name,
                "agent_id": agent_id,
                "scheduling_config": mask_schedule(flow.scheduling_config),
                "steps": [_preview_step(s, pipeline.pipeline_config) for s in ordered_steps(flow.flow_config)],
            }
        finally:
            await savepoint.rollback()
        return CreateFlowPreview.model_validate({"valid": True, "mode": "validate_only", "would_create": preview})
    flow, configured, warnings = await create_flow_record(ctx, pipeline, **kwargs)
    data = await flow_data(ctx, flow)
    synced = [s["flow_step_id"] for s in ordered_steps(flow.flow_config)]
    await ctx.audit(
        f"flow '{flow.flow_name}' created from pipeline {pipeline.pipeline_id}",
        target=("flow", flow.flow_id),
        agent_id=flow.agent_id,
        flow_id=flow.flow_id,
        pipeline_id=flow.pipeline_id,
    )
    notify_flow(ctx, flow)
    ctx.notify_list_changed()
    return CreateFlowOut.model_validate(
        {
            "flow_id": flow.flow_id,
            "flow_name": flow.flow_name,
            "pipeline_id": flow.pipeline_id,
            "agent_id": flow.agent_id,
            "flow_data": data,
            "synced_steps": synced,
            "configured_steps": [s for s in synced if s in configured],
            "next_run": iso(flow.next_run_at),
            "warnings": warnings,
        }
    )


# --- update-flow ------------------------------------------------------------------------------


class UpdateFlowIn(Input):
    flow_id: int = Field(ge=1, description="Flow")
    flow_name: str | None = Field(None, max_length=255, description="New name")
    scheduling_config: ScheduleIn | None = Field(None, description="New schedule")
    agent_id: int | None = Field(None, ge=1, description="New owner agent")


class UpdateFlowOut(Output):
    flow_id: int = Field(description="Flow id")
    flow_name: str = Field(description="Name after the update")
    flow_data: FlowOut = Field(description="The flow after the update")
    updated_fields: list[str] = Field(description="Fields that changed")
    scheduling_unchanged: bool = Field(description="True when the schedule was not changed by this call")
    message: str = Field(description="Human-readable result")


@ability(
    "update-flow",
    toolset="flows",
    level="admin",
    idempotent=True,
    description="Rename a flow, change its schedule or move it to another agent.",
)
async def update_flow(ctx: AbilityContext, inp: UpdateFlowIn) -> UpdateFlowOut:
    if inp.flow_name is None and inp.scheduling_config is None and inp.agent_id is None:
        raise AbilityError("update_failed", "Provide flow_name, scheduling_config or agent_id")
    flow = await load_flow(ctx, inp.flow_id, "admin", mutating=True, lock=True)
    updated: list[str] = []
    name = None
    if inp.flow_name is not None:
        name = inp.flow_name.strip()
        if not name:
            raise AbilityError("update_failed", "flow_name cannot be empty; give a name or omit flow_name.")
    schedule = schedule_from(inp.scheduling_config) if inp.scheduling_config is not None else None
    if inp.agent_id is not None and inp.agent_id != flow.agent_id:
        agent = await ctx.session.get(Agent, inp.agent_id)
        if agent is None:
            raise AbilityError("agent_not_found", f"Agent {inp.agent_id} not found.", agent_id=inp.agent_id)
        await ctx.access.authorize(
            agent_owner(agent), "admin", mutating=True, target={"type": "agent", "id": agent.agent_id}
        )
        flow.agent_id = agent.agent_id
        updated.append("agent_id")
    if name is not None and name != flow.flow_name:
        flow.flow_name = name
        updated.append("flow_name")
    now = utcnow()
    if schedule is not None and set_schedule(flow, schedule, now=now):
        updated.append("scheduling_config")
    if updated:
        flow.updated_at = now
        await ctx.audit(
            f"flow {flow.flow_id} updated ({', '.join(updated)})",
            target=("flow", flow.flow_id),
            changes=updated,
            agent_id=flow.agent_id,
            flow_id=flow.flow_id,
            pipeline_id=flow.pipeline_id,
        )
        notify_flow(ctx, flow)
        message = f"Flow {flow.flow_id} updated: {', '.join(updated)}."
    else:
        message = f"Flow {flow.flow_id} already had these values; nothing changed."
    return UpdateFlowOut.model_validate(
        {
            "flow_id": flow.flow_id,
            "flow_name": flow.flow_name,
            "flow_data": await flow_data(ctx, flow),
            "updated_fields": updated,
            "scheduling_unchanged": "scheduling_config" not in updated,
            "message": message,
        }
    )


# --- delete-flow ------------------------------------------------------------------------------


class FlowIdIn(Input):
    flow_id: int = Field(ge=1, description="Flow id")


class DeleteFlowOut(Output):
    flow_id: int = Field(description="Deleted flow")
    pipeline_id: int = Field(description="Its pipeline")
    deleted_jobs: int = Field(description="Jobs deleted with it (children included)")
    deleted_processed_items: int = Field(description="Processed-item rows deleted with it")
    message: str = Field(description="Human-readable result")


@ability(
    "delete-flow",
    ask=confirmation(lambda i: f"Delete flow {i.flow_id} with its jobs and processed-item history?"),
    toolset="flows",
    level="admin",
    destructive=True,
    idempotent=True,
    description="Delete a flow with its jobs and processed-item history.",
)
async def delete_flow(ctx: AbilityContext, inp: FlowIdIn) -> DeleteFlowOut:
    flow = await load_flow(ctx, inp.flow_id, "admin", mutating=True, lock=True)
    own_jobs = select(Job.job_id).where(Job.flow_key == flow.flow_id)
    jobs = (
        await ctx.session.execute(
            select(func.count())
            .select_from(Job)
            .where(or_(Job.flow_key == flow.flow_id, Job.parent_job_id.in_(own_jobs.scalar_subquery())))
        )
    ).scalar() or 0
    items = (
        await ctx.session.execute(
            select(func.count()).select_from(ProcessedItem).where(ProcessedItem.flow_key == flow.flow_id)
        )
    ).scalar() or 0
    flow_id, pipeline_id, name, agent_id = flow.flow_id, flow.pipeline_id, flow.flow_name, flow.agent_id
    # The database cascade removes the jobs (and their children) and processed items.
    await ctx.session.execute(delete(Flow).where(Flow.flow_id == flow_id).execution_options(synchronize_session=False))
    ctx.session.expunge(flow)
    await ctx.audit(
        f"flow '{name}' deleted ({jobs} jobs, {items} processed items)",
        target=("flow", flow_id),
        agent_id=agent_id,
        flow_id=flow_id,
        pipeline_id=pipeline_id,
        deleted_jobs=jobs,
        deleted_processed_items=items,
    )
    ctx.notify_updated(f"datamachine://flows/{flow_id}")
    ctx.notify_updated(f"datamachine://pipelines/{pipeline_id}")
    ctx.notify_list_changed()
    return DeleteFlowOut(
        flow_id=flow_id,
        pipeline_id=pipeline_id,
        deleted_jobs=jobs,
        deleted_processed_items=items,
        message=f"Flow {flow_id} deleted with {jobs} job(s) and {items} processed item(s).",
    )
