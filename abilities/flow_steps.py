"""Flows toolset, part 2: flow steps.

get-flow-steps and update-flow-step, plus the flow-step lookup shared with the queue tools. The bulk
tools configure-flow-steps and validate-flow-steps-config are in ``abilities.flow_steps_config``.
Every change goes through ``flow_ops.apply_step_edit`` so the rules of docs/engine.md, Handler
configuration (handler choice, merging, validation, secrets) are the same as in create-flow and the import tools.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlalchemy import select

from datamachine_mcp.abilities.access import Owner, Role
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import StepEdit, apply_step_edit, seeded_warnings
from datamachine_mcp.abilities.pipeline_common import ordered_steps, owner_of, parse_flow_step_id
from datamachine_mcp.abilities.pipeline_views import FlowStepOut, flow_step_dict, notify_flow
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.storage.models import Flow, Pipeline
from datamachine_mcp.storage.timeutil import utcnow

FSID_DESC = "{pipeline_step_id}_{flow_id}"


# --- lookup -------------------------------------------------------------------------------------


def _invalid(message: str, **data: Any) -> AbilityError:
    return AbilityError("invalid_flow_step_id", message, **data)


def parse_or_fail(flow_step_id: str) -> tuple[str, int]:
    fsid = flow_step_id.strip()
    if not fsid:
        raise _invalid("flow_step_id must be a non-empty string")
    parsed = parse_flow_step_id(fsid)
    if parsed is None:
        raise _invalid(
            f"flow_step_id '{fsid}' is not a flow step id; expected {{pipeline_step_id}}_{{flow_id}} "
            "(see get-flow-steps).",
            flow_step_id=fsid,
        )
    return fsid, parsed[1]


async def lookup_flow_step(
    ctx: AbilityContext,
    flow_step_id: str,
    flow_id: int | None,
    required: Role,
    *,
    mutating: bool,
    lock: bool = False,
) -> tuple[Flow, dict[str, Any], Owner]:
    """The flow and step named by ``flow_step_id``, checked in the documented order."""
    fsid, tail = parse_or_fail(flow_step_id)
    stmt = select(Flow).where(Flow.flow_id == tail)
    if lock:
        stmt = ctx.db.for_update(stmt)
    flow = (await ctx.session.execute(stmt)).scalar_one_or_none()
    if flow is None:
        raise AbilityError("flow_not_found", f"Flow {tail} not found.", flow_id=tail)
    owner = await owner_of(ctx, flow.agent_id, flow.user_id)
    target = {"type": "flow", "id": flow.flow_id}
    await ctx.access.authorize(owner, "viewer", mutating=False, target=target)
    entry = (flow.flow_config or {}).get(fsid)
    if not isinstance(entry, dict):
        raise AbilityError(
            "flow_step_not_found", "Flow step not found in flow config", flow_step_id=fsid, flow_id=flow.flow_id
        )
    if flow_id is not None and flow_id != tail:
        raise _invalid("flow_step_id does not belong to this flow", flow_step_id=fsid, flow_id=flow_id)
    if required != "viewer" or mutating:
        await ctx.access.authorize(owner, required, mutating=mutating, target=target)
    return flow, entry, owner


def replace_step(flow: Flow, entry: dict[str, Any]) -> None:
    """Store a changed step (a new flow_config dict; JSON columns are never mutated in place)."""
    flow.flow_config = {**(flow.flow_config or {}), entry["flow_step_id"]: entry}
    flow.updated_at = utcnow()


def step_out(entry: dict[str, Any], pipeline_config: dict[str, Any] | None) -> dict[str, Any]:
    """FlowStep with secrets masked; ai steps also carry their pipeline step's prompt and model."""
    out = flow_step_dict(entry, pipeline_config)
    if entry.get("step_type") == "ai":
        pstep = (pipeline_config or {}).get(entry.get("pipeline_step_id", ""), {})
        for key in ("system_prompt", "provider", "model"):
            if key in pstep:
                out[key] = pstep[key]
    return out


async def pipeline_config_of(ctx: AbilityContext, pipeline_id: int) -> dict[str, Any]:
    row = (
        await ctx.session.execute(select(Pipeline.pipeline_config).where(Pipeline.pipeline_id == pipeline_id))
    ).scalar()
    return row or {}


# --- get-flow-steps ---------------------------------------------------------------------------


class GetFlowStepsIn(Input):
    flow_id: int | None = Field(None, ge=1, description="Flow (or flow_step_id)")
    flow_step_id: str | None = Field(None, max_length=300, description="One step")


class GetFlowStepsOut(Output):
    flow_id: int | None = Field(description="The flow (null when flow_step_id names no existing flow)")
    steps: list[FlowStepOut] = Field(description="Steps by execution_order (secrets masked)")
    step_count: int = Field(description="Number of steps returned")


