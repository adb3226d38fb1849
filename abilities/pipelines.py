"""Pipelines toolset, part 1: get, create, update, delete and duplicate pipelines.

Steps are edited in ``abilities.pipeline_steps`` and ``abilities.pipeline_steps_order``; export/import live
in ``abilities.pipeline_export`` and ``abilities.pipeline_import``; the step-type and handler registries in
``abilities.handler_catalog``. Workflow steps (create-pipeline's workflow mode) are checked by
``abilities.pipeline_workflow``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import ColumnElement, delete, func, or_, select

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import create_flow_record, normalize_schedule
from datamachine_mcp.abilities.pipeline_common import (
    PipelineOut,
    build_pipeline_step,
    flows_out,
    load_pipeline,
    make_flow_step_id,
    new_pipeline_step_id,
    notify_flow,
    notify_pipeline,
    ordered_steps,
    owner_of,
    pipeline_dict,
    pipeline_step_dict,
    sync_flow_config,
)
from datamachine_mcp.abilities.pipeline_copy import copied_schedule, remap_flow_config, strip_step_secrets
from datamachine_mcp.abilities.pipeline_shapes import StepSeedIn, agent_or_error, new_resource_owner, seed_of
from datamachine_mcp.abilities.pipeline_workflow import WorkflowIn, validate_workflow
from datamachine_mcp.abilities.questions import confirmation
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Input, Output
from datamachine_mcp.abilities.uris import FLOW, PIPELINE
from datamachine_mcp.storage.models import Agent, Flow, Job, Pipeline, ProcessedItem
from datamachine_mcp.storage.timeutil import utcnow

OutputMode = Literal["full", "list", "summary", "ids"]


# --- shared by the pipeline tools ---------------------------------------------------------------


def pipeline_name_or_error(raw: str) -> str:
    name = raw.strip()
    if not name:
        raise AbilityError("invalid_pipeline_name", "Pipeline name cannot be empty")
    return name


async def readable_flow_filter(ctx: AbilityContext) -> ColumnElement[bool]:
    return await ctx.access.scope_filter(Flow.agent_id, Flow.user_id)


# --- get-pipelines ----------------------------------------------------------------------------


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


# --- create-pipeline --------------------------------------------------------------------------


class PipelineStepIn(StepSeedIn):
    step_type: str = Field(
        max_length=50, description="fetch, ai, publish, update, approval, webhook_gate or system_task"
    )


class FlowConfigIn(Input):
    flow_name: str | None = Field(None, max_length=255, description="Flow name")
    scheduling_config: dict[str, Any] | None = Field(None, description="Schedule")


class CreatePipelineIn(Input):
    pipeline_name: str = Field(max_length=255, description="Pipeline name")
    agent_id: int | None = Field(None, ge=1, description="Owner agent")
    shared: bool = Field(False, description="Shared (global admins)")
    steps: list[PipelineStepIn] | None = Field(None, max_length=50, description="Steps in order")
    workflow: WorkflowIn | None = Field(None, description="Steps with flow config (creates the flow)")
    flow_config: FlowConfigIn | None = Field(None, description="Also create a first flow")
    validate_only: bool = Field(False, description="Dry run")


class CreatePipelineOut(Output):
    pipeline_id: int = Field(description="New pipeline id")
    pipeline_name: str = Field(description="Name")
    agent_id: int | None = Field(description="Owning agent")
    flow_id: int | None = Field(description="Flow created with it, if any")
    flow_name: str | None = Field(description="Name of that flow")
    steps_created: int = Field(description="Number of steps")
    pipeline_step_ids: list[str] = Field(description="Step ids in execution order")
    flow_step_ids: list[str] = Field(description="The flow's step ids in execution order (empty without a flow)")
    creation_mode: Literal["simple", "batch", "workflow"] = Field(description="simple, batch or workflow")
    warnings: list[str] = Field(description="Configs that still miss required fields, etc.")


class WouldCreateOut(Output):
    pipeline_name: str = Field(description="Name")
    agent_id: int | None = Field(description="Owning agent")
    steps: list[dict[str, Any]] = Field(description="Steps that would be created, in order (secrets masked)")
    flow: dict[str, Any] | None = Field(description="Flow that would be created: {flow_name, scheduling_config}")


class CreatePipelineValidateOut(Output):
    valid: Literal[True] = Field(description="Always true: invalid input is an error")
    mode: Literal["validate_only"] = Field(description="validate_only")
    would_create: WouldCreateOut = Field(description="What a real call would create")


def _with_step(err: AbilityError, index: int) -> AbilityError:
    return AbilityError(err.code, err.message, **{**err.data, "step": index})


def _preview(step: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pipeline_step_dict(step).items() if k != "pipeline_step_id"}


@ability(
    "create-pipeline",
    core=True,
    links={"pipeline_id": PIPELINE, "flow_id": FLOW},
    toolset="pipelines",
    level="admin",
    description=("Create a pipeline (a reusable step template), optionally with steps and its first flow."),
)
async def create_pipeline(ctx: AbilityContext, inp: CreatePipelineIn) -> CreatePipelineOut | CreatePipelineValidateOut:
    name = pipeline_name_or_error(inp.pipeline_name)
    if inp.steps is not None and inp.workflow is not None:
        raise AbilityError(
            "invalid_pipeline_steps", "Give either steps (batch mode) or workflow (workflow mode), not both."
        )
    agent_id, user_id = await new_resource_owner(ctx, inp.agent_id, shared=inp.shared)
    mode: Literal["simple", "batch", "workflow"] = (
        "workflow" if inp.workflow is not None else "batch" if inp.steps else "simple"
    )
    snap = await ctx.settings()
    roots = snap.files_roots()
    # Everything that can fail on the input is checked before anything is written.
    workflow_steps = validate_workflow(ctx, inp.workflow.steps, roots) if inp.workflow is not None else []
    seeds = [w["seed"] for w in workflow_steps] if mode == "workflow" else [seed_of(s) for s in inp.steps or []]
    preview_steps = []
    for i, seed in enumerate(seeds):
        try:
            preview_steps.append(build_pipeline_step(0, seed, i, box=ctx.runtime.box, files_roots=roots))
        except AbilityError as err:
            raise _with_step(err, i) from None
    with_flow = mode == "workflow" or inp.flow_config is not None
    flow_name = (inp.flow_config.flow_name or "").strip() if inp.flow_config is not None else ""
    flow_name = flow_name or name
    schedule = normalize_schedule(inp.flow_config.scheduling_config if inp.flow_config is not None else None)

    if inp.validate_only:
        previews = []
        padded: list[dict[str, Any] | None] = list(workflow_steps) or [None] * len(preview_steps)
        for step, w in zip(preview_steps, padded, strict=True):
            row = _preview(step)
            if w is not None:
                row.update(w["preview"])
            previews.append(row)
        flow_preview = {"flow_name": flow_name, "scheduling_config": schedule} if with_flow else None
        return CreatePipelineValidateOut(
            valid=True,
            mode="validate_only",
            would_create=WouldCreateOut(pipeline_name=name, agent_id=agent_id, steps=previews, flow=flow_preview),
        )

    now = utcnow()
    pipeline = Pipeline(
        user_id=user_id, agent_id=agent_id, pipeline_name=name, pipeline_config={}, created_at=now, updated_at=now
    )
    ctx.session.add(pipeline)
    await ctx.session.flush()
    pid = pipeline.pipeline_id
    steps = [build_pipeline_step(pid, seed, i, box=ctx.runtime.box, files_roots=roots) for i, seed in enumerate(seeds)]
    pipeline.pipeline_config = {s["pipeline_step_id"]: s for s in steps}
    step_ids = [s["pipeline_step_id"] for s in steps]

    flow: Flow | None = None
    warnings: list[str] = []
    flow_step_ids: list[str] = []
    if with_flow:
        step_configs = (
            {psid: w["edit"] for psid, w in zip(step_ids, workflow_steps, strict=True) if w["edit"]}
            if mode == "workflow"
            else None
        )
        flow, _, warnings = await create_flow_record(
            ctx,
            pipeline,
            flow_name=flow_name,
            agent_id=agent_id,
            user_id=user_id,
            schedule=schedule,
            step_configs=step_configs,
        )
        flow_step_ids = [make_flow_step_id(psid, flow.flow_id) for psid in step_ids]
    summary = f"pipeline '{name}' ({pid}) created with {len(steps)} step(s)"
    if flow is not None:
        summary += f" and flow '{flow.flow_name}' ({flow.flow_id})"
    await ctx.audit(
        summary,
        target=("pipeline", pid),
        changes=["pipeline", *(["flow"] if flow is not None else [])],
        agent_id=agent_id,
        pipeline_id=pid,
        flow_id=flow.flow_id if flow is not None else None,
    )
    notify_pipeline(ctx, pid, list_changed=True)
    if flow is not None:
        notify_flow(ctx, flow)
    return CreatePipelineOut(
        pipeline_id=pid,
        pipeline_name=name,
        agent_id=agent_id,
        flow_id=flow.flow_id if flow is not None else None,
        flow_name=flow.flow_name if flow is not None else None,
        steps_created=len(steps),
        pipeline_step_ids=step_ids,
        flow_step_ids=flow_step_ids,
        creation_mode=mode,
        warnings=warnings,
    )


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
