"""Operations on flows shared by several tools: editing one flow step, creating a flow, setting a schedule.

update-flow-step, configure-flow-steps, create-flow, create-pipeline (workflow mode), duplicate and
import tools all change flow steps through ``apply_step_edit`` so the rules of docs/engine.md,
Handler configuration (handler choice, merging, validation, secrets) hold everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.json_schema import UNPUBLISHED
from datamachine_mcp.abilities.pipeline_common import ordered_steps, sync_flow_config
from datamachine_mcp.abilities.schema import Input
from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.engine.catalog import STEP_TYPES
from datamachine_mcp.engine.configs import (
    ConfigError,
    handler_for,
    merge,
    missing_required,
    seal_secrets,
    validate_handler_config,
    validate_step_settings,
)
from datamachine_mcp.storage.crypto import MASK, SecretBox
from datamachine_mcp.storage.models import Flow, Pipeline
from datamachine_mcp.storage.timeutil import iso, utcnow

QueueMode = Literal["static", "drain", "loop"]


# "handler" is close to four step fields (two of them legacy): point at the one to use.
STEP_FIELD_HINTS = {"handler": "handler_slugs", "handlers": "handler_slugs", "config": "handler_configs"}


class StepConfigInput(Input):
    """Per-step configuration accepted by create-flow, configure-flow-steps and duplicate-flow."""

    field_hints: ClassVar[dict[str, str]] = STEP_FIELD_HINTS

    handler_slugs: list[str] | None = Field(None, max_length=10, description="Handlers, in run order")
    handler_configs: dict[str, dict[str, Any]] | None = Field(None, description="{slug: config}, merged")
    # The older one-handler spelling: still accepted, no longer published (handler_slugs says it).
    handler_slug: str | None = Field(None, description="Legacy single handler", json_schema_extra=UNPUBLISHED)
    handler_config: dict[str, Any] | None = Field(
        None, description="Config of handler_slug", json_schema_extra=UNPUBLISHED
    )
    flow_step_settings: dict[str, Any] | None = Field(None, description="Step settings, merged")
    user_message: str | None = Field(None, max_length=20000, description="ai: the prompt; '' clears")
    queue_mode: QueueMode | None = Field(None, description="Prompt queue mode")


@dataclass
class StepEdit:
    """One change to a flow step, in update-flow-step's terms (applied in this field order)."""

    remove_handler: str | None = None
    handler_slug: str | None = None
    add_handler: str | None = None
    add_handler_config: dict[str, Any] | None = None
    handler_slugs: list[str] | None = None
    handler_config: dict[str, Any] | None = None
    handler_configs: dict[str, dict[str, Any]] | None = None
    flow_step_settings: dict[str, Any] | None = None
    user_message: str | None = None
    queue_mode: str | None = None

    @classmethod
    def from_input(cls, value: StepConfigInput | dict[str, Any]) -> StepEdit:
        data = value.model_dump(exclude_none=True) if isinstance(value, Input) else dict(value)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.__dataclass_fields__)


@dataclass
class EditResult:
    entry: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _fail(code: str, message: str, **data: Any) -> AbilityError:
    return AbilityError(code, message, **data)


