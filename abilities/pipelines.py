"""Pipelines toolset, part 1: get, create, update, delete and duplicate pipelines (get-pipelines' query is
in ``abilities.pipeline_listing``, create-pipeline's call in ``abilities.pipeline_create``).

Steps are edited in ``abilities.pipeline_steps`` and ``abilities.pipeline_steps_order``; export/import live
in ``abilities.pipeline_export`` and ``abilities.pipeline_import``; the step-type and handler registries in
``abilities.handler_catalog``. Workflow steps (create-pipeline's workflow mode) are checked by
``abilities.pipeline_workflow``.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field
from sqlalchemy import delete, func, or_, select

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import create_flow_record
from datamachine_mcp.abilities.pipeline_common import (
    load_pipeline,
    new_pipeline_step_id,
    ordered_steps,
    owner_of,
    sync_flow_config,
)
from datamachine_mcp.abilities.pipeline_copy import copied_schedule, remap_flow_config, strip_step_secrets
from datamachine_mcp.abilities.pipeline_create import (
    CreatePipelineIn,
    CreatePipelineOut,
    CreatePipelineValidateOut,
    create,
    pipeline_name_or_error,
)
from datamachine_mcp.abilities.pipeline_listing import GetPipelinesIn, GetPipelinesOut, list_pipelines
from datamachine_mcp.abilities.pipeline_shapes import agent_or_error
from datamachine_mcp.abilities.pipeline_views import notify_flow, notify_pipeline
from datamachine_mcp.abilities.questions import confirmation
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.abilities.uris import FLOW, PIPELINE
from datamachine_mcp.storage.models import Flow, Job, Pipeline, ProcessedItem
from datamachine_mcp.storage.timeutil import utcnow

# --- get-pipelines (the query: abilities.pipeline_listing) ------------------------------------


@ability(
    "get-pipelines",
    core=True,
    toolset="pipelines",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Get one pipeline or list pipelines, with their steps and optionally flows."),
)
async def get_pipelines(ctx: AbilityContext, inp: GetPipelinesIn) -> GetPipelinesOut:
    return await list_pipelines(ctx, inp)


# --- create-pipeline (the call: abilities.pipeline_create) ------------------------------------


@ability(
    "create-pipeline",
    core=True,
    links={"pipeline_id": PIPELINE, "flow_id": FLOW},
    toolset="pipelines",
    level="admin",
    description=("Create a pipeline (a reusable step template), optionally with steps and its first flow."),
)
async def create_pipeline(ctx: AbilityContext, inp: CreatePipelineIn) -> CreatePipelineOut | CreatePipelineValidateOut:
    return await create(ctx, inp)


# --- update-pipeline --------------------------------------------------------------------------


class UpdatePipelineIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline")
    pipeline_name: str | None = Field(None, max_length=255, description="New name")
    agent_id: int | None = Field(None, ge=1, description="New owner agent")


class UpdatePipelineOut(Output):
    pipeline_id: int = Field(description="Pipeline id")
    pipeline_name: str = Field(description="Name after the update")
    agent_id: int | None = Field(description="Owning agent after the update")
    flows_moved: int = Field(description="Flows re-homed to the new agent")
    message: str = Field(description="Human-readable result")


@ability(
    "update-pipeline",
    toolset="pipelines",
    level="admin",
    idempotent=True,
    description="Rename a pipeline or move it and its flows to another agent.",
)
async def update_pipeline(ctx: AbilityContext, inp: UpdatePipelineIn) -> UpdatePipelineOut:
    if inp.pipeline_name is None and inp.agent_id is None:
        raise AbilityError("invalid_pipeline_update", "Must provide pipeline_name or agent_id to update")
    name = pipeline_name_or_error(inp.pipeline_name) if inp.pipeline_name is not None else None
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "admin", mutating=True, lock=True)
    changes: list[str] = []
    moved: list[Flow] = []
    old_name = pipeline.pipeline_name
    now = utcnow()
    if inp.agent_id is not None and inp.agent_id != pipeline.agent_id:
        agent = await agent_or_error(ctx, inp.agent_id)
        await ctx.access.authorize(
            agent_owner(agent), "admin", mutating=True, target={"type": "agent", "id": inp.agent_id}
        )
        flows = list(
            (
                await ctx.session.execute(
                    ctx.db.for_update(
                        select(Flow).where(Flow.pipeline_id == pipeline.pipeline_id).order_by(Flow.flow_id)
                    )
                )
            ).scalars()
        )
        for flow in flows:
            if flow.agent_id == inp.agent_id:
                continue
            await ctx.access.authorize(
                await owner_of(ctx, flow.agent_id, flow.user_id),
                "admin",
                mutating=True,
                target={"type": "flow", "id": flow.flow_id},
            )
            flow.agent_id = inp.agent_id
            flow.updated_at = now
            moved.append(flow)
        pipeline.agent_id = inp.agent_id
        changes.append("agent_id")
    if name is not None and name != pipeline.pipeline_name:
        pipeline.pipeline_name = name
        changes.append("pipeline_name")
    if not changes:
        return UpdatePipelineOut(
            pipeline_id=pipeline.pipeline_id,
            pipeline_name=pipeline.pipeline_name,
            agent_id=pipeline.agent_id,
            flows_moved=0,
            message="Nothing to change: the pipeline already has this name and agent.",
        )
    pipeline.updated_at = now
    parts = []
    if "pipeline_name" in changes:
        parts.append(f"renamed from '{old_name}' to '{pipeline.pipeline_name}'")
    if "agent_id" in changes:
        parts.append(f"moved to agent {pipeline.agent_id} with {len(moved)} flow(s)")
    summary = f"pipeline {pipeline.pipeline_id} " + " and ".join(parts)
    await ctx.audit(
        summary,
        target=("pipeline", pipeline.pipeline_id),
        changes=changes,
        agent_id=pipeline.agent_id,
        pipeline_id=pipeline.pipeline_id,
    )
    notify_pipeline(ctx, pipeline.pipeline_id)
    for flow in moved:
        notify_flow(ctx, flow)
    return UpdatePipelineOut(
        pipeline_id=pipeline.pipeline_id,
        pipeline_name=pipeline.pipeline_name,
        agent_id=pipeline.agent_id,
        flows_moved=len(moved),
        message=f"Pipeline {pipeline.pipeline_id} " + " and ".join(parts) + ".",
    )


# --- delete-pipeline --------------------------------------------------------------------------


class DeletePipelineIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline")


class DeletePipelineOut(Output):
    pipeline_id: int = Field(description="Deleted pipeline id")
    pipeline_name: str = Field(description="Its name")
    deleted_flows: int = Field(description="Flows deleted with it")
    deleted_jobs: int = Field(description="Jobs deleted with it (children included)")
    deleted_processed_items: int = Field(description="Processed-item rows deleted with it")
    message: str = Field(description="Human-readable result")


@ability(
    "delete-pipeline",
    ask=confirmation(lambda i: f"Delete pipeline {i.pipeline_id} with all its flows, jobs and processed-item history?"),
    toolset="pipelines",
    level="admin",
    destructive=True,
    idempotent=True,
    description=("Delete a pipeline with its flows, jobs and processed-item history."),
)
async def delete_pipeline(ctx: AbilityContext, inp: DeletePipelineIn) -> DeletePipelineOut:
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "admin", mutating=True, lock=True)
    s = ctx.session
    pid = pipeline.pipeline_id
    flow_ids = list((await s.execute(select(Flow.flow_id).where(Flow.pipeline_id == pid))).scalars())
    # Counted before deleting: the database cascade removes the rows (docs/storage.md, Foreign keys and cascades).
    jobs = (
        await s.execute(
            select(func.count()).select_from(Job).where(or_(Job.pipeline_key == pid, Job.flow_key.in_(flow_ids)))
        )
    ).scalar() or 0
    items = 0
    if flow_ids:
        items = (
            await s.execute(select(func.count()).select_from(ProcessedItem).where(ProcessedItem.flow_key.in_(flow_ids)))
        ).scalar() or 0
    name = pipeline.pipeline_name
    await s.execute(delete(Pipeline).where(Pipeline.pipeline_id == pid))
    s.expunge(pipeline)
    await ctx.audit(
        f"pipeline '{name}' ({pid}) deleted with {len(flow_ids)} flow(s), {jobs} job(s), {items} processed item(s)",
        target=("pipeline", pid),
        changes=["deleted"],
        agent_id=pipeline.agent_id,
        pipeline_id=pid,
    )
    notify_pipeline(ctx, pid, list_changed=True)
    for flow_id in flow_ids:
        ctx.notify_updated(f"datamachine://flows/{flow_id}")
    return DeletePipelineOut(
        pipeline_id=pid,
        pipeline_name=name,
        deleted_flows=len(flow_ids),
        deleted_jobs=jobs,
        deleted_processed_items=items,
        message=(
            f"Pipeline '{name}' deleted with {len(flow_ids)} flow(s), {jobs} job(s) and {items} processed item(s)."
        ),
    )


# --- duplicate-pipeline -----------------------------------------------------------------------


class DuplicatePipelineIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline")
    new_name: str | None = Field(None, max_length=255, description='Default "Copy of {name}"')
    agent_id: int | None = Field(None, ge=1, description="Owner agent")


class DuplicatePipelineOut(Output):
    pipeline_id: int = Field(description="The copy's id")
    pipeline_name: str = Field(description="The copy's name")
    source_pipeline_id: int = Field(description="Source pipeline id")
    source_pipeline_name: str = Field(description="Source pipeline name")
    flows_created: int = Field(description="Flows copied")
    flow_ids: list[int] = Field(description="Ids of the copied flows, in source order")


@ability(
    "duplicate-pipeline",
    toolset="pipelines",
    level="admin",
    description=("Copy a pipeline and its flows."),
)
async def duplicate_pipeline(ctx: AbilityContext, inp: DuplicatePipelineIn) -> DuplicatePipelineOut:
    name = pipeline_name_or_error(inp.new_name) if inp.new_name is not None else None
    source = await load_pipeline(ctx, inp.pipeline_id, "viewer", mutating=False)
    source_role = await ctx.access.effective_role(await owner_of(ctx, source.agent_id, source.user_id))
    p = ctx.principal
    target_agent = inp.agent_id if inp.agent_id is not None else source.agent_id
    if target_agent is not None:
        agent = await agent_or_error(ctx, target_agent)
        await ctx.access.authorize(
            agent_owner(agent), "admin", mutating=True, target={"type": "agent", "id": target_agent}
        )
    else:
        await ctx.access.authorize(
            Owner(agent_id=None, user_id=p.user_id), "admin", mutating=True, target={"type": "user", "id": p.user_id}
        )
    name = name or f"Copy of {source.pipeline_name}"[:255]
    now = utcnow()
    copy_pipeline = Pipeline(
        user_id=p.user_id,
        agent_id=target_agent,
        pipeline_name=name,
        pipeline_config={},
        created_at=now,
        updated_at=now,
    )
    ctx.session.add(copy_pipeline)
    await ctx.session.flush()
    new_pid = copy_pipeline.pipeline_id
    # Secret envelopes are copied as they are only for callers who administer the source; a viewer's
    # copy would otherwise let them point the credential at a server of their choosing.
    step_map: dict[str, str] = {}
    config: dict[str, Any] = {}
    for i, step in enumerate(ordered_steps(source.pipeline_config)):
        new_psid = new_pipeline_step_id(new_pid)
        step_map[step["pipeline_step_id"]] = new_psid
        copied = copy.deepcopy(step)
        if source_role != "admin":
            copied = strip_step_secrets(copied)
        copied.update(pipeline_step_id=new_psid, execution_order=i)
        config[new_psid] = copied
    copy_pipeline.pipeline_config = config

    flows = (
        (await ctx.session.execute(select(Flow).where(Flow.pipeline_id == source.pipeline_id).order_by(Flow.flow_id)))
        .scalars()
        .all()
    )
    created: list[Flow] = []
    for flow in flows:
        role = await ctx.access.effective_role(await owner_of(ctx, flow.agent_id, flow.user_id))
        if role is None:
            continue  # flows the caller cannot read are not copied
        new_flow, _, _ = await create_flow_record(
            ctx,
            copy_pipeline,
            flow_name=flow.flow_name,
            agent_id=target_agent,
            user_id=p.user_id,
            schedule=copied_schedule(flow.scheduling_config),
        )
        remapped = remap_flow_config(
            flow.flow_config, step_map, flow_id=new_flow.flow_id, pipeline_id=new_pid, keep_secrets=role == "admin"
        )
        new_flow.flow_config = sync_flow_config(remapped, config, flow_id=new_flow.flow_id, pipeline_id=new_pid)
        created.append(new_flow)
    await ctx.audit(
        f"pipeline {source.pipeline_id} duplicated as '{name}' ({new_pid}) with {len(created)} flow(s)",
        target=("pipeline", new_pid),
        changes=["pipeline", *(["flows"] if created else [])],
        agent_id=target_agent,
        pipeline_id=new_pid,
        source_pipeline_id=source.pipeline_id,
    )
    notify_pipeline(ctx, new_pid, list_changed=True)
    for flow in created:
        notify_flow(ctx, flow)
    return DuplicatePipelineOut(
        pipeline_id=new_pid,
        pipeline_name=name,
        source_pipeline_id=source.pipeline_id,
        source_pipeline_name=source.pipeline_name,
        flows_created=len(created),
        flow_ids=[f.flow_id for f in created],
    )
