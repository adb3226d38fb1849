"""duplicate-flow: copy a flow's step configs and prompt queues into the same or a compatible pipeline."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_common import SCHEDULE_DESC, ScheduleIn, clean_name, new_flow_owner, schedule_from
from datamachine_mcp.abilities.flow_ops import (
    StepConfigInput,
    StepEdit,
    apply_step_edit,
    create_flow_record,
    normalize_schedule,
)
from datamachine_mcp.abilities.pipeline_common import load_flow, load_pipeline, ordered_steps
from datamachine_mcp.abilities.pipeline_views import mask_schedule, notify_flow
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.storage.timeutil import utcnow

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
    source_flow_id: int = Field(ge=1, description="Flow")
    target_pipeline_id: int | None = Field(None, ge=1, description="Target pipeline (same step types)")
    flow_name: str | None = Field(None, max_length=255, description='Default "Copy of {name}"')
    scheduling_config: ScheduleIn | None = Field(None, description=SCHEDULE_DESC + " (default: the source's)")
    step_config_overrides: dict[str, StepConfigInput] | None = Field(
        None,
        description="Keyed by step_type or execution_order",
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
    description="Copy a flow into the same or a compatible pipeline.",
)
async def duplicate_flow(ctx: AbilityContext, inp: DuplicateFlowIn) -> DuplicateFlowOut:
    source = await load_flow(ctx, inp.source_flow_id, "viewer", mutating=False)
    target_id = inp.target_pipeline_id or source.pipeline_id
    target = await load_pipeline(ctx, target_id, "viewer", mutating=False)
    agent_id, _ = await new_flow_owner(ctx, None, target.agent_id)
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
