"""Shared pieces of the pipeline, flow, queue and processed-item tools.

Step identifiers, loading pipelines and flows with their role checks, keeping each
flow's ``flow_config`` in sync with its pipeline's steps, and the Pipeline / PipelineStep / Flow /
FlowStep output shapes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ConfigDict, Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.access import Owner, Role
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.schema import Opt, Output, ts
from datamachine_mcp.engine.catalog import PROVIDERS, STEP_TYPES
from datamachine_mcp.engine.configs import handler_for, seal_secrets, validate_handler_config
from datamachine_mcp.storage.crypto import MASK, SecretBox, mask
from datamachine_mcp.storage.models import Agent, Flow, Job, Pipeline

ACTIVE_STATUSES = ("pending", "processing", "waiting")
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
PIPELINE_STEP_RE = re.compile(rf"^([0-9]+)_{UUID4}$")
Owned = TypeVar("Owned", Pipeline, Flow)


# --- identifiers (docs/storage.md, pipeline_config; flow_config) ---------------------------------


def new_pipeline_step_id(pipeline_id: int) -> str:
    return f"{pipeline_id}_{uuid.uuid4()}"


def make_flow_step_id(pipeline_step_id: str, flow_id: int) -> str:
    if not pipeline_step_id or not flow_id:
        raise ValueError("flow_step_id needs a pipeline_step_id and a flow_id")
    return f"{pipeline_step_id}_{flow_id}"


def parse_flow_step_id(flow_step_id: str) -> tuple[str, int, int] | None:
    """``(pipeline_step_id, flow_id, pipeline_id)``; None when it does not parse (split on the last ``_``)."""
    head, sep, tail = flow_step_id.rpartition("_")
    if not sep or not head or not tail.isdigit():
        return None
    pipeline_part = head.split("_", 1)[0]
    if not pipeline_part.isdigit():
        return None
    return head, int(tail), int(pipeline_part)


def parse_pipeline_step_id(pipeline_step_id: str) -> int | None:
    match = PIPELINE_STEP_RE.match(pipeline_step_id)
    return int(match.group(1)) if match else None


# --- loading with access checks ----------------------------------------------------------------


async def owner_of(ctx: AbilityContext, agent_id: int | None, user_id: int) -> Owner:
    """The Owner of a resource, with its agent's status and slug (for inactive checks and messages)."""
    if agent_id is None:
        return Owner(agent_id=None, user_id=user_id)
    row = (await ctx.session.execute(select(Agent.status, Agent.agent_slug).where(Agent.agent_id == agent_id))).first()
    status, slug = (row[0], row[1]) if row is not None else (None, None)
    return Owner(agent_id=agent_id, user_id=user_id, agent_status=status, agent_slug=slug)


async def _load_owned(
    ctx: AbilityContext, model: type[Owned], kind: str, key: int, required: Role, *, mutating: bool, lock: bool
) -> Owned:
    """The ``kind`` row ``key`` (``{kind}_not_found`` first), once the caller holds ``required`` on its owner."""
    id_column = getattr(model, f"{kind}_id")
    stmt = select(model).where(id_column == key)
    if lock:
        stmt = ctx.db.for_update(stmt)
    row = (await ctx.session.execute(stmt)).scalar_one_or_none()
    if row is None:
        raise AbilityError(f"{kind}_not_found", f"{kind.capitalize()} {key} not found.", **{f"{kind}_id": key})
    await ctx.access.authorize(
        await owner_of(ctx, row.agent_id, row.user_id),
        required,
        mutating=mutating,
        target={"type": kind, "id": key},
    )
    return row


async def load_pipeline(
    ctx: AbilityContext, pipeline_id: int, required: Role, *, mutating: bool, lock: bool = False
) -> Pipeline:
    return await _load_owned(ctx, Pipeline, "pipeline", pipeline_id, required, mutating=mutating, lock=lock)


async def load_flow(ctx: AbilityContext, flow_id: int, required: Role, *, mutating: bool, lock: bool = False) -> Flow:
    return await _load_owned(ctx, Flow, "flow", flow_id, required, mutating=mutating, lock=lock)


# --- steps and syncing -------------------------------------------------------------------------


