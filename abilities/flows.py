"""Flows toolset, part 1: flows and their schedules (abilities.md §6).

get-flows, create-flow, update-flow, delete-flow, duplicate-flow, pause-flow, resume-flow,
schedule-flow and get-scheduling-intervals. Flow steps are in ``abilities.flow_steps``, prompt
queues in ``abilities.queues`` and webhook triggers in ``abilities.webhook_triggers``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import delete, func, or_, select

from abilities.access import Owner
from abilities.agent_common import agent_owner
from abilities.context import AbilityContext
from abilities.errors import AbilityError, AccessDenied
from abilities.flow_ops import (
    StepConfigInput,
    StepEdit,
    apply_step_edit,
    create_flow_record,
    normalize_schedule,
    set_schedule,
)
from abilities.pipeline_common import (
    FlowOut,
    flow_step_dict,
    flows_of,
    flows_out,
    load_flow,
    load_pipeline,
    mask_schedule,
    notify_flow,
    ordered_steps,
    owner_of,
)
from abilities.registry import ability
from abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Input, Opt, Output
from engine import schedule as sched
from storage.models import Agent, Flow, Job, ProcessedItem
from storage.timeutil import iso, utcnow

DEFAULT_FLOW_NAME = "Flow"
SCHEDULE_DESC = (
    "Schedule: {interval (manual, one_time, cron, an interval key such as hourly or daily), timestamp (one_time), "
    "cron_expression, timezone (IANA, cron), enabled (false = paused), allow_overlap}"
)


# --- shared input / output pieces ----------------------------------------------------------------


class ScheduleIn(Input):
    """The client keys of a scheduling_config (abilities.md §2.10); derived keys are accepted and ignored."""

    interval: str = Field(
        max_length=200,
        description="manual, one_time, cron, one of the interval keys (get-scheduling-intervals) or an alias; "
        "a cron expression given here is read as cron",
    )
    timestamp: int | str | None = Field(None, description="one_time: Unix seconds or ISO 8601 date-time")
    cron_expression: str | None = Field(
        None, max_length=200, description="cron: 5 fields (minute hour day month weekday) or a macro such as @daily"
    )
    timezone: str | None = Field(None, max_length=100, description="cron: IANA zone name (default UTC)")
    enabled: bool | None = Field(None, description="false pauses the schedule without losing it")
    allow_overlap: bool | None = Field(None, description="true lets a scheduled run start while another is active")
    interval_seconds: Any = Field(None, description="Derived by the server; ignored on input")
    first_run: Any = Field(None, description="Derived by the server; ignored on input")
    next_run: Any = Field(None, description="Derived by the server; ignored on input")
    last_skip: Any = Field(None, description="Derived by the server; ignored on input")
    webhook: Any = Field(None, description="Managed by the webhook-trigger tools; ignored on input")

    def client(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k in sched.CLIENT_KEYS and v is not None}


def schedule_from(value: ScheduleIn | None) -> dict[str, Any]:
    """Validated client keys (the §2.10 codes); no input means manual."""
    return normalize_schedule(value.client() if value is not None else {"interval": "manual"})


def clean_name(raw: str | None, default: str) -> str:
    name = (raw or "").strip()
    return name[:255] if name else default


async def flow_data(ctx: AbilityContext, flow: Flow) -> dict[str, Any]:
    await ctx.session.flush()
    return (await flows_out(ctx, [flow]))[0]


def _flow_target(flow_id: int | None) -> dict[str, Any]:
    return {"type": "flow", "id": flow_id}


async def _new_owner(ctx: AbilityContext, agent_id: int | None, fallback_agent: int | None) -> tuple[int | None, Owner]:
    """Owner of a new flow (access.md §3.5): the agent_id input, else the pipeline's agent, else the caller's."""
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


# --- get-flows --------------------------------------------------------------------------------


class GetFlowsIn(Input):
    flow_id: int | None = Field(None, ge=1, description="Single flow; filters and paging ignored")
    pipeline_id: int | None = Field(None, ge=1, description="Only this pipeline's flows")
    agent_id: int | None = Field(None, ge=1, description="Only this agent's flows (priority over user_id)")
    user_id: int | None = Field(None, ge=0, description="Only flows of this user (0 = shared)")
    handler_slug: str | None = Field(None, max_length=100, description="Only flows where any step uses this handler")
    output_mode: Literal["full", "list", "summary", "ids"] = Field(
        "full",
        description="Row shape: full = Flow, list = Flow without flow_config, summary = "
        "{flow_id, flow_name, pipeline_id, last_run_status}, ids = flow ids",
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


@ability(
    "get-flows",
    toolset="flows",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=(
        "Get one flow by flow_id or list flows (filters: pipeline, agent, user, handler) with step configs, "
        "schedule, last and next run. Paged."
    ),
)
async def get_flows(ctx: AbilityContext, inp: GetFlowsIn) -> GetFlowsOut:
    common = {"per_page": inp.per_page, "offset": inp.offset, "output_mode": inp.output_mode}
    if inp.flow_id is not None:
        flow = await ctx.session.get(Flow, inp.flow_id)
        rows: list[Any] = []
        if flow is not None:
            await ctx.access.authorize(
                await owner_of(ctx, flow.agent_id, flow.user_id),
                "viewer",
                mutating=False,
                target=_flow_target(flow.flow_id),
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


# --- create-flow ------------------------------------------------------------------------------


class CreateFlowIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline to instantiate")
    flow_name: str | None = Field(None, max_length=255, description='Flow name (empty → "Flow")')
    agent_id: int | None = Field(None, ge=1, description="Owning agent (default: the pipeline's agent)")
    scheduling_config: ScheduleIn | None = Field(None, description=SCHEDULE_DESC + '; default {interval: "manual"}')
    step_configs: dict[str, StepConfigInput] | None = Field(
        None,
        description="Per-step configuration keyed by pipeline_step_id or step_type (a pipeline_step_id key wins): "
        "handler_slugs, handler_configs, handler_slug, handler_config, flow_step_settings, user_message, queue_mode",
    )
    validate_only: bool = Field(False, description="Validate and describe the flow without creating it")


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
    toolset="flows",
    level="admin",
    description=(
        "Create a flow (a configured, schedulable instance of a pipeline) with optional schedule and per-step "
        "handler configuration."
    ),
)
async def create_flow(ctx: AbilityContext, inp: CreateFlowIn) -> CreateFlowOut | CreateFlowPreview:
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "viewer", mutating=False)
    agent_id, _ = await _new_owner(ctx, inp.agent_id, pipeline.agent_id)
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
    flow_id: int = Field(ge=1, description="Flow to update")
    flow_name: str | None = Field(None, max_length=255, description="New name")
    scheduling_config: ScheduleIn | None = Field(
        None, description=SCHEDULE_DESC + " (replaces the client keys; derived keys and the webhook trigger are kept)"
    )
    agent_id: int | None = Field(None, ge=1, description="New owning agent (admin on both agents required)")


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
    description="Rename a flow, change its schedule (interval, cron, one-time, pause) or move it to another agent.",
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
    toolset="flows",
    level="admin",
    destructive=True,
    idempotent=True,
    description="Delete a flow with its schedule, webhook trigger, jobs and processed-item history.",
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
    # The database cascade removes the jobs (and their children) and processed items (storage.md §5).
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


# --- duplicate-flow ---------------------------------------------------------------------------

COPIED_KEYS = (
    "handler_slugs",
    "handler_configs",
    "flow_step_settings",
    "queue_mode",
    "prompt_queue",
    "config_patch_queue",
)


class DuplicateFlowIn(Input):
    source_flow_id: int = Field(ge=1, description="Flow to copy")
    target_pipeline_id: int | None = Field(
        None, ge=1, description="Pipeline of the copy (default: the source's); its step types must match by order"
    )
    flow_name: str | None = Field(None, max_length=255, description='Name of the copy (default "Copy of {name}")')
    scheduling_config: ScheduleIn | None = Field(
        None, description=SCHEDULE_DESC + " (default: the source's, with one_time becoming manual)"
    )
    step_config_overrides: dict[str, StepConfigInput] | None = Field(
        None,
        description="Overrides applied after copying, keyed by step_type or execution_order (as a string; wins over "
        "step_type)",
    )


class DuplicateFlowOut(Output):
    flow_id: int = Field(description="The copy's flow id")
    flow_name: str = Field(description="The copy's name")
    source_flow_id: int = Field(description="Flow copied")
    source_pipeline_id: int = Field(description="The source's pipeline")
    target_pipeline_id: int = Field(description="The copy's pipeline")
    flow_step_ids: list[str] = Field(description="The copy's flow_step_ids in execution order")
    scheduling: dict[str, Any] = Field(description="The copy's scheduling_config")


def _copy_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_value(v) for v in value]
    return value


@ability(
    "duplicate-flow",
    toolset="flows",
    level="admin",
    description="Copy a flow (step configs and prompt queues) into the same or a compatible pipeline.",
)
async def duplicate_flow(ctx: AbilityContext, inp: DuplicateFlowIn) -> DuplicateFlowOut:
    source = await load_flow(ctx, inp.source_flow_id, "viewer", mutating=False)
    target_id = inp.target_pipeline_id or source.pipeline_id
    target = await load_pipeline(ctx, target_id, "viewer", mutating=False)
    agent_id, _ = await _new_owner(ctx, None, target.agent_id)
    source_steps = ordered_steps(source.flow_config)
    target_steps = ordered_steps(target.pipeline_config)
    source_types = [s.get("step_type") for s in source_steps]
    target_types = [s.get("step_type") for s in target_steps]
    if source_types != target_types:
        raise AbilityError(
            "incompatible_pipelines",
            f"Pipeline {target_id} has steps {target_types or '[]'} but flow {source.flow_id} has {source_types or '[]'}; "
            "the step types must match in execution order.",
            source_step_types=source_types,
            target_step_types=target_types,
        )
    if inp.scheduling_config is not None:
        schedule = schedule_from(inp.scheduling_config)
    else:
        keys = sched.client_keys(source.scheduling_config)
        if keys.get("interval") == "one_time":
            keys = {"interval": "manual", **({"enabled": False} if keys.get("enabled") is False else {})}
        schedule = normalize_schedule(keys or {"interval": "manual"})
    name = clean_name(inp.flow_name, f"Copy of {source.flow_name}"[:255])
    flow, _, _ = await create_flow_record(
        ctx, target, flow_name=name, agent_id=agent_id, user_id=ctx.principal.user_id, schedule=schedule
    )
    config = dict(flow.flow_config)
    copy_steps = ordered_steps(config)
    for new, old in zip(copy_steps, source_steps, strict=True):
        entry = dict(new)
        for key in COPIED_KEYS:
            if key in old:
                entry[key] = _copy_value(old[key])
        config[entry["flow_step_id"]] = entry
    if inp.step_config_overrides:
        snap = await ctx.settings()
        plan: dict[str, tuple[int, str, StepConfigInput]] = {}
        for key, value in inp.step_config_overrides.items():
            if key.isdigit():
                targets = [s for s in copy_steps if s.get("execution_order") == int(key)]
                rank = 0
            else:
                targets = [s for s in copy_steps if s.get("step_type") == key]
                rank = 1
            if not targets:
                raise AbilityError(
                    "invalid_step_configs",
                    f"step_config_overrides key '{key}' matches no step of pipeline {target_id} "
                    '(use a step_type the pipeline has or an execution_order such as "0").',
                    key=key,
                )
            for step in targets:
                fsid = step["flow_step_id"]
                if fsid not in plan or rank < plan[fsid][0]:
                    plan[fsid] = (rank, key, value)
        now = utcnow()
        for fsid, (_, key, value) in plan.items():
            try:
                result = apply_step_edit(
                    config[fsid],
                    StepEdit.from_input(value),
                    box=ctx.runtime.box,
                    files_roots=snap.files_roots(),
                    now=now,
                )
            except AbilityError as err:
                if err.code in ("invalid_flow_step_update", "invalid_queue_step"):
                    raise AbilityError("invalid_step_configs", err.message, key=key) from None
                raise
            config[fsid] = result.entry
    flow.flow_config = config
    await ctx.session.flush()
    await ctx.audit(
        f"flow {source.flow_id} duplicated as flow {flow.flow_id} '{flow.flow_name}' (pipeline {target_id})",
        target=("flow", flow.flow_id),
        agent_id=flow.agent_id,
        flow_id=flow.flow_id,
        pipeline_id=flow.pipeline_id,
        source_flow_id=source.flow_id,
    )
    notify_flow(ctx, flow)
    ctx.notify_list_changed()
    return DuplicateFlowOut(
        flow_id=flow.flow_id,
        flow_name=flow.flow_name,
        source_flow_id=source.flow_id,
        source_pipeline_id=source.pipeline_id,
        target_pipeline_id=target_id,
        flow_step_ids=[s["flow_step_id"] for s in ordered_steps(config)],
        scheduling=mask_schedule(flow.scheduling_config),
    )


# --- pause-flow / resume-flow -----------------------------------------------------------------


class FlowScopeIn(Input):
    flow_id: int | None = Field(None, ge=1, description="This flow")
    pipeline_id: int | None = Field(None, ge=1, description="Every flow of this pipeline")
    agent_id: int | None = Field(None, ge=1, description="Every flow of this agent")


class PausedFlow(Output):
    flow_id: int = Field(description="Flow id")
    status: Literal["paused", "already_paused", "agent_access_denied", "agent_inactive", "pause_error"] = Field(
        description="What happened to this flow"
    )
    message: str | None = Opt("Why the flow was not paused")


class PauseFlowOut(Output):
    paused: int = Field(description="Flows paused by this call")
    skipped: int = Field(description="Flows that were already paused")
    errors: int = Field(description="Flows that could not be paused")
    partial: bool = Field(description="Some but not all targeted flows failed")
    flows: list[PausedFlow] = Field(description="Result per flow, by flow_id")


class ResumedFlow(Output):
    flow_id: int = Field(description="Flow id")
    status: Literal["resumed", "not_paused", "agent_access_denied", "agent_inactive", "resume_error"] = Field(
        description="What happened to this flow"
    )
    next_run: str | None = Opt("Next scheduled run after resuming (ISO 8601 UTC)")


class ResumeFlowOut(Output):
    resumed: int = Field(description="Flows resumed by this call")
    skipped: int = Field(description="Flows that were not paused")
    errors: int = Field(description="Flows that could not be resumed")
    partial: bool = Field(description="Some but not all targeted flows failed")
    flows: list[ResumedFlow] = Field(description="Result per flow, by flow_id")


async def _scope_flows(ctx: AbilityContext, inp: FlowScopeIn) -> tuple[list[Flow], bool, tuple[str, int], int | None]:
    """The targeted flows (locked), whether it is the single form, the audit target and its agent."""
    given = [n for n in ("flow_id", "pipeline_id", "agent_id") if getattr(inp, n) is not None]
    if len(given) != 1:
        raise AbilityError(
            "invalid_flow_scope",
            "Give exactly one of flow_id, pipeline_id or agent_id" + (f" (got {', '.join(given)})." if given else "."),
            given=given,
        )
    if inp.flow_id is not None:
        flow = await load_flow(ctx, inp.flow_id, "operator", mutating=True, lock=True)
        return [flow], True, ("flow", flow.flow_id), flow.agent_id
    if inp.pipeline_id is not None:
        pipeline = await load_pipeline(ctx, inp.pipeline_id, "viewer", mutating=False)
        return (
            await flows_of(ctx, pipeline.pipeline_id, lock=True),
            False,
            ("pipeline", inp.pipeline_id),
            pipeline.agent_id,
        )
    assert inp.agent_id is not None
    agent = await ctx.session.get(Agent, inp.agent_id)
    if agent is None:
        raise AbilityError("agent_not_found", f"Agent {inp.agent_id} not found.", agent_id=inp.agent_id)
    await ctx.access.authorize(
        agent_owner(agent), "viewer", mutating=False, target={"type": "agent", "id": agent.agent_id}
    )
    stmt = ctx.db.for_update(select(Flow).where(Flow.agent_id == agent.agent_id).order_by(Flow.flow_id))
    return list((await ctx.session.execute(stmt)).scalars()), False, ("agent", agent.agent_id), agent.agent_id


async def _operable(ctx: AbilityContext, flow: Flow, cache: dict[Any, Owner]) -> tuple[str, str] | None:
    """None when the caller may operate the flow, else (status, message)."""
    key = (flow.agent_id, flow.user_id)
    if key not in cache:
        cache[key] = await owner_of(ctx, flow.agent_id, flow.user_id)
    try:
        await ctx.access.authorize(cache[key], "operator", mutating=True, target=_flow_target(flow.flow_id))
    except AccessDenied as err:
        return "agent_access_denied", err.message
    except AbilityError as err:
        return err.code, err.message
    return None


@ability(
    "pause-flow",
    toolset="flows",
    level="operator",
    idempotent=True,
    description=(
        "Pause scheduled runs of one flow, all flows of a pipeline, or all flows of an agent. The schedule is kept "
        "for resume-flow."
    ),
)
async def pause_flow(ctx: AbilityContext, inp: FlowScopeIn) -> PauseFlowOut:
    flows, single, target, agent_id = await _scope_flows(ctx, inp)
    now = utcnow()
    results: list[dict[str, Any]] = []
    changed: list[Flow] = []
    owners: dict[Any, Owner] = {}
    for flow in flows:
        if not single:
            refusal = await _operable(ctx, flow, owners)
            if refusal is not None:
                results.append({"flow_id": flow.flow_id, "status": refusal[0], "message": refusal[1]})
                continue
        config = flow.scheduling_config or {"interval": "manual"}
        if config.get("enabled") is False:
            results.append({"flow_id": flow.flow_id, "status": "already_paused"})
            continue
        flow.scheduling_config = sched.pause(config)
        flow.next_run_at = None
        flow.updated_at = now
        changed.append(flow)
        results.append({"flow_id": flow.flow_id, "status": "paused"})
    counts = {
        "paused": sum(r["status"] == "paused" for r in results),
        "skipped": sum(r["status"] == "already_paused" for r in results),
    }
    counts["errors"] = len(results) - counts["paused"] - counts["skipped"]
    out = {**counts, "partial": 0 < counts["errors"] < len(results), "flows": results}
    if results and counts["errors"] == len(results):
        raise AbilityError("flow_pause_failed", f"None of the {len(results)} targeted flow(s) could be paused.", **out)
    if changed:
        await ctx.audit(
            f"{len(changed)} flow(s) paused",
            target=target,
            changes=["scheduling_config.enabled"],
            agent_id=agent_id,
            flow_id=changed[0].flow_id if single else None,
            flow_ids=[f.flow_id for f in changed],
        )
        for flow in changed:
            notify_flow(ctx, flow)
    return PauseFlowOut.model_validate(out)


@ability(
    "resume-flow",
    toolset="flows",
    level="operator",
    idempotent=True,
    description="Resume paused flows (one flow, a pipeline's flows or an agent's flows) and recompute their next run.",
)
async def resume_flow(ctx: AbilityContext, inp: FlowScopeIn) -> ResumeFlowOut:
    flows, single, target, agent_id = await _scope_flows(ctx, inp)
    now = utcnow()
    results: list[dict[str, Any]] = []
    changed: list[Flow] = []
    owners: dict[Any, Owner] = {}
    for flow in flows:
        if not single:
            refusal = await _operable(ctx, flow, owners)
            if refusal is not None:
                results.append({"flow_id": flow.flow_id, "status": refusal[0]})
                continue
        config = flow.scheduling_config or {"interval": "manual"}
        if config.get("enabled") is not False:
            results.append({"flow_id": flow.flow_id, "status": "not_paused"})
            continue
        try:
            new_config, next_run = sched.resume(config, flow_id=flow.flow_id, now=now)
        except (sched.ScheduleError, KeyError, ValueError, TypeError):
            results.append({"flow_id": flow.flow_id, "status": "resume_error"})
            continue
        flow.scheduling_config = new_config
        flow.next_run_at = next_run
        flow.updated_at = now
        changed.append(flow)
        entry: dict[str, Any] = {"flow_id": flow.flow_id, "status": "resumed"}
        if next_run is not None:
            entry["next_run"] = iso(next_run)
        results.append(entry)
    resumed = sum(r["status"] == "resumed" for r in results)
    skipped = sum(r["status"] == "not_paused" for r in results)
    errors = len(results) - resumed - skipped
    out = {
        "resumed": resumed,
        "skipped": skipped,
        "errors": errors,
        "partial": 0 < errors < len(results),
        "flows": results,
    }
    if results and errors == len(results):
        raise AbilityError(
            "flow_resume_failed", f"None of the {len(results)} targeted flow(s) could be resumed.", **out
        )
    if changed:
        await ctx.audit(
            f"{len(changed)} flow(s) resumed",
            target=target,
            changes=["scheduling_config.enabled"],
            agent_id=agent_id,
            flow_id=changed[0].flow_id if single else None,
            flow_ids=[f.flow_id for f in changed],
        )
        for flow in changed:
            notify_flow(ctx, flow)
    return ResumeFlowOut.model_validate(out)


# --- schedule-flow ----------------------------------------------------------------------------


class ScheduleFlowIn(Input):
    flow_id: int = Field(ge=1, description="Flow to schedule")
    interval_or_timestamp: str | int = Field(
        description='"manual", an interval key or alias (e.g. hourly), a cron expression ("0 9 * * 1-5", "@daily"), '
        "or Unix seconds for one run"
    )


class ScheduleFlowOut(Output):
    flow_id: int = Field(description="Flow id")
    schedule_type: Literal["manual", "one_time", "cron", "recurring"] = Field(description="Kind of schedule")
    scheduled_time: str | None = Field(description="Next run (ISO 8601 UTC); null when manual or paused")
    scheduling_config: dict[str, Any] = Field(description="The stored schedule")
    scheduling_unchanged: bool = Field(description="True when the schedule already was this one")


def interpret_schedule_value(value: str | int, previous: dict[str, Any]) -> dict[str, Any]:
    """schedule-flow's single value as client keys; enabled, a cron's timezone and allow_overlap are kept."""
    if isinstance(value, int):
        raw: dict[str, Any] = {"interval": "one_time", "timestamp": value}
    else:
        text = value.strip()
        if text == "manual":
            raw = {"interval": "manual"}
        elif text.isdigit():
            raw = {"interval": "one_time", "timestamp": int(text)}
        elif sched.looks_like_cron(text):
            raw = {"interval": "cron", "cron_expression": text}
            if isinstance(previous.get("timezone"), str):
                raw["timezone"] = previous["timezone"]
        else:
            raw = {"interval": text}
    if isinstance(raw.get("timestamp"), int) and raw["timestamp"] <= 0:
        raise AbilityError("missing_timestamp", "A one-time run needs a positive Unix timestamp.")
    if previous.get("enabled") is False:
        raw["enabled"] = False
    if isinstance(previous.get("allow_overlap"), bool):
        raw["allow_overlap"] = previous["allow_overlap"]  # a flag of the flow, not part of the value
    return raw


@ability(
    "schedule-flow",
    toolset="flows",
    level="admin",
    idempotent=True,
    description=(
        "Set a flow's schedule in one value: 'manual', an interval key (e.g. hourly), a cron expression, or a Unix "
        "timestamp for one run."
    ),
)
async def schedule_flow(ctx: AbilityContext, inp: ScheduleFlowIn) -> ScheduleFlowOut:
    flow = await load_flow(ctx, inp.flow_id, "admin", mutating=True, lock=True)
    previous = sched.client_keys(flow.scheduling_config)
    client = normalize_schedule(interpret_schedule_value(inp.interval_or_timestamp, previous))
    now = utcnow()
    changed = set_schedule(flow, client, now=now)
    if changed:
        flow.updated_at = now
        await ctx.audit(
            f"flow {flow.flow_id} scheduled ({client['interval']})",
            target=("flow", flow.flow_id),
            changes=["scheduling_config"],
            agent_id=flow.agent_id,
            flow_id=flow.flow_id,
            pipeline_id=flow.pipeline_id,
        )
        notify_flow(ctx, flow)
    interval = client["interval"]
    kind = interval if interval in ("manual", "one_time", "cron") else "recurring"
    return ScheduleFlowOut(
        flow_id=flow.flow_id,
        schedule_type=kind,
        scheduled_time=iso(flow.next_run_at),
        scheduling_config=mask_schedule(flow.scheduling_config),
        scheduling_unchanged=not changed,
    )


# --- get-scheduling-intervals -----------------------------------------------------------------


class NoInput(Input):
    pass


class IntervalOut(Output):
    value: str = Field(description="Value for scheduling_config.interval")
    label: str = Field(description="Display label")
    seconds: int | None = Field(description="Period in seconds (null for manual, one_time and cron)")


class IntervalsOut(Output):
    intervals: list[IntervalOut] = Field(description="manual, one_time, cron, then the interval keys by period")
    aliases: dict[str, str] = Field(description="Accepted aliases and the key each is stored as")


@ability(
    "get-scheduling-intervals",
    toolset="flows",
    level="any",
    read_only=True,
    idempotent=True,
    description=(
        "List the valid schedule interval values (manual, one_time, cron and named intervals such as hourly, daily)."
    ),
)
async def get_scheduling_intervals(ctx: AbilityContext, inp: NoInput) -> IntervalsOut:
    return IntervalsOut.model_validate({"intervals": sched.describe_intervals(), "aliases": dict(sched.ALIASES)})
