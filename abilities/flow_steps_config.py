"""Flows toolset: bulk flow-step configuration.

configure-flow-steps (pipeline, global or updates scope); its preview, validate-flow-steps-config, is in
``abilities.flow_steps_validate``. The planning both share is in ``abilities.flow_bulk_edit``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_bulk_edit import (
    BulkChange,
    FlowConfigIn,
    Plan,
    admin_or_reason,
    fields_edit,
    matches,
    plan_bulk,
    try_edit,
    unused_warnings,
)
from datamachine_mcp.abilities.flow_ops import StepConfigInput
from datamachine_mcp.abilities.flow_steps import replace_step
from datamachine_mcp.abilities.pipeline_common import flows_of, load_pipeline, ordered_steps, owner_of
from datamachine_mcp.abilities.pipeline_views import notify_flow
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.engine.catalog import HANDLERS
from datamachine_mcp.storage.models import Flow
from datamachine_mcp.storage.timeutil import utcnow

# --- configure-flow-steps ---------------------------------------------------------------------


class FlowUpdateIn(Input):
    flow_id: int = Field(ge=1, description="Flow")
    step_type: str | None = Field(None, max_length=50, description="Step type filter")
    handler_slug: str | None = Field(None, max_length=100, description="Handler to target (switches to it)")
    handler_config: dict[str, Any] | None = Field(None, description="Merged into the handler's config")
    handler_configs: dict[str, dict[str, Any]] | None = Field(None, description="{slug: config}, merged")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Step settings, merged")
    user_message: str | None = Field(None, max_length=20000, description="Prompt of ai steps")


class ConfigureFlowStepsIn(Input):
    pipeline_id: int | None = Field(None, ge=1, description="Pipeline scope")
    all_flows: bool = Field(False, description="With pipeline_id: all its flows")
    global_scope: bool = Field(False, description="With handler_slug: all flows using it")
    updates: list[FlowUpdateIn] | None = Field(None, max_length=200, description="Explicit per-flow changes")
    shared_config: StepConfigInput | None = Field(None, description="Applied before each update")
    step_type: str | None = Field(None, max_length=50, description="Step type filter")
    handler_slug: str | None = Field(None, max_length=100, description="Handler filter")
    target_handler_slug: str | None = Field(None, max_length=100, description="Switch to this handler")
    field_map: dict[str, str] | None = Field(None, description="{old_field: new_field} on a switch")
    handler_config: dict[str, Any] | None = Field(None, description="Merged into the handler's config")
    handler_configs: dict[str, dict[str, Any]] | None = Field(None, description="{slug: config}, merged")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Step settings, merged")
    user_message: str | None = Field(None, max_length=20000, description="ai: the prompt")
    flow_configs: list[FlowConfigIn] | None = Field(None, max_length=500, description="Per-flow overrides")
    validate_only: bool = Field(False, description="Dry run")


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
    description=("Configure matching steps across many flows."),
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
                reason = await admin_or_reason(ctx, flow, owners)
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
                reason = await admin_or_reason(ctx, flow, owners)
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