def apply_step_edit(
    entry: dict[str, Any],
    edit: StepEdit,
    *,
    box: SecretBox,
    files_roots: list[Path] | None,
    now: datetime | None = None,
) -> EditResult:
    """Return the flow step after ``edit``; raises AbilityError with the handler-configuration codes. Pure (no I/O)."""
    step_type = entry.get("step_type", "")
    spec = STEP_TYPES.get(step_type)
    if spec is None:
        raise _fail("invalid_flow_step_update", f"Step {entry.get('flow_step_id')} has unknown type '{step_type}'.")
    out: dict[str, Any] = {
        k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in entry.items()
    }
    changes: list[str] = []
    touched: set[str] = set()
    fsid = entry.get("flow_step_id")
    try:
        if spec.uses_handler:
            slugs: list[str] = list(out.get("handler_slugs") or [])
            configs: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (out.get("handler_configs") or {}).items()}
            if edit.remove_handler is not None:
                if edit.remove_handler not in slugs:
                    raise _fail(
                        "invalid_handler", f"Handler '{edit.remove_handler}' is not on step {fsid}.", flow_step_id=fsid
                    )
                slugs.remove(edit.remove_handler)
                configs.pop(edit.remove_handler, None)
                changes.append("remove_handler")
            if edit.handler_slugs is not None:
                if step_type == "fetch" and len(edit.handler_slugs) != 1:
                    raise _fail("invalid_handler", "A fetch step holds exactly one handler.", flow_step_id=fsid)
                for slug in edit.handler_slugs:
                    handler_for(step_type, slug)
                if len(set(edit.handler_slugs)) != len(edit.handler_slugs):
                    raise _fail("invalid_handler", "handler_slugs lists a handler twice.", flow_step_id=fsid)
                configs = {s: configs.get(s, {}) for s in edit.handler_slugs}
                slugs = list(edit.handler_slugs)
                touched.update(slugs)
                changes.append("handler_slugs")
            if edit.handler_slug is not None:
                handler_for(step_type, edit.handler_slug)
                if edit.handler_slug not in slugs:
                    slugs, configs = [edit.handler_slug], {edit.handler_slug: {}}
                    changes.append("handler_slug")
                touched.add(edit.handler_slug)
            if edit.add_handler is not None:
                if step_type == "fetch":
                    raise _fail(
                        "invalid_handler", "add_handler is for publish/update steps; a fetch step has one handler."
                    )
                handler_for(step_type, edit.add_handler)
                if edit.add_handler not in slugs:
                    slugs.append(edit.add_handler)
                    configs[edit.add_handler] = merge({}, edit.add_handler_config or {})
                    changes.append("add_handler")
                touched.add(edit.add_handler)
            if edit.handler_config is not None:
                target = edit.handler_slug or (slugs[0] if slugs else None)
                if target is None:
                    raise _fail(
                        "invalid_flow_step_update",
                        f"Step {fsid} has no handler yet: give handler_slug with handler_config.",
                        flow_step_id=fsid,
                    )
                configs[target] = merge(configs.get(target), edit.handler_config)
                touched.add(target)
                changes.append("handler_config")
            if edit.handler_configs is not None:
                for slug, patch in edit.handler_configs.items():
                    if slug not in slugs:
                        raise _fail(
                            "invalid_handler",
                            f"handler_configs names '{slug}', which is not on step {fsid} (handlers: "
                            f"{', '.join(slugs) or 'none'}).",
                            flow_step_id=fsid,
                        )
                    configs[slug] = merge(configs.get(slug), patch)
                    touched.add(slug)
                changes.append("handler_configs")
            for slug in sorted(touched):
                handler = handler_for(step_type, slug)
                # A mask left after merging means "keep" with nothing stored: it is no value (so a required
                # secret given only as the mask is reported missing instead of being dropped after validation).
                secret = {n for n, f in handler.all_fields().items() if f.secret}
                config = {k: v for k, v in configs.get(slug, {}).items() if not (k in secret and v == MASK)}
                validate_handler_config(handler, step_type, config, files_roots=files_roots)
                configs[slug] = seal_secrets(handler, config, box)
            out["handler_slugs"] = slugs
            out["handler_configs"] = configs
            out.pop("flow_step_settings", None)
            if edit.flow_step_settings is not None:
                raise _fail(
                    "invalid_flow_step_update",
                    f"flow_step_settings apply to handler-free steps; step {fsid} is a {step_type} step.",
                    flow_step_id=fsid,
                )
        else:
            if (
                any(
                    v is not None
                    for v in (edit.remove_handler, edit.handler_slug, edit.add_handler, edit.handler_slugs)
                )
                or edit.handler_config is not None
                or edit.handler_configs is not None
            ):
                raise _fail(
                    "invalid_handler",
                    f"Step {fsid} is a {step_type} step, which uses no handlers.",
                    flow_step_id=fsid,
                    step_type=step_type,
                )
            if edit.flow_step_settings is not None:
                settings = merge(out.get("flow_step_settings"), edit.flow_step_settings)
                validate_step_settings(step_type, settings)
                out["flow_step_settings"] = settings
                changes.append("flow_step_settings")
            out.setdefault("flow_step_settings", {})
        if edit.user_message is not None:
            if step_type != "ai":
                raise _fail(
                    "invalid_flow_step_update",
                    f"user_message applies to ai steps; step {fsid} is a {step_type} step.",
                    flow_step_id=fsid,
                )
            message = edit.user_message.strip()
            queue = out.get("prompt_queue") or []
            already = len(queue) == 1 and isinstance(queue[0], dict) and queue[0].get("prompt") == message
            if not already:  # the same one prompt again keeps its entry (idempotent)
                stamp = iso(now or utcnow())
                out["prompt_queue"] = [{"prompt": message, "added_at": stamp}] if message else []
            changes.append("user_message")
        if edit.queue_mode is not None:
            if spec.queue_slot is None:
                raise _fail(
                    "invalid_queue_step",
                    f"queue_mode applies to ai and fetch steps; step {fsid} is a {step_type} step.",
                    flow_step_id=fsid,
                )
            out["queue_mode"] = edit.queue_mode
            changes.append("queue_mode")
    except ConfigError as err:
        raise AbilityError(err.code, err.message, flow_step_id=fsid, **err.data) from None
    return EditResult(entry=out, changes=changes)


