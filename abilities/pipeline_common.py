"""Shared pieces of the pipeline, flow, queue and processed-item tools.

Step identifiers, loading pipelines and flows with their role checks, keeping each
flow's ``flow_config`` in sync with its pipeline's steps, and building pipeline steps. The output
shapes and change notices are in ``abilities.pipeline_views``.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

from datamachine_mcp.abilities.access import Owner, Role
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.engine.catalog import STEP_TYPES
from datamachine_mcp.engine.configs import handler_for, seal_secrets, validate_handler_config
from datamachine_mcp.storage.crypto import SecretBox
from datamachine_mcp.storage.models import Agent, Flow, Pipeline
from datamachine_mcp.storage.settings_schema import PROVIDERS

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
