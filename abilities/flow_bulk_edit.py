"""Planning of bulk flow-step changes (configure-flow-steps, validate-flow-steps-config).

Turns a pipeline/global change or an updates list into per-step ``StepEdit``s, applies them with
``flow_ops.apply_step_edit`` and collects the results, skips, errors and warnings in a ``Plan``.
Nothing here writes: the tools store the plan's results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.abilities.flow_ops import StepEdit, apply_step_edit
from datamachine_mcp.abilities.pipeline_common import ordered_steps, owner_of
from datamachine_mcp.abilities.schema import Input
from datamachine_mcp.engine.catalog import HANDLERS, STEP_TYPES
from datamachine_mcp.storage.crypto import SecretBox, SecretUnavailable, is_envelope
from datamachine_mcp.storage.models import Flow
from datamachine_mcp.storage.timeutil import utcnow


# An item of configure-flow-steps' flow_configs: one flow's override of a pipeline-scope change.
class FlowConfigIn(Input):
    flow_id: int = Field(ge=1, description="Flow")
    handler_config: dict[str, Any] | None = Field(None, description="Merged over handler_config")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Merged over flow_step_settings")
    user_message: str | None = Field(None, max_length=20000, description="Replaces user_message")


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


async def admin_or_reason(ctx: AbilityContext, flow: Flow, owners: dict[Any, Owner]) -> str | None:
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