def seeded_warnings(entry: dict[str, Any]) -> list[str]:
    """Warnings for copied configs that still miss required fields (stored anyway; a run fails until set)."""
    warnings = []
    step_type = entry.get("step_type", "")
    for slug in entry.get("handler_slugs") or []:
        try:
            handler = handler_for(step_type, slug)
        except ConfigError:
            continue
        missing = missing_required(handler, step_type, (entry.get("handler_configs") or {}).get(slug, {}))
        if missing:
            warnings.append(
                f"Step {entry.get('flow_step_id')}: handler '{slug}' still needs {', '.join(missing)} "
                "(set it with update-flow-step before running)."
            )
    return warnings


def normalize_schedule(raw: dict[str, Any] | None, *, allow_past: bool = False) -> dict[str, Any]:
    """Validate client schedule keys (docs/engine.md, Schedule types). A one-time run in the past is refused unless
    ``allow_past`` (imports, which turn it into manual themselves)."""
    return sched.normalize(raw or {"interval": "manual"}, not_before=None if allow_past else utcnow())


def set_schedule(flow: Flow, client: dict[str, Any], *, now: datetime) -> bool:
    """Apply a validated schedule to ``flow``; returns False when the definition is unchanged."""
    config, next_run, unchanged = sched.apply(flow.scheduling_config, client, flow_id=flow.flow_id, now=now)
    if unchanged:
        return False
    flow.scheduling_config = config
    flow.next_run_at = next_run
    return True


def resolve_step_key(pipeline: Pipeline, key: str) -> list[dict[str, Any]]:
    """The pipeline steps a step_configs key names: a pipeline_step_id, else every step of a step_type."""
    steps = ordered_steps(pipeline.pipeline_config)
    exact = [s for s in steps if s["pipeline_step_id"] == key]
    return exact or [s for s in steps if s["step_type"] == key]


async def create_flow_record(
    ctx: AbilityContext,
    pipeline: Pipeline,
    *,
    flow_name: str,
    agent_id: int | None,
    user_id: int,
    schedule: dict[str, Any],
    step_configs: dict[str, StepConfigInput | dict[str, Any]] | None = None,
) -> tuple[Flow, list[str], list[str]]:
    """Insert a flow with steps synced from ``pipeline``, ``step_configs`` applied and its schedule set.

    Returns (flow, configured flow_step_ids, warnings).
    """
    now = utcnow()
    flow = Flow(
        pipeline_id=pipeline.pipeline_id,
        user_id=user_id,
        agent_id=agent_id,
        flow_name=flow_name,
        flow_config={},
        scheduling_config={"interval": "manual"},
        created_at=now,
        updated_at=now,
    )
    ctx.session.add(flow)
    await ctx.session.flush()
    config = sync_flow_config({}, pipeline.pipeline_config, flow_id=flow.flow_id, pipeline_id=pipeline.pipeline_id)
    configured: list[str] = []
    if step_configs:
        snap = await ctx.settings()
        # A pipeline_step_id key wins over a step_type key for the same step.
        plan: dict[str, tuple[int, StepEdit]] = {}
        for key, value in step_configs.items():
            targets = resolve_step_key(pipeline, key)
            if not targets:
                raise AbilityError(
                    "invalid_step_configs",
                    f"step_configs key '{key}' matches no step of pipeline {pipeline.pipeline_id} "
                    "(use a pipeline_step_id or a step_type the pipeline has).",
                    key=key,
                )
            rank = 0 if any(t["pipeline_step_id"] == key for t in targets) else 1
            for target in targets:
                fsid = f"{target['pipeline_step_id']}_{flow.flow_id}"
                if fsid not in plan or rank < plan[fsid][0]:
                    plan[fsid] = (rank, StepEdit.from_input(value))
        for fsid, (_, edit) in plan.items():
            try:
                result = apply_step_edit(
                    config[fsid], edit, box=ctx.runtime.box, files_roots=snap.files_roots(), now=now
                )
            except AbilityError as err:
                if err.code in ("invalid_flow_step_update", "invalid_queue_step"):
                    raise AbilityError("invalid_step_configs", err.message, key=fsid) from None
                raise
            config[fsid] = result.entry
            configured.append(fsid)
    warnings = [w for entry in config.values() for w in seeded_warnings(entry)]
    flow.flow_config = config
    set_schedule(flow, schedule, now=now)
    return flow, configured, warnings