def ordered_steps(config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Steps of a pipeline_config or flow_config, by integer execution_order (ties by id)."""
    steps = [s for s in (config or {}).values() if isinstance(s, dict)]
    return sorted(steps, key=lambda s: (s.get("execution_order", 0), s.get("pipeline_step_id", "")))


def step_label(step_type: str) -> str:
    spec = STEP_TYPES.get(step_type)
    return spec.label if spec else step_type


def seed_flow_step(pipeline_step: dict[str, Any], *, flow_id: int, pipeline_id: int) -> dict[str, Any]:
    """A new flow step for ``pipeline_step``: mirrored keys, handler defaults, empty queue."""
    psid = pipeline_step["pipeline_step_id"]
    step_type = pipeline_step["step_type"]
    entry: dict[str, Any] = {
        "flow_step_id": make_flow_step_id(psid, flow_id),
        "pipeline_step_id": psid,
        "step_type": step_type,
        "execution_order": pipeline_step["execution_order"],
        "pipeline_id": pipeline_id,
        "flow_id": flow_id,
    }
    spec = STEP_TYPES.get(step_type)
    if spec is not None and spec.uses_handler:
        slug = pipeline_step.get("handler_slug")
        entry["handler_slugs"] = [slug] if slug else []
        entry["handler_configs"] = {slug: dict(pipeline_step.get("handler_config") or {})} if slug else {}
    else:
        entry["flow_step_settings"] = {}
    if step_type == "ai":
        entry["queue_mode"] = "static"
        entry["prompt_queue"] = []
    elif step_type == "fetch":
        entry["queue_mode"] = "static"
        entry["config_patch_queue"] = []
    return entry


def sync_flow_config(
    flow_config: dict[str, Any] | None, pipeline_config: dict[str, Any] | None, *, flow_id: int, pipeline_id: int
) -> dict[str, Any]:
    """A flow_config with exactly one entry per pipeline step and mirrored keys up to date.

    Existing entries keep their handler configs, settings and queues; new steps are seeded; steps no
    longer in the pipeline are dropped.
    """
    current = dict(flow_config or {})
    out: dict[str, Any] = {}
    for step in ordered_steps(pipeline_config):
        fsid = make_flow_step_id(step["pipeline_step_id"], flow_id)
        entry = dict(current.get(fsid) or seed_flow_step(step, flow_id=flow_id, pipeline_id=pipeline_id))
        entry.update(
            flow_step_id=fsid,
            pipeline_step_id=step["pipeline_step_id"],
            step_type=step["step_type"],
            execution_order=step["execution_order"],
            pipeline_id=pipeline_id,
            flow_id=flow_id,
        )
        out[fsid] = entry
    return out


async def flows_of(ctx: AbilityContext, pipeline_id: int, *, lock: bool = False) -> list[Flow]:
    stmt = select(Flow).where(Flow.pipeline_id == pipeline_id).order_by(Flow.flow_id)
    if lock:
        stmt = ctx.db.for_update(stmt)
    return list((await ctx.session.execute(stmt)).scalars())


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


# --- building pipelines ------------------------------------------------------------------------

AI_FIELD_LIMITS: dict[str, tuple[type | tuple[type, ...], float | None, float | None]] = {
    "provider": (str, None, None),
    "model": (str, None, 100),
    "system_prompt": (str, None, 50000),
    "temperature": ((int, float), 0, 2),
    "max_tokens": (int, 1, 32000),
    "skip_marker": (str, None, 50),
}


def build_pipeline_step(
    pipeline_id: int,
    seed: dict[str, Any],
    order: int,
    *,
    box: SecretBox,
    files_roots: list[Path] | None,
    pipeline_step_id: str | None = None,
) -> dict[str, Any]:
    """A pipeline step from a client seed (add-pipeline-step, create-pipeline, imports).

    The server sets ``pipeline_step_id`` and ``execution_order``; ``handler`` is accepted as a spelling
    of ``handler_slug``; handler defaults are validated (types, unknown fields; not required fields)
    and their secrets sealed; other seed keys are kept.
    """
    step = {k: v for k, v in seed.items() if k not in ("pipeline_step_id", "execution_order", "handler")}
    step_type = seed.get("step_type")
    if not isinstance(step_type, str) or step_type not in STEP_TYPES:
        raise AbilityError(
            "invalid_step_type",
            f"Invalid step_type '{step_type}'. Must be one of: {', '.join(STEP_TYPES)}",
            step_type=step_type,
        )
    slug = seed.get("handler_slug") or seed.get("handler")
    if slug is not None or seed.get("handler_config") is not None:
        if not STEP_TYPES[step_type].uses_handler:
            raise AbilityError(
                "invalid_handler", f"A {step_type} step uses no handler; remove handler_slug/handler_config."
            )
        if not isinstance(slug, str):
            raise AbilityError("invalid_handler", "handler_config needs handler_slug naming its handler.")
        handler = handler_for(step_type, slug)
        defaults = seed.get("handler_config") or {}
        if not isinstance(defaults, dict):
            raise AbilityError("invalid_input", "handler_config must be an object.", field="handler_config")
        validate_handler_config(handler, step_type, defaults, check_required=False, files_roots=files_roots)
        step["handler_slug"] = slug
        step["handler_config"] = seal_secrets(handler, defaults, box)
    for name, (kind, low, high) in AI_FIELD_LIMITS.items():
        if name not in step or step[name] is None:
            continue
        if step_type != "ai":
            raise AbilityError(
                "invalid_pipeline_step_update",
                f"{name} applies to ai steps only; this is a {step_type} step.",
                field=name,
            )
        value = step[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise AbilityError(
                "invalid_input", f"{name} has the wrong type.", errors=[{"field": name, "message": "wrong type"}]
            )
        if name == "provider" and value not in ("", *PROVIDERS):
            raise AbilityError(
                "unknown_provider", f"Unknown provider '{value}'. Use {', '.join(PROVIDERS)} or \"\" for the default."
            )
        size: float = len(value) if isinstance(value, str) else step[name]  # an int or float, checked above
        if (low is not None and size < low) or (high is not None and size > high):
            raise AbilityError(
                "invalid_input", f"{name} is out of range.", errors=[{"field": name, "message": "out of range"}]
            )
    label = step.get("label")
    step["label"] = label.strip()[:255] if isinstance(label, str) and label.strip() else step_label(step_type)
    step["step_type"] = step_type
    step["pipeline_step_id"] = pipeline_step_id or new_pipeline_step_id(pipeline_id)
    step["execution_order"] = order
    return step