@ability(
    "get-flow-steps",
    toolset="flows",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("List a flow's steps with handlers and configs, or get one."),
)
async def get_flow_steps(ctx: AbilityContext, inp: GetFlowStepsIn) -> GetFlowStepsOut:
    if inp.flow_step_id is not None:
        fsid, tail = parse_or_fail(inp.flow_step_id)
        flow = await ctx.session.get(Flow, tail)
        if flow is None:
            return GetFlowStepsOut(flow_id=None, steps=[], step_count=0)
        await ctx.access.authorize(
            await owner_of(ctx, flow.agent_id, flow.user_id),
            "viewer",
            mutating=False,
            target={"type": "flow", "id": flow.flow_id},
        )
        entry = (flow.flow_config or {}).get(fsid)
        entries = [entry] if isinstance(entry, dict) else []
    elif inp.flow_id is not None:
        flow = await ctx.session.get(Flow, inp.flow_id)
        if flow is None:
            raise AbilityError("flow_not_found", f"Flow {inp.flow_id} not found.", flow_id=inp.flow_id)
        await ctx.access.authorize(
            await owner_of(ctx, flow.agent_id, flow.user_id),
            "viewer",
            mutating=False,
            target={"type": "flow", "id": flow.flow_id},
        )
        entries = ordered_steps(flow.flow_config)
    else:
        raise AbilityError("invalid_flow_id", "Provide flow_id (all steps of a flow) or flow_step_id (one step).")
    pconfig = await pipeline_config_of(ctx, flow.pipeline_id)
    steps = [step_out(e, pconfig) for e in entries]
    return GetFlowStepsOut.model_validate({"flow_id": flow.flow_id, "steps": steps, "step_count": len(steps)})


# --- update-flow-step -------------------------------------------------------------------------

UPDATE_FIELDS = (
    "handler_slug",
    "handler_config",
    "handler_configs",
    "add_handler",
    "remove_handler",
    "flow_step_settings",
    "user_message",
)


class UpdateFlowStepIn(Input):
    flow_step_id: str = Field(max_length=300, description=FSID_DESC)
    handler_slug: str | None = Field(None, max_length=100, description="Handler (switches the step to it)")
    handler_config: dict[str, Any] | None = Field(
        None, description="Merged into the handler's config; null removes a key"
    )
    handler_configs: dict[str, dict[str, Any]] | None = Field(None, description="{slug: config}, merged")
    add_handler: str | None = Field(None, max_length=100, description="Add a handler (publish/update)")
    add_handler_config: dict[str, Any] | None = Field(None, description="Config of add_handler")
    remove_handler: str | None = Field(None, max_length=100, description="Remove a handler")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Step settings, merged")
    user_message: str | None = Field(None, max_length=20000, description='ai: the prompt; "" clears')
    validate_only: bool = Field(False, description="Dry run")


class UpdateFlowStepOut(Output):
    flow_step_id: str = Field(description="Flow step id")
    flow_id: int = Field(description="Its flow")
    updated_fields: list[str] = Field(description="Parts of the step that changed")
    step: FlowStepOut = Field(description="The effective step (secrets masked)")
    warnings: list[str] = Field(description="Handlers of the step still missing required fields, and similar")
    validate_only: bool = Field(description="True when nothing was saved")
    message: str = Field(description="Human-readable result")


@ability(
    "update-flow-step",
    core=True,
    toolset="flows",
    level="admin",
    idempotent=True,
    description=("Configure a flow step: its handlers and their configs, AI prompt or step settings."),
)
async def update_flow_step(ctx: AbilityContext, inp: UpdateFlowStepIn) -> UpdateFlowStepOut:
    if all(getattr(inp, name) is None for name in UPDATE_FIELDS):
        raise AbilityError(
            "invalid_flow_step_update",
            "At least one of handler_slug, handler_config, handler_configs, add_handler, remove_handler, "
            "flow_step_settings or user_message is required",
        )
    flow, entry, _ = await lookup_flow_step(ctx, inp.flow_step_id, None, "admin", mutating=True, lock=True)
    edit = StepEdit.from_input(inp.model_dump(exclude_none=True, exclude={"flow_step_id", "validate_only"}))
    snap = await ctx.settings()
    result = apply_step_edit(entry, edit, box=ctx.runtime.box, files_roots=snap.files_roots(), now=utcnow())
    fsid = entry["flow_step_id"]
    changed = result.entry != entry
    if changed and not inp.validate_only:
        replace_step(flow, result.entry)
        await ctx.audit(
            f"flow step {fsid} updated ({', '.join(result.changes)})",
            target=("flow_step", fsid),
            changes=result.changes,
            agent_id=flow.agent_id,
            flow_id=flow.flow_id,
            pipeline_id=flow.pipeline_id,
        )
        notify_flow(ctx, flow)
    pconfig = await pipeline_config_of(ctx, flow.pipeline_id)
    if inp.validate_only:
        message = "Valid; nothing was saved (validate_only)."
    elif changed:
        message = f"Flow step {fsid} updated."
    else:
        message = f"Flow step {fsid} already had this configuration; nothing changed."
    return UpdateFlowStepOut.model_validate(
        {
            "flow_step_id": fsid,
            "flow_id": flow.flow_id,
            "updated_fields": result.changes if changed else [],
            "step": step_out(result.entry, pconfig),
            "warnings": seeded_warnings(result.entry),
            "validate_only": inp.validate_only,
            "message": message,
        }
    )
