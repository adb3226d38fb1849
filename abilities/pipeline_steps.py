"""Pipelines toolset, part 2: a pipeline's steps: get-pipeline-steps, add-pipeline-step and
update-pipeline-step, plus the helpers every step tool uses. delete-pipeline-step and reorder-pipeline-steps
are in ``abilities.pipeline_steps_order``.

Every change keeps ``execution_order`` contiguous (0..n-1) and every flow of the pipeline in sync
(docs/storage.md, flow_config) in the same transaction.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import seeded_warnings
from datamachine_mcp.abilities.json_schema import KEEP_NULL, UNPUBLISHED
from datamachine_mcp.abilities.pipeline_common import (
    build_pipeline_step,
    flows_of,
    load_pipeline,
    make_flow_step_id,
    ordered_steps,
    parse_pipeline_step_id,
    step_label,
    sync_flow_config,
)
from datamachine_mcp.abilities.pipeline_shapes import StepSeedIn, renumber
from datamachine_mcp.abilities.pipeline_views import PipelineStepOut, notify_flow, notify_pipeline, pipeline_step_dict
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.storage.models import Flow, Pipeline
from datamachine_mcp.storage.settings_schema import PROVIDERS
from datamachine_mcp.storage.timeutil import utcnow


def step_id_or_error(raw: str) -> tuple[str, int]:
    """A trimmed pipeline_step_id and its pipeline id (invalid_pipeline_step_id otherwise)."""
    psid = raw.strip()
    if not psid:
        raise AbilityError("invalid_pipeline_step_id", "pipeline_step_id must be a non-empty string")
    pipeline_id = parse_pipeline_step_id(psid)
    if pipeline_id is None:
        raise AbilityError(
            "invalid_pipeline_step_id",
            f"pipeline_step_id '{psid}' is not of the form '{{pipeline_id}}_{{uuid4}}' (see get-pipeline-steps).",
            pipeline_step_id=psid,
        )
    return psid, pipeline_id


def step_not_found(psid: str, pipeline_id: int | None = None) -> AbilityError:
    where = f" in pipeline {pipeline_id}" if pipeline_id is not None else ""
    return AbilityError(
        "pipeline_step_not_found",
        f"Pipeline step '{psid}' not found{where} (see get-pipeline-steps).",
        pipeline_step_id=psid,
    )


async def sync_flows(ctx: AbilityContext, pipeline: Pipeline, now: Any) -> list[Flow]:
    """Rewrite every flow's flow_config to match the pipeline's steps (new dicts; bumps updated_at)."""
    flows = await flows_of(ctx, pipeline.pipeline_id, lock=True)
    for flow in flows:
        flow.flow_config = sync_flow_config(
            flow.flow_config, pipeline.pipeline_config, flow_id=flow.flow_id, pipeline_id=pipeline.pipeline_id
        )
        flow.updated_at = now
    return flows


def notify_pipeline_and_flows(ctx: AbilityContext, pipeline: Pipeline, flows: list[Flow]) -> None:
    """Tell subscribers that the pipeline and each of these flows changed."""
    notify_pipeline(ctx, pipeline.pipeline_id)
    for flow in flows:
        notify_flow(ctx, flow)


# --- get-pipeline-steps -----------------------------------------------------------------------


class GetPipelineStepsIn(Input):
    pipeline_id: int | None = Field(None, ge=1, description="Pipeline (or pipeline_step_id)")
    pipeline_step_id: str | None = Field(None, max_length=255, description="One step")


class GetPipelineStepsOut(Output):
    pipeline_id: int | None = Field(description="The pipeline, or null when the step is unknown")
    steps: list[PipelineStepOut] = Field(description="Steps by execution_order (secrets masked)")
    step_count: int = Field(description="Number of steps returned")


@ability(
    "get-pipeline-steps",
    toolset="pipelines",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="List a pipeline's steps in order, or get one.",
)
async def get_pipeline_steps(ctx: AbilityContext, inp: GetPipelineStepsIn) -> GetPipelineStepsOut:
    if inp.pipeline_step_id is not None:
        psid, pipeline_id = step_id_or_error(inp.pipeline_step_id)
        pipeline = await ctx.session.get(Pipeline, pipeline_id)
        if pipeline is None:
            return GetPipelineStepsOut(pipeline_id=None, steps=[], step_count=0)
        pipeline = await load_pipeline(ctx, pipeline_id, "viewer", mutating=False)
        step = (pipeline.pipeline_config or {}).get(psid)
        if step is None:
            return GetPipelineStepsOut(pipeline_id=None, steps=[], step_count=0)
        return GetPipelineStepsOut.model_validate(
            {"pipeline_id": pipeline_id, "steps": [pipeline_step_dict(step)], "step_count": 1}
        )
    if inp.pipeline_id is None:
        raise AbilityError("invalid_pipeline_id", "Give pipeline_id (or pipeline_step_id for one step).")
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "viewer", mutating=False)
    steps = [pipeline_step_dict(s) for s in ordered_steps(pipeline.pipeline_config)]
    return GetPipelineStepsOut.model_validate(
        {"pipeline_id": pipeline.pipeline_id, "steps": steps, "step_count": len(steps)}
    )


# --- add-pipeline-step ------------------------------------------------------------------------


class AddPipelineStepIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline")
    step_type: str = Field(
        max_length=50,
        description="fetch, ai, publish, update, approval, webhook_gate or system_task",
    )
    step_config: StepSeedIn | None = Field(None, description="label, AI fields, default handler")


class FlowStepRef(Output):
    flow_id: int = Field(description="Flow")
    flow_step_id: str = Field(description="The flow step created for the new step")


class AddPipelineStepOut(Output):
    pipeline_id: int = Field(description="Pipeline")
    pipeline_step_id: str = Field(description="The new step's id")
    step_type: str = Field(description="Its type")
    execution_order: int = Field(description="Its position (the last)")
    flows_updated: int = Field(description="Flows that gained a matching flow step")
    flow_step_ids: list[FlowStepRef] = Field(description="The flow steps created, by flow")
    warnings: list[str] = Field(description="Seeded configs that still miss required fields")
    message: str = Field(description="Human-readable result")


@ability(
    "add-pipeline-step",
    core=True,
    toolset="pipelines",
    level="admin",
    description=("Append a step to a pipeline; each of its flows gets a matching flow step."),
)
async def add_pipeline_step(ctx: AbilityContext, inp: AddPipelineStepIn) -> AddPipelineStepOut:
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "admin", mutating=True, lock=True)
    seed = {}
    if inp.step_config is not None:
        seed = {k: v for k, v in inp.step_config.model_dump(exclude_unset=True).items() if v is not None}
    seed["step_type"] = inp.step_type.strip()
    config = renumber(pipeline.pipeline_config or {})
    snap = await ctx.settings()
    step = build_pipeline_step(
        pipeline.pipeline_id, seed, len(config), box=ctx.runtime.box, files_roots=snap.files_roots()
    )
    psid = step["pipeline_step_id"]
    pipeline.pipeline_config = {**config, psid: step}
    now = utcnow()
    pipeline.updated_at = now
    flows = await sync_flows(ctx, pipeline, now)
    refs = [{"flow_id": f.flow_id, "flow_step_id": make_flow_step_id(psid, f.flow_id)} for f in flows]
    warnings = [w for f in flows for w in seeded_warnings(f.flow_config[make_flow_step_id(psid, f.flow_id)])]
    await ctx.audit(
        f"step {psid} ({step['step_type']}) added to pipeline {pipeline.pipeline_id} and {len(flows)} flow(s)",
        target=("pipeline_step", psid),
        changes=["pipeline_config", *(["flow_config"] if flows else [])],
        agent_id=pipeline.agent_id,
        pipeline_id=pipeline.pipeline_id,
    )
    notify_pipeline_and_flows(ctx, pipeline, flows)
    return AddPipelineStepOut.model_validate(
        {
            "pipeline_id": pipeline.pipeline_id,
            "pipeline_step_id": psid,
            "step_type": step["step_type"],
            "execution_order": step["execution_order"],
            "flows_updated": len(flows),
            "flow_step_ids": refs,
            "warnings": warnings,
            "message": f"Step '{step['label']}' added at position {step['execution_order']}; "
            f"{len(flows)} flow(s) updated.",
        }
    )


# --- update-pipeline-step ---------------------------------------------------------------------

HANDLER_FIELDS = ("handler_slug", "handler_slugs", "handler_config", "handler_configs", "user_message")
_HANDLER_FIELD_DESC = "Flow-scoped: use update-flow-step"


class UpdatePipelineStepIn(Input):
    # null (or "") removes a setting so the default applies; leaving a field out keeps it.
    pipeline_step_id: str = Field(max_length=255, description="Step")
    label: str | None = Field(None, max_length=255, description="Label (null: default)", json_schema_extra=KEEP_NULL)
    system_prompt: str | None = Field(
        None, max_length=50000, description="ai: system prompt", json_schema_extra=KEEP_NULL
    )
    provider: str | None = Field(
        None, max_length=50, description="ai: openai, anthropic or sampling", json_schema_extra=KEEP_NULL
    )
    model: str | None = Field(None, max_length=100, description="ai: model", json_schema_extra=KEEP_NULL)
    temperature: float | None = Field(None, ge=0, le=2, description="ai: temperature", json_schema_extra=KEEP_NULL)
    max_tokens: int | None = Field(None, ge=1, le=32000, description="ai: reply token cap", json_schema_extra=KEEP_NULL)
    skip_marker: str | None = Field(
        None, max_length=50, description="ai: skip-item reply prefix", json_schema_extra=KEEP_NULL
    )
    # Flow-scoped fields, refused with invalid_pipeline_step_fields (use update-flow-step); not published.
    handler_slug: Any = Field(None, description=_HANDLER_FIELD_DESC, json_schema_extra=UNPUBLISHED)
    handler_slugs: Any = Field(None, description=_HANDLER_FIELD_DESC, json_schema_extra=UNPUBLISHED)
    handler_config: Any = Field(None, description=_HANDLER_FIELD_DESC, json_schema_extra=UNPUBLISHED)
    handler_configs: Any = Field(None, description=_HANDLER_FIELD_DESC, json_schema_extra=UNPUBLISHED)
    user_message: Any = Field(None, description=_HANDLER_FIELD_DESC, json_schema_extra=UNPUBLISHED)


class UpdatePipelineStepOut(Output):
    pipeline_step_id: str = Field(description="Step")
    pipeline_id: int = Field(description="Its pipeline")
    updated_fields: list[str] = Field(description="Fields whose value changed")
    message: str = Field(description="Human-readable result")


AI_INPUTS = ("system_prompt", "provider", "model", "temperature", "max_tokens", "skip_marker")


@ability(
    "update-pipeline-step",
    toolset="pipelines",
    level="admin",
    idempotent=True,
    description=("Update a pipeline step's label or AI settings."),
)
async def update_pipeline_step(ctx: AbilityContext, inp: UpdatePipelineStepIn) -> UpdatePipelineStepOut:
    given = inp.model_fields_set - {"pipeline_step_id"}
    handler_fields = [f for f in HANDLER_FIELDS if f in given]
    if handler_fields:
        raise AbilityError(
            "invalid_pipeline_step_fields",
            "Handler fields are flow-scoped. Use update-flow-step.",
            fields=handler_fields,
        )
    psid, pipeline_id = step_id_or_error(inp.pipeline_step_id)
    if not given:
        raise AbilityError(
            "invalid_pipeline_step_update",
            "Give at least one of label, system_prompt, provider, model, temperature, max_tokens, skip_marker.",
        )
    pipeline = await _step_pipeline(ctx, psid, pipeline_id)
    step = dict((pipeline.pipeline_config or {})[psid])
    step_type = step.get("step_type", "")
    ai_given = [f for f in AI_INPUTS if f in given]
    if ai_given and step_type != "ai":
        raise AbilityError(
            "invalid_pipeline_step_update",
            f"{', '.join(ai_given)} apply to ai steps only; step {psid} is a {step_type} step.",
            fields=ai_given,
        )
    if inp.provider and inp.provider not in PROVIDERS:
        raise AbilityError(
            "unknown_provider",
            f"Unknown provider '{inp.provider}'. Use {', '.join(PROVIDERS)} or \"\" for the default.",
            provider=inp.provider,
        )
    updated: list[str] = []
    if "label" in given:
        label = (inp.label or "").strip() or step_label(step_type)
        if step.get("label") != label:
            step["label"] = label
            updated.append("label")
    for name in AI_INPUTS:
        if name not in given:
            continue
        value = getattr(inp, name)
        if value is None or value == "":  # null / "" removes the key: the engine's default applies
            if name in step:
                del step[name]
                updated.append(name)
        elif name not in step or step[name] != value:
            step[name] = value
            updated.append(name)
    if not updated:
        return UpdatePipelineStepOut(
            pipeline_step_id=psid, pipeline_id=pipeline_id, updated_fields=[], message="Nothing to change."
        )
    now = utcnow()
    pipeline.pipeline_config = {**(pipeline.pipeline_config or {}), psid: step}
    pipeline.updated_at = now
    await ctx.audit(
        f"step {psid} of pipeline {pipeline_id} updated ({', '.join(updated)})",
        target=("pipeline_step", psid),
        changes=updated,
        agent_id=pipeline.agent_id,
        pipeline_id=pipeline_id,
    )
    notify_pipeline(ctx, pipeline_id)
    if "label" in updated:  # flow steps show their pipeline step's label
        for flow in await flows_of(ctx, pipeline_id):
            notify_flow(ctx, flow)
    return UpdatePipelineStepOut(
        pipeline_step_id=psid,
        pipeline_id=pipeline_id,
        updated_fields=updated,
        message=f"Step updated ({', '.join(updated)}); flows use it on their next run.",
    )


async def _step_pipeline(ctx: AbilityContext, psid: str, pipeline_id: int) -> Pipeline:
    """The pipeline holding ``psid`` (admin, locked); pipeline_step_not_found when either is missing."""
    if await ctx.session.get(Pipeline, pipeline_id) is None:
        raise step_not_found(psid)
    pipeline = await load_pipeline(ctx, pipeline_id, "admin", mutating=True, lock=True)
    if psid not in (pipeline.pipeline_config or {}):
        raise step_not_found(psid, pipeline_id)
    return pipeline
