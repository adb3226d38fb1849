"""Flows toolset, part 2: flow steps (abilities.md §6).

get-flow-steps, update-flow-step, configure-flow-steps and validate-flow-steps-config, plus the
flow-step lookup shared with the queue tools. Every change goes through
``flow_ops.apply_step_edit`` so the §2.11 rules (handler choice, merging, validation, secrets) are
the same as in create-flow and the import tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from abilities.access import Owner, Role
from abilities.context import AbilityContext
from abilities.errors import AbilityError, AccessDenied
from abilities.flow_ops import StepConfigInput, StepEdit, apply_step_edit, seeded_warnings
from abilities.pipeline_common import (
    FlowStepOut,
    flow_step_dict,
    flows_of,
    load_pipeline,
    notify_flow,
    ordered_steps,
    owner_of,
    parse_flow_step_id,
)
from abilities.registry import ability
from abilities.schema import Input, Opt, Output
from engine.catalog import HANDLERS, STEP_TYPES
from storage.crypto import SecretBox, SecretUnavailable, is_envelope
from storage.models import Flow, Pipeline
from storage.timeutil import utcnow

FSID_DESC = "Flow step id: {pipeline_step_id}_{flow_id}"


# --- lookup (abilities.md §6 "Flow-step lookup") -------------------------------------------------


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
    flow_id: int | None = Field(None, ge=1, description="Flow (required unless flow_step_id)")
    flow_step_id: str | None = Field(None, max_length=300, description="Single step; priority over flow_id")


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
    description=(
        "List a flow's steps (handlers, handler configs, queue settings) in execution order, or get one by "
        "flow_step_id."
    ),
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
    handler_slug: str | None = Field(
        None, max_length=100, description="Handler to target; the step switches to it if it is not on the step"
    )
    handler_config: dict[str, Any] | None = Field(
        None, description="Merged into handler_slug's (or the primary handler's) config; null values remove keys"
    )
    handler_configs: dict[str, dict[str, Any]] | None = Field(
        None, description="{slug: config} merged per handler (each slug must be on the step)"
    )
    add_handler: str | None = Field(None, max_length=100, description="Add a handler (publish/update steps only)")
    add_handler_config: dict[str, Any] | None = Field(None, description="Initial config of add_handler")
    remove_handler: str | None = Field(None, max_length=100, description="Remove a handler and its config")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Merged into a handler-free step's settings")
    user_message: str | None = Field(
        None, max_length=20000, description='ai steps: sets the prompt queue to this one prompt; "" clears it'
    )
    validate_only: bool = Field(False, description="Return the effective step without saving")


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
    toolset="flows",
    level="admin",
    idempotent=True,
    description=(
        "Configure one flow step: choose or add/remove handlers, merge handler config, set AI user_message or step "
        "settings. validate_only previews."
    ),
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


# --- bulk planning (configure-flow-steps, validate-flow-steps-config) -------------------------


@dataclass
class BulkChange:
    """The change fields of the pipeline and global scopes."""

    target_handler_slug: str | None = None
    field_map: dict[str, str] | None = None
    handler_config: dict[str, Any] | None = None
    handler_configs: dict[str, dict[str, Any]] | None = None
    flow_step_settings: dict[str, Any] | None = None
    user_message: str | None = None

    def with_override(self, override: FlowConfigIn | None) -> BulkChange:
        if override is None:
            return self
        handler_config = self.handler_config
        if override.handler_config is not None:
            handler_config = {**(handler_config or {}), **override.handler_config}
        settings = self.flow_step_settings
        if override.flow_step_settings is not None:
            settings = {**(settings or {}), **override.flow_step_settings}
        message = override.user_message if override.user_message is not None else self.user_message
        return BulkChange(
            self.target_handler_slug, self.field_map, handler_config, self.handler_configs, settings, message
        )


@dataclass
class Plan:
    """What a bulk change does: per-step results, skips, errors and notes."""

    updates: list[tuple[Flow, dict[str, Any], list[str]]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    matching: int = 0
    used: set[str] = field(default_factory=set)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"flow_id": flow.flow_id, "flow_step_id": entry["flow_step_id"], "changes": changes}
            for flow, entry, changes in self.updates
        ]


def _carry(
    config: dict[str, Any], field_map: dict[str, str], old_slug: str, box: SecretBox, plan: Plan, fsid: str
) -> dict[str, Any]:
    """Old config values under their new names (secrets decrypted so they can be sealed for the new handler)."""
    out: dict[str, Any] = {}
    for old_field, new_field in field_map.items():
        if old_field not in config:
            continue
        value = config[old_field]
        if is_envelope(value):
            try:
                value = box.decrypt(value, f"handler:{old_slug}.{old_field}")
            except SecretUnavailable:
                plan.warnings.append(
                    f"Step {fsid}: the secret {old_slug}.{old_field} cannot be decrypted; not carried."
                )
                continue
        out[new_field] = value
    return out


def bulk_edit(
    entry: dict[str, Any], filter_slug: str | None, change: BulkChange, box: SecretBox, plan: Plan
) -> tuple[StepEdit | None, str | None]:
    """The StepEdit a pipeline/global change makes to one matching step (fields that do not apply are left out).

    Returns the edit and, for a switch on a multi-handler step, the handler whose position the new one takes.
    """
    step_type = entry.get("step_type", "")
    spec = STEP_TYPES.get(step_type)
    if spec is None:
        return None, None
    edit = StepEdit()
    replaced = None
    if spec.uses_handler:
        slugs = list(entry.get("handler_slugs") or [])
        configs = entry.get("handler_configs") or {}
        focus = filter_slug if filter_slug in slugs else (slugs[0] if slugs else None)
        per_slug: dict[str, dict[str, Any]] = {}
        target = change.target_handler_slug
        if target is not None and target in HANDLERS and step_type not in HANDLERS[target].step_types:
            target = None  # the target does not serve this step type: leave such steps alone
        if target is not None and target != focus:
            plan.used.add("target_handler_slug")
            new_config = _carry(
                configs.get(focus, {}) if focus else {},
                change.field_map or {},
                focus or "",
                box,
                plan,
                entry.get("flow_step_id", ""),
            )
            new_config.update(change.handler_config or {})
            if focus is None or len(slugs) <= 1:
                edit.handler_slug, edit.handler_config = target, new_config
                slugs = [target]
            elif target in slugs:
                edit.remove_handler = focus
                per_slug[target] = new_config
                slugs.remove(focus)
            else:
                edit.remove_handler, edit.add_handler, edit.add_handler_config = focus, target, new_config
                replaced = focus
                slugs = [target if s == focus else s for s in slugs]
            if change.handler_config is not None:
                plan.used.add("handler_config")
        elif change.handler_config is not None:
            plan.used.add("handler_config")
            if focus is not None:
                per_slug[focus] = dict(change.handler_config)
            else:
                edit.handler_config = dict(change.handler_config)
        for slug, patch in (change.handler_configs or {}).items():
            if slug in slugs:
                plan.used.add("handler_configs")
                per_slug[slug] = {**per_slug.get(slug, {}), **patch}
        if per_slug:
            edit.handler_configs = per_slug
    elif change.flow_step_settings is not None:
        plan.used.add("flow_step_settings")
        edit.flow_step_settings = change.flow_step_settings
    if step_type == "ai" and change.user_message is not None:
        plan.used.add("user_message")
        edit.user_message = change.user_message
    return (None if edit.empty() else edit), replaced


def fields_edit(entry: dict[str, Any], fields: dict[str, Any], plan: Plan) -> StepEdit | None:
    """The StepEdit an updates-scope change (or shared_config) makes to one step; inapplicable fields are left out."""
    step_type = entry.get("step_type", "")
    spec = STEP_TYPES.get(step_type)
    if spec is None:
        return None
    edit = StepEdit()
    if spec.uses_handler:
        slugs = list(entry.get("handler_slugs") or [])
        serves = {s for s, h in HANDLERS.items() if step_type in h.step_types}
        new_slugs = fields.get("handler_slugs")
        if new_slugs is not None and all(s in serves for s in new_slugs):
            edit.handler_slugs = list(new_slugs)
            slugs = list(new_slugs)
        slug = fields.get("handler_slug")
        if slug is not None and slug in serves:
            edit.handler_slug = slug
            if slug not in slugs:
                slugs = [slug]
        elif slug is not None:
            return _only_common(edit, entry, fields, plan)
        if fields.get("handler_config") is not None:
            edit.handler_config = fields["handler_config"]
        configs = {s: c for s, c in (fields.get("handler_configs") or {}).items() if s in slugs}
        if configs:
            edit.handler_configs = configs
    elif fields.get("flow_step_settings") is not None:
        edit.flow_step_settings = fields["flow_step_settings"]
    return _only_common(edit, entry, fields, plan)


def _only_common(edit: StepEdit, entry: dict[str, Any], fields: dict[str, Any], plan: Plan) -> StepEdit | None:
    step_type = entry.get("step_type", "")
    if step_type == "ai" and fields.get("user_message") is not None:
        edit.user_message = fields["user_message"]
    if STEP_TYPES[step_type].queue_slot is not None and fields.get("queue_mode") is not None:
        edit.queue_mode = fields["queue_mode"]
    for name in edit.__dataclass_fields__:
        if getattr(edit, name) is not None:
            plan.used.add(name)
    return None if edit.empty() else edit


def _error_row(flow_id: int, fsid: str, err: AbilityError) -> dict[str, Any]:
    return {"flow_id": flow_id, "flow_step_id": fsid, "code": err.code, "message": err.message, **err.data}


def try_edit(
    plan: Plan,
    flow: Flow,
    entry: dict[str, Any],
    edits: list[StepEdit],
    *,
    box: SecretBox,
    files_roots: Any,
    now: Any,
    replaced: str | None = None,
) -> tuple[dict[str, Any], list[str]] | None:
    """Apply ``edits`` in order to one step: (new entry, changes), or None after recording the error."""
    current = entry
    changes: list[str] = []
    try:
        for edit in edits:
            result = apply_step_edit(current, edit, box=box, files_roots=files_roots, now=now)
            current = result.entry
            changes += [c for c in result.changes if c not in changes]
    except AbilityError as err:
        plan.errors.append(_error_row(flow.flow_id, entry["flow_step_id"], err))
        return None
    added = edits[-1].add_handler if edits else None
    if replaced is not None and added is not None:
        # A switch on a multi-handler step keeps the replaced handler's position.
        slugs = [s for s in current.get("handler_slugs", []) if s != added]
        index = (entry.get("handler_slugs") or []).index(replaced)
        slugs.insert(min(index, len(slugs)), added)
        current = {**current, "handler_slugs": slugs}
    return current, changes


def matches(entry: dict[str, Any], step_type: str | None, handler_slug: str | None) -> bool:
    if step_type is not None and entry.get("step_type") != step_type:
        return False
    return handler_slug is None or handler_slug in (entry.get("handler_slugs") or [])


def plan_bulk(
    flows: list[Flow],
    *,
    step_type: str | None,
    handler_slug: str | None,
    change: BulkChange,
    overrides: dict[int, FlowConfigIn],
    box: SecretBox,
    files_roots: Any,
) -> Plan:
    plan = Plan()
    now = utcnow()
    for flow in flows:
        flow_change = change.with_override(overrides.get(flow.flow_id))
        for entry in ordered_steps(flow.flow_config):
            if not matches(entry, step_type, handler_slug):
                continue
            plan.matching += 1
            edit, replaced = bulk_edit(entry, handler_slug, flow_change, box, plan)
            if edit is None:
                continue
            done = try_edit(plan, flow, entry, [edit], box=box, files_roots=files_roots, now=now, replaced=replaced)
            if done is not None and done[0] != entry:
                plan.updates.append((flow, done[0], done[1]))
    return plan


def unused_warnings(plan: Plan, given: dict[str, Any]) -> None:
    for name, value in given.items():
        if value is not None and name not in plan.used:
            plan.warnings.append(f"{name} applied to no matching step.")


async def _admin_or_reason(ctx: AbilityContext, flow: Flow, owners: dict[Any, Owner]) -> str | None:
    key = (flow.agent_id, flow.user_id)
    if key not in owners:
        owners[key] = await owner_of(ctx, flow.agent_id, flow.user_id)
    try:
        await ctx.access.authorize(owners[key], "admin", mutating=True, target={"type": "flow", "id": flow.flow_id})
    except AccessDenied:
        return "agent_access_denied"
    except AbilityError as err:
        return err.code
    return None


# --- configure-flow-steps ---------------------------------------------------------------------


class FlowConfigIn(Input):
    flow_id: int = Field(ge=1, description="Flow of the pipeline this override applies to")
    handler_config: dict[str, Any] | None = Field(None, description="Merged over handler_config for this flow")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Merged over flow_step_settings for this flow")
    user_message: str | None = Field(None, max_length=20000, description="Replaces user_message for this flow")


class FlowUpdateIn(Input):
    flow_id: int = Field(ge=1, description="Flow to change")
    step_type: str | None = Field(None, max_length=50, description="Only steps of this type (default: every step)")
    handler_slug: str | None = Field(
        None, max_length=100, description="Handler to target on matching handler steps; they switch to it if absent"
    )
    handler_config: dict[str, Any] | None = Field(None, description="Merged into the targeted handler's config")
    handler_configs: dict[str, dict[str, Any]] | None = Field(None, description="{slug: config} merged per handler")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Merged into handler-free steps' settings")
    user_message: str | None = Field(None, max_length=20000, description="Prompt of ai steps")


class ConfigureFlowStepsIn(Input):
    pipeline_id: int | None = Field(None, ge=1, description="Pipeline scope (needs handler_slug or all_flows)")
    all_flows: bool = Field(False, description="With pipeline_id: every flow of the pipeline")
    global_scope: bool = Field(False, description="With handler_slug: every flow you administer using that handler")
    updates: list[FlowUpdateIn] | None = Field(
        None, max_length=200, description="Updates scope: explicit per-flow changes (≤200)"
    )
    shared_config: StepConfigInput | None = Field(None, description="With updates: applied before each update")
    step_type: str | None = Field(None, max_length=50, description="Filter: steps of this type")
    handler_slug: str | None = Field(None, max_length=100, description="Filter: steps using this handler")
    target_handler_slug: str | None = Field(None, max_length=100, description="Switch matching steps to this handler")
    field_map: dict[str, str] | None = Field(
        None, description="{old_field: new_field}: carry config values across a handler switch"
    )
    handler_config: dict[str, Any] | None = Field(
        None, description="Merged into matching steps' (target) handler config"
    )
    handler_configs: dict[str, dict[str, Any]] | None = Field(None, description="{slug: config} merged per handler")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Merged into handler-free matching steps")
    user_message: str | None = Field(None, max_length=20000, description="Set as the prompt of matching ai steps")
    flow_configs: list[FlowConfigIn] | None = Field(
        None, max_length=500, description="Per-flow overrides (pipeline scope)"
    )
    validate_only: bool = Field(False, description="Preview without saving")


class StepChange(Output):
    flow_id: int = Field(description="Flow id")
    flow_step_id: str = Field(description="Flow step id")
    changes: list[str] = Field(description="Parts of the step that change")


class SkippedFlow(Output):
    flow_id: int = Field(description="Flow id")
    flow_step_id: str | None = Opt("Step, when a single step was skipped")
    reason: str = Field(description="agent_access_denied, agent_inactive or flow_not_in_pipeline")


class ConfigureFlowStepsOut(Output):
    mode: Literal["pipeline", "global", "updates"] = Field(description="Scope used")
    pipeline_id: int | None = Field(description="Pipeline of the pipeline scope")
    flows_updated: int = Field(description="Flows changed")
    steps_modified: int = Field(description="Steps changed")
    updated_steps: list[StepChange] = Field(description="Each changed step")
    skipped: list[SkippedFlow] = Field(description="Flows left out, with the reason")
    warnings: list[str] = Field(description="Change fields that applied to no step, and similar notes")
    message: str = Field(description="Human-readable result")


class ConfigurePreviewOut(Output):
    valid: bool = Field(description="True when every change validates")
    mode: Literal["validate_only"] = Field(description="validate_only")
    would_update: list[StepChange] = Field(description="Steps that would change")
    errors: list[dict[str, Any]] = Field(description="Failing steps: {flow_id, flow_step_id, code, message, …}")


CHANGE_FIELDS = (
    "target_handler_slug",
    "handler_config",
    "handler_configs",
    "flow_step_settings",
    "user_message",
    "flow_configs",
)


def _scope_of(inp: ConfigureFlowStepsIn) -> str:
    scopes = [
        name
        for name, on in (
            ("pipeline", inp.pipeline_id is not None),
            ("global", inp.global_scope),
            ("updates", inp.updates is not None),
        )
        if on
    ]
    if not scopes:
        raise AbilityError(
            "invalid_configure_scope",
            "No scope: give pipeline_id (with handler_slug or all_flows), global_scope with handler_slug, or updates.",
        )
    if len(scopes) > 1:
        raise AbilityError("invalid_configure_scope", f"Give one scope only (got {', '.join(scopes)}).", scopes=scopes)
    scope = scopes[0]
    if scope == "pipeline" and inp.handler_slug is None and not inp.all_flows:
        raise AbilityError(
            "invalid_configure_scope",
            "explicit scope required: with pipeline_id give handler_slug or all_flows: true.",
        )
    if scope == "global" and inp.handler_slug is None:
        raise AbilityError(
            "invalid_configure_scope", "global_scope needs handler_slug naming the handler to configure."
        )
    return scope


def _fail_plan(plan: Plan) -> AbilityError:
    first = plan.errors[0]
    return AbilityError(
        first["code"],
        f"{len(plan.errors)} step(s) failed validation; nothing was saved. First: {first['message']}",
        errors=plan.errors,
    )


@ability(
    "configure-flow-steps",
    toolset="flows",
    level="admin",
    idempotent=True,
    description=(
        "Bulk-configure matching flow steps across a pipeline's flows or all flows using a handler; can switch "
        "handlers with a field map."
    ),
)
async def configure_flow_steps(
    ctx: AbilityContext, inp: ConfigureFlowStepsIn
) -> ConfigureFlowStepsOut | ConfigurePreviewOut:
    scope = _scope_of(inp)
    if scope == "updates":
        shared = inp.shared_config.model_dump(exclude_none=True) if inp.shared_config is not None else {}
        per_update = [u.model_dump(exclude_none=True, exclude={"flow_id", "step_type"}) for u in inp.updates or []]
        if not (shared or any(per_update)):
            raise AbilityError(
                "invalid_flow_step_update", "No change given: updates and shared_config carry no change field."
            )
    elif all(getattr(inp, name) is None for name in CHANGE_FIELDS):
        raise AbilityError(
            "invalid_flow_step_update",
            "No change given: set target_handler_slug, handler_config, handler_configs, flow_step_settings, "
            "user_message or flow_configs.",
        )
    for slug in filter(None, [inp.target_handler_slug, *(u.handler_slug for u in inp.updates or [])]):
        if slug not in HANDLERS:
            raise AbilityError("handler_not_found", f"Target handler '{slug}' not found", handler_slug=slug)
    snap = await ctx.settings()
    box, roots = ctx.runtime.box, snap.files_roots()
    owners: dict[Any, Owner] = {}
    pipeline_id: int | None = None
    skipped: list[dict[str, Any]] = []
    if scope == "updates":
        plan = Plan()
        now = utcnow()
        loaded: dict[int, Flow] = {}
        # (flow_id, flow_step_id) -> (flow, original entry, current entry, changes)
        states: dict[tuple[int, str], tuple[Flow, dict[str, Any], dict[str, Any], list[str]]] = {}
        shared_fields = inp.shared_config.model_dump(exclude_none=True) if inp.shared_config is not None else {}
        for index, update in enumerate(inp.updates or []):
            flow = loaded.get(update.flow_id)
            if flow is None:
                stmt = ctx.db.for_update(select(Flow).where(Flow.flow_id == update.flow_id))
                flow = (await ctx.session.execute(stmt)).scalar_one_or_none()
                if flow is None:
                    raise AbilityError("flow_not_found", f"Flow {update.flow_id} not found.", flow_id=update.flow_id)
                await ctx.access.authorize(
                    await owner_of(ctx, flow.agent_id, flow.user_id),
                    "admin",
                    mutating=True,
                    target={"type": "flow", "id": flow.flow_id},
                )
                loaded[flow.flow_id] = flow
            fields = update.model_dump(exclude_none=True, exclude={"flow_id", "step_type"})
            touched = False
            for entry in ordered_steps(flow.flow_config):
                if update.step_type is not None and entry.get("step_type") != update.step_type:
                    continue
                key = (flow.flow_id, entry["flow_step_id"])
                _, original, base, changes = states.get(key, (flow, entry, entry, []))
                edits = [e for e in (fields_edit(base, shared_fields, plan), fields_edit(base, fields, plan)) if e]
                if not edits:
                    continue
                touched = True
                plan.matching += 1
                done = try_edit(plan, flow, base, edits, box=box, files_roots=roots, now=now)
                if done is not None:
                    states[key] = (flow, original, done[0], changes + [c for c in done[1] if c not in changes])
            if not touched:
                plan.warnings.append(f"updates[{index}] (flow {update.flow_id}) applied to no step.")
        plan.updates = [(flow, cur, changes) for flow, original, cur, changes in states.values() if cur != original]
    else:
        if scope == "pipeline":
            assert inp.pipeline_id is not None
            pipeline = await load_pipeline(ctx, inp.pipeline_id, "viewer", mutating=False)
            pipeline_id = pipeline.pipeline_id
            candidates = await flows_of(ctx, pipeline_id, lock=True)
            if not candidates:
                raise AbilityError("pipeline_has_no_flows", "Pipeline has no flows yet", pipeline_id=pipeline_id)
            ids = {f.flow_id for f in candidates}
            for override in inp.flow_configs or []:
                if override.flow_id not in ids:
                    skipped.append({"flow_id": override.flow_id, "reason": "flow_not_in_pipeline"})
            flows = []
            for flow in candidates:
                reason = await _admin_or_reason(ctx, flow, owners)
                if reason is None:
                    flows.append(flow)
                elif any(matches(e, inp.step_type, inp.handler_slug) for e in ordered_steps(flow.flow_config)):
                    skipped.append({"flow_id": flow.flow_id, "reason": reason})
        else:
            conds = [await ctx.access.scope_filter(Flow.agent_id, Flow.user_id)]
            stmt = ctx.db.for_update(select(Flow).where(*conds).order_by(Flow.flow_id))
            flows = []
            for flow in (await ctx.session.execute(stmt)).scalars():
                if not any(matches(e, inp.step_type, inp.handler_slug) for e in ordered_steps(flow.flow_config)):
                    continue
                reason = await _admin_or_reason(ctx, flow, owners)
                if reason is None:
                    flows.append(flow)
                elif reason != "agent_access_denied":  # flows without admin are never considered
                    skipped.append({"flow_id": flow.flow_id, "reason": reason})
        change = BulkChange(
            inp.target_handler_slug,
            inp.field_map,
            inp.handler_config,
            inp.handler_configs,
            inp.flow_step_settings,
            inp.user_message,
        )
        overrides = {o.flow_id: o for o in inp.flow_configs or []}
        plan = plan_bulk(
            flows,
            step_type=inp.step_type,
            handler_slug=inp.handler_slug,
            change=change,
            overrides=overrides,
            box=box,
            files_roots=roots,
        )
        if inp.field_map and inp.target_handler_slug is None:
            plan.warnings.append("field_map is used only with target_handler_slug; it was ignored.")
        unused_warnings(
            plan,
            {
                "target_handler_slug": inp.target_handler_slug,
                "handler_config": inp.handler_config,
                "handler_configs": inp.handler_configs,
                "flow_step_settings": inp.flow_step_settings,
                "user_message": inp.user_message,
            },
        )
    if inp.validate_only:
        return ConfigurePreviewOut.model_validate(
            {"valid": not plan.errors, "mode": "validate_only", "would_update": plan.rows(), "errors": plan.errors}
        )
    if plan.errors:
        raise _fail_plan(plan)
    changed_flows: dict[int, Flow] = {}
    for flow, entry, _ in plan.updates:
        replace_step(flow, entry)
        changed_flows[flow.flow_id] = flow
    rows = plan.rows()
    if rows:
        single_agent = {f.agent_id for f in changed_flows.values()}
        await ctx.audit(
            f"{len(rows)} step(s) configured across {len(changed_flows)} flow(s) ({scope} scope)",
            target=("pipeline", pipeline_id) if pipeline_id is not None else ("flows", scope),
            changes=sorted({c for r in rows for c in r["changes"]}),
            agent_id=single_agent.pop() if len(single_agent) == 1 else None,
            pipeline_id=pipeline_id,
            flow_ids=sorted(changed_flows),
        )
        for flow in changed_flows.values():
            notify_flow(ctx, flow)
    message = f"Updated {len(rows)} step(s) across {len(changed_flows)} flow(s)."
    if not rows:
        message = "No matching step needed a change; nothing was saved."
    if skipped:
        message += f" {len(skipped)} flow(s) skipped."
    return ConfigureFlowStepsOut.model_validate(
        {
            "mode": scope,
            "pipeline_id": pipeline_id,
            "flows_updated": len(changed_flows),
            "steps_modified": len(rows),
            "updated_steps": rows,
            "skipped": skipped,
            "warnings": plan.warnings,
            "message": message,
        }
    )


# --- validate-flow-steps-config ---------------------------------------------------------------


class ValidateFlowConfigIn(Input):
    flow_id: int = Field(ge=1, description="Flow of the pipeline")
    handler_config: dict[str, Any] | None = Field(None, description="Config to validate for this flow")


class ValidateFlowStepsConfigIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline to validate against")
    step_type: str | None = Field(None, max_length=50, description="Filter by step type")
    handler_slug: str | None = Field(None, max_length=100, description="Filter by current handler")
    target_handler_slug: str | None = Field(None, max_length=100, description="Handler to switch to")
    handler_config: dict[str, Any] | None = Field(None, description="Config to validate")
    flow_configs: list[ValidateFlowConfigIn] | None = Field(
        None, max_length=500, description="Per-flow configs to validate: [{flow_id, handler_config}]"
    )


class ValidationIssue(Output):
    flow_id: int | None = Opt("Flow")
    flow_step_id: str | None = Opt("Step")
    field: str | None = Opt("Config field")
    message: str = Field(description="What is wrong")


class ValidateFlowStepsConfigOut(Output):
    valid: bool = Field(description="True when the change would apply without errors")
    flow_count: int = Field(description="Flows of the pipeline")
    matching_steps: int = Field(description="Steps passing the filters")
    would_update: list[StepChange] = Field(description="Steps that would change")
    validation_errors: list[ValidationIssue] = Field(description="Problems found")
    warnings: list[str] = Field(description="Notes (e.g. flows you could not change)")


def _explain(row: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"flow_id": row["flow_id"], "flow_step_id": row["flow_step_id"]}
    if row.get("field_errors"):
        return [{**base, "field": e["field"], "message": e["message"]} for e in row["field_errors"]]
    if row.get("unknown_fields"):
        return [
            {**base, "field": f, "message": f"Unknown field '{f}' for handler '{row.get('handler_slug')}'."}
            for f in row["unknown_fields"]
        ]
    if row.get("missing_fields"):
        return [
            {**base, "field": f, "message": f"Required field '{f}' of handler '{row.get('handler_slug')}' is missing."}
            for f in row["missing_fields"]
        ]
    return [{**base, "message": f"{row['code']}: {row['message']}"}]


@ability(
    "validate-flow-steps-config",
    toolset="flows",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=(
        "Preview a configure-flow-steps change on a pipeline: which steps would change and any validation errors. "
        "Writes nothing."
    ),
)
async def validate_flow_steps_config(ctx: AbilityContext, inp: ValidateFlowStepsConfigIn) -> ValidateFlowStepsConfigOut:
    pipeline = await load_pipeline(ctx, inp.pipeline_id, "viewer", mutating=False)
    flows = await flows_of(ctx, pipeline.pipeline_id)
    errors: list[dict[str, Any]] = []
    warnings: list[str] = []
    if not flows:
        errors.append({"message": "Pipeline has no flows yet"})
    target = inp.target_handler_slug
    if target is not None and target not in HANDLERS:
        errors.append({"field": "target_handler_slug", "message": f"Target handler '{target}' not found"})
        target = None
    ids = {f.flow_id for f in flows}
    overrides: dict[int, FlowConfigIn] = {}
    for item in inp.flow_configs or []:
        if item.flow_id not in ids:
            errors.append(
                {
                    "flow_id": item.flow_id,
                    "message": f"Flow {item.flow_id} is not a flow of pipeline {pipeline.pipeline_id}.",
                }
            )
        else:
            overrides[item.flow_id] = FlowConfigIn(flow_id=item.flow_id, handler_config=item.handler_config)
    snap = await ctx.settings()
    change = BulkChange(target_handler_slug=target, handler_config=inp.handler_config)
    plan = plan_bulk(
        flows,
        step_type=inp.step_type,
        handler_slug=inp.handler_slug,
        change=change,
        overrides=overrides,
        box=ctx.runtime.box,
        files_roots=snap.files_roots(),
    )
    for row in plan.errors:
        errors += _explain(row)
    warnings += plan.warnings
    if inp.handler_config is None and target is None and not overrides:
        warnings.append(
            "No change given (handler_config, target_handler_slug or flow_configs): only matching is shown."
        )
    owners: dict[Any, Owner] = {}
    denied = [
        f.flow_id for f in {f.flow_id: f for f, _, _ in plan.updates}.values() if await _admin_or_reason(ctx, f, owners)
    ]
    if denied:
        warnings.append(
            f"configure-flow-steps would skip flow(s) {', '.join(map(str, denied))}: you cannot change them."
        )
    return ValidateFlowStepsConfigOut.model_validate(
        {
            "valid": not errors,
            "flow_count": len(flows),
            "matching_steps": plan.matching,
            "would_update": plan.rows(),
            "validation_errors": errors,
            "warnings": warnings,
        }
    )
