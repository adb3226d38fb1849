"""create-pipeline: its input and output shapes, and the call itself (simple, batch or workflow mode;
everything that can fail on the input is checked before anything is written)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import create_flow_record, normalize_schedule
from datamachine_mcp.abilities.pipeline_common import build_pipeline_step, make_flow_step_id
from datamachine_mcp.abilities.pipeline_shapes import StepSeedIn, new_resource_owner, seed_of
from datamachine_mcp.abilities.pipeline_views import notify_flow, notify_pipeline, pipeline_step_dict
from datamachine_mcp.abilities.pipeline_workflow import WorkflowIn, validate_workflow
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.storage.models import Flow, Pipeline
from datamachine_mcp.storage.timeutil import utcnow


def pipeline_name_or_error(raw: str) -> str:
    name = raw.strip()
    if not name:
        raise AbilityError("invalid_pipeline_name", "Pipeline name cannot be empty")
    return name


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


async def create(ctx: AbilityContext, inp: CreatePipelineIn) -> CreatePipelineOut | CreatePipelineValidateOut:
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
