"""What clients see of pipelines and flows: the Pipeline / PipelineStep / Flow / FlowStep output shapes, the
dicts behind them (secrets masked), and the resource-change notices of a pipeline or flow."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ConfigDict, Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.pipeline_common import ACTIVE_STATUSES, step_label
from datamachine_mcp.abilities.schema import Opt, Output, ts
from datamachine_mcp.storage.crypto import MASK, mask
from datamachine_mcp.storage.models import Flow, Job, Pipeline

# --- output shapes -------------------------------------------------------------------------------


class OpenOutput(Output):
    """A shape that also carries preserved unknown keys (pipeline steps keep custom seed keys)."""

    model_config = ConfigDict(extra="allow", json_schema_serialization_defaults_required=True)


class PipelineStepOut(OpenOutput):
    pipeline_step_id: str = Field(description="{pipeline_id}_{uuid4}")
    step_type: str = Field(description="fetch, ai, publish, update, approval, webhook_gate or system_task")
    execution_order: int = Field(description="Position, 0..n-1")
    label: str = Field(description="Display label")


class FlowStepOut(OpenOutput):
    flow_step_id: str = Field(description="{pipeline_step_id}_{flow_id}")
    pipeline_step_id: str = Field(description="The pipeline step this configures")
    pipeline_id: int = Field(description="Pipeline id")
    flow_id: int = Field(description="Flow id")
    step_type: str = Field(description="Step type")
    execution_order: int = Field(description="Position, 0..n-1")
    label: str = Field(description="Label of the pipeline step")
    handler_slugs: list[str] | None = Opt("Handlers of a fetch/publish/update step, in run order")
    handler_configs: dict[str, dict[str, Any]] | None = Opt("Config per handler (secrets masked)")
    flow_step_settings: dict[str, Any] | None = Opt("Step settings")
    queue_mode: str | None = Opt("static, drain or loop (ai and fetch steps)")
    prompt_queue: list[dict[str, Any]] | None = Opt("Queued prompts of an ai step, head first")
    config_patch_queue: list[dict[str, Any]] | None = Opt("Queued config patches of a fetch step")


class FlowOut(Output):
    flow_id: int = Field(description="Flow id")
    flow_name: str = Field(description="Name")
    pipeline_id: int = Field(description="Pipeline it instantiates")
    pipeline_name: str = Field(description="Pipeline name")
    user_id: int = Field(description="Creating user (0 = shared)")
    agent_id: int | None = Field(description="Owning agent")
    flow_config: dict[str, FlowStepOut] | None = Opt("Flow steps keyed by flow_step_id (omitted in list mode)")
    scheduling_config: dict[str, Any] = Field(description="Schedule (webhook credentials masked)")
    created_at: str = Field(description="ISO 8601 UTC")
    updated_at: str = Field(description="ISO 8601 UTC")
    step_count: int = Field(description="Number of steps")
    enabled: bool = Field(description="False when the schedule is paused")
    is_running: bool = Field(description="Has a pending, processing or waiting job")
    next_run: str | None = Field(description="Next scheduled run (ISO 8601 UTC)")
    last_run: str | None = Field(description="Creation time of the newest top-level job")
    last_run_status: str | None = Field(description="Display status of the newest finished top-level job")
    consecutive_failures: int = Field(description="Failed runs in a row")
    consecutive_no_items: int = Field(description="Runs in a row that found no new items")
    webhook_enabled: bool = Field(description="An inbound webhook trigger is enabled")


class PipelineOut(Output):
    pipeline_id: int = Field(description="Pipeline id")
    pipeline_name: str = Field(description="Name")
    user_id: int = Field(description="Creating user (0 = shared)")
    agent_id: int | None = Field(description="Owning agent")
    pipeline_config: dict[str, PipelineStepOut] = Field(description="Steps keyed by pipeline_step_id")
    step_count: int = Field(description="Number of steps")
    flow_count: int = Field(description="Number of flows")
    created_at: str = Field(description="ISO 8601 UTC")
    updated_at: str = Field(description="ISO 8601 UTC")
    flows: list[FlowOut] | None = Opt("The pipeline's flows (full mode with include_flows)")


def pipeline_step_dict(step: dict[str, Any]) -> dict[str, Any]:
    out = dict(step)
    out.setdefault("label", step_label(step.get("step_type", "")))
    if "handler_config" in out:
        out["handler_config"] = mask(out["handler_config"])
    return out


def pipeline_dict(pipeline: Pipeline, *, flow_count: int, flows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    config = pipeline.pipeline_config or {}
    out: dict[str, Any] = {
        "pipeline_id": pipeline.pipeline_id,
        "pipeline_name": pipeline.pipeline_name,
        "user_id": pipeline.user_id,
        "agent_id": pipeline.agent_id,
        "pipeline_config": {k: pipeline_step_dict(v) for k, v in config.items()},
        "step_count": len(config),
        "flow_count": flow_count,
        "created_at": ts(pipeline.created_at),
        "updated_at": ts(pipeline.updated_at),
    }
    if flows is not None:
        out["flows"] = flows
    return out


def flow_step_dict(entry: dict[str, Any], pipeline_config: dict[str, Any] | None) -> dict[str, Any]:
    out = mask(dict(entry))
    pstep = (pipeline_config or {}).get(entry.get("pipeline_step_id", ""), {})
    out["label"] = pstep.get("label") or step_label(entry.get("step_type", ""))
    return out


def mask_schedule(config: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(config or {"interval": "manual"})
    webhook = out.get("webhook")
    if isinstance(webhook, dict):
        hook = mask(dict(webhook))
        if hook.get("token_hash"):
            hook["token_hash"] = MASK
        out["webhook"] = hook
    return out


def flow_dict(
    flow: Flow, pipeline_name: str, pipeline_config: dict[str, Any] | None, *, is_running: bool, full: bool = True
) -> dict[str, Any]:
    config = flow.flow_config or {}
    schedule = flow.scheduling_config or {"interval": "manual"}
    webhook = schedule.get("webhook")
    out: dict[str, Any] = {
        "flow_id": flow.flow_id,
        "flow_name": flow.flow_name,
        "pipeline_id": flow.pipeline_id,
        "pipeline_name": pipeline_name,
        "user_id": flow.user_id,
        "agent_id": flow.agent_id,
        "scheduling_config": mask_schedule(schedule),
        "created_at": ts(flow.created_at),
        "updated_at": ts(flow.updated_at),
        "step_count": len(config),
        "enabled": schedule.get("enabled") is not False,
        "is_running": is_running,
        "next_run": ts(flow.next_run_at),
        "last_run": ts(flow.last_run_at),
        "last_run_status": flow.last_run_status,
        "consecutive_failures": flow.consecutive_failures,
        "consecutive_no_items": flow.consecutive_no_items,
        "webhook_enabled": bool(isinstance(webhook, dict) and webhook.get("enabled")),
    }
    if full:
        out["flow_config"] = {k: flow_step_dict(v, pipeline_config) for k, v in config.items()}
    return out


async def running_flow_ids(ctx: AbilityContext, flow_ids: Iterable[int]) -> set[int]:
    ids = list(flow_ids)
    if not ids:
        return set()
    rows = await ctx.session.execute(
        select(Job.flow_key).where(Job.flow_key.in_(ids), Job.status.in_(ACTIVE_STATUSES)).distinct()
    )
    return {flow_id for (flow_id,) in rows.all() if flow_id is not None}


async def flow_counts(ctx: AbilityContext, pipeline_ids: Sequence[int]) -> dict[int, int]:
    if not pipeline_ids:
        return {}
    rows = await ctx.session.execute(
        select(Flow.pipeline_id, func.count()).where(Flow.pipeline_id.in_(pipeline_ids)).group_by(Flow.pipeline_id)
    )
    return {pid: n for pid, n in rows.all()}


async def flows_out(ctx: AbilityContext, flows: Sequence[Flow], *, full: bool = True) -> list[dict[str, Any]]:
    """Flow output rows with pipeline names, pipeline configs (for labels) and running state."""
    if not flows:
        return []
    pids = sorted({f.pipeline_id for f in flows})
    rows = await ctx.session.execute(
        select(Pipeline.pipeline_id, Pipeline.pipeline_name, Pipeline.pipeline_config).where(
            Pipeline.pipeline_id.in_(pids)
        )
    )
    pipelines = {pid: (name, config) for pid, name, config in rows.all()}
    running = await running_flow_ids(ctx, [f.flow_id for f in flows])
    return [
        flow_dict(
            f,
            pipelines.get(f.pipeline_id, ("", None))[0],
            pipelines.get(f.pipeline_id, ("", None))[1],
            is_running=f.flow_id in running,
            full=full,
        )
        for f in flows
    ]


def pipeline_uri(pipeline_id: int) -> str:
    return f"datamachine://pipelines/{pipeline_id}"


def flow_uri(flow_id: int) -> str:
    return f"datamachine://flows/{flow_id}"


def notify_flow(ctx: AbilityContext, flow: Flow) -> None:
    """Flow changed: its resource and its pipeline's (which embeds its flows)."""
    ctx.notify_updated(flow_uri(flow.flow_id))
    ctx.notify_updated(pipeline_uri(flow.pipeline_id))


def notify_pipeline(ctx: AbilityContext, pipeline_id: int, *, list_changed: bool = False) -> None:
    ctx.notify_updated(pipeline_uri(pipeline_id))
    ctx.notify_updated("datamachine://pipelines")
    if list_changed:
        ctx.notify_list_changed()
