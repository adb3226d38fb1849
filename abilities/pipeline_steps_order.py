"""Pipelines toolset: removing and reordering a pipeline's steps (delete-pipeline-step,
reorder-pipeline-steps).

Both keep ``execution_order`` contiguous (0..n-1) and resync every flow of the pipeline (one
``flow_config`` entry per pipeline step) in the same transaction.
"""

from __future__ import annotations

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.pipeline_common import load_pipeline, ordered_steps
from datamachine_mcp.abilities.pipeline_shapes import renumber
from datamachine_mcp.abilities.pipeline_steps import notify_pipeline_and_flows, step_not_found, sync_flows
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.engine import dedup
from datamachine_mcp.storage.timeutil import utcnow

# --- delete-pipeline-step ---------------------------------------------------------------------


class DeletePipelineStepIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline")
    pipeline_step_id: str = Field(max_length=255, description="Step")


class DeletePipelineStepOut(Output):
    pipeline_id: int = Field(description="Pipeline")
    pipeline_step_id: str = Field(description="Deleted step")
    affected_flows: int = Field(description="Flows the step was removed from")
    processed_items_deleted: int = Field(description="Processed-item rows of the step deleted")
    message: str = Field(description="Human-readable result")


@ability(
    "delete-pipeline-step",
    toolset="pipelines",
    level="admin",
    destructive=True,
    idempotent=True,
    description=("Remove a step from a pipeline and its flows."),
)
async def delete_pipeline_step(ctx: AbilityContext, inp: DeletePipelineStepIn) -> DeletePipelineStepOut:
    psid = inp.pipeline_step_id.strip()
    if not psid:
        raise AbilityError("invalid_pipeline_step_id", "pipeline_step_id must be a non-empty string")
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "admin", mutating=True, lock=True)
    config = dict(pipeline.pipeline_config or {})
    if psid not in config:
        raise step_not_found(psid, pipeline.pipeline_id)
    removed = config.pop(psid)
    now = utcnow()
    pipeline.pipeline_config = renumber(config)
    pipeline.updated_at = now
    flows = await sync_flows(ctx, pipeline, now)
    deleted = 0
    if flows:
        # Active claims stay so a running job's settlement is not lost.
        deleted, _ = await dedup.clear_pipeline_step(ctx.session, psid, now)
    await ctx.audit(
        f"step {psid} ({removed.get('step_type')}) deleted from pipeline {pipeline.pipeline_id}, "
        f"{len(flows)} flow(s), {deleted} processed item(s)",
        target=("pipeline_step", psid),
        changes=["pipeline_config", *(["flow_config"] if flows else []), *(["processed_items"] if deleted else [])],
        agent_id=pipeline.agent_id,
        pipeline_id=pipeline.pipeline_id,
    )
    notify_pipeline_and_flows(ctx, pipeline, flows)
    return DeletePipelineStepOut(
        pipeline_id=pipeline.pipeline_id,
        pipeline_step_id=psid,
        affected_flows=len(flows),
        processed_items_deleted=deleted,
        message=(
            f"Step '{removed.get('label') or removed.get('step_type')}' deleted from the pipeline and "
            f"{len(flows)} flow(s); {deleted} processed item(s) removed."
        ),
    )


# --- reorder-pipeline-steps -------------------------------------------------------------------


class StepOrderItem(Input):
    pipeline_step_id: str = Field(max_length=255, description="Step")
    execution_order: int | None = Field(None, description="Ignored")


class ReorderPipelineStepsIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline")
    step_order: list[StepOrderItem] = Field(min_length=1, max_length=50, description="Every step, in the new order")


class StepPosition(Output):
    pipeline_step_id: str = Field(description="Step")
    execution_order: int = Field(description="Its new position")


class ReorderPipelineStepsOut(Output):
    pipeline_id: int = Field(description="Pipeline")
    step_count: int = Field(description="Number of steps")
    steps: list[StepPosition] = Field(description="Steps in their new order")
    message: str = Field(description="Human-readable result")


@ability(
    "reorder-pipeline-steps",
    toolset="pipelines",
    level="admin",
    idempotent=True,
    description=("Set the order of a pipeline's steps."),
    error_fields={"step_order": "invalid_step_order"},
)
async def reorder_pipeline_steps(ctx: AbilityContext, inp: ReorderPipelineStepsIn) -> ReorderPipelineStepsOut:
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "admin", mutating=True, lock=True)
    config = pipeline.pipeline_config or {}
    order = [item.pipeline_step_id.strip() for item in inp.step_order]
    seen: set[str] = set()
    for psid in order:
        if psid in seen:
            raise AbilityError(
                "duplicate_step_order", f"Step '{psid}' appears more than once in step_order", pipeline_step_id=psid
            )
        seen.add(psid)
    for psid in order:
        if psid not in config:
            raise step_not_found(psid, pipeline.pipeline_id)
    missing = [s["pipeline_step_id"] for s in ordered_steps(config) if s["pipeline_step_id"] not in seen]
    if missing:
        raise AbilityError(
            "step_order_mismatch",
            f"step_order must list every step of pipeline {pipeline.pipeline_id}; missing: {', '.join(missing)}.",
            missing=missing,
        )
    new_config = {psid: {**config[psid], "execution_order": i} for i, psid in enumerate(order)}
    positions = [{"pipeline_step_id": psid, "execution_order": i} for i, psid in enumerate(order)]
    if new_config == config:
        return ReorderPipelineStepsOut.model_validate(
            {
                "pipeline_id": pipeline.pipeline_id,
                "step_count": len(order),
                "steps": positions,
                "message": "The steps already run in this order.",
            }
        )
    now = utcnow()
    pipeline.pipeline_config = new_config
    pipeline.updated_at = now
    flows = await sync_flows(ctx, pipeline, now)
    await ctx.audit(
        f"steps of pipeline {pipeline.pipeline_id} reordered ({len(flows)} flow(s) synced)",
        target=("pipeline", pipeline.pipeline_id),
        changes=["pipeline_config", *(["flow_config"] if flows else [])],
        agent_id=pipeline.agent_id,
        pipeline_id=pipeline.pipeline_id,
    )
    notify_pipeline_and_flows(ctx, pipeline, flows)
    return ReorderPipelineStepsOut.model_validate(
        {
            "pipeline_id": pipeline.pipeline_id,
            "step_count": len(order),
            "steps": positions,
            "message": f"Steps reordered; {len(flows)} flow(s) synced.",
        }
    )
