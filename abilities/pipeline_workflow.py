"""Workflow steps (``WorkflowStep``): the input models and their semantic validation, shared by
create-pipeline's workflow mode and execute-workflow.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import STEP_FIELD_HINTS, StepEdit, apply_step_edit
from datamachine_mcp.abilities.json_schema import UNPUBLISHED
from datamachine_mcp.abilities.pipeline_common import seed_flow_step
from datamachine_mcp.abilities.pipeline_shapes import seed_of
from datamachine_mcp.abilities.schema import Input
from datamachine_mcp.engine.catalog import AI_FIELDS, HANDLERS, STEP_TYPES
from datamachine_mcp.storage.crypto import mask
from datamachine_mcp.storage.settings_schema import PROVIDERS


class WorkflowStepIn(Input):
    """One step of a workflow: its type, handlers and their configs, AI settings."""

    field_hints: ClassVar[Mapping[str, str]] = STEP_FIELD_HINTS

    step_type: str = Field(
        max_length=50, description="fetch, ai, publish, update, approval, webhook_gate or system_task"
    )
    label: str | None = Field(None, max_length=255, description="Label")
    handler_slugs: list[str] | None = Field(None, max_length=10, description="In run order (fetch: one)")
    handler_configs: dict[str, dict[str, Any]] | None = Field(None, description="{slug: config}")
    flow_step_settings: dict[str, Any] | None = Field(None, description="Step settings")
    user_message: str | None = Field(None, max_length=20000, description="ai: the prompt")
    system_prompt: str | None = Field(None, max_length=50000, description="ai: system prompt")
    provider: str | None = Field(None, max_length=50, description="ai: openai, anthropic or sampling")
    model: str | None = Field(None, max_length=100, description="ai: model")
    temperature: float | None = Field(None, ge=0, le=2, description="ai: temperature")
    max_tokens: int | None = Field(None, ge=1, le=32000, description="ai: reply token cap")
    skip_marker: str | None = Field(None, max_length=50, description="ai: skip-item reply prefix")
    # Refused with invalid_workflow (use handler_slugs / handler_configs); not published.
    handler_slug: Any = Field(None, description="Legacy: use handler_slugs", json_schema_extra=UNPUBLISHED)
    handler_config: Any = Field(None, description="Legacy: use handler_configs", json_schema_extra=UNPUBLISHED)


class WorkflowIn(Input):
    steps: list[WorkflowStepIn] = Field(min_length=1, max_length=50, description="Steps in execution order")


PREVIEW_KEYS = ("handler_slugs", "handler_configs", "flow_step_settings", "queue_mode", "prompt_queue")


def validate_workflow(ctx: AbilityContext, steps: list[WorkflowStepIn], files_roots: Any) -> list[dict[str, Any]]:
    """Semantic checks of workflow steps (invalid_workflow lists every problem); returns the edits per step.

    Each result is ``{seed, edit}``: the pipeline-step seed (type, label, AI fields) and the flow-step
    configuration (handler_slugs, handler_configs, flow_step_settings, user_message).
    """
    problems: list[dict[str, Any]] = []
    config_errors: list[AbilityError] = []
    out: list[dict[str, Any]] = []

    def problem(i: int, message: str, field: str | None = None) -> None:
        entry: dict[str, Any] = {"step": i, "message": message}
        if field is not None:
            entry["field"] = field
        problems.append(entry)

    for i, step in enumerate(steps):
        given = step.model_fields_set
        count_before = len(problems)
        spec = STEP_TYPES.get(step.step_type)
        for legacy in ("handler_slug", "handler_config"):
            if legacy in given:
                problem(
                    i,
                    f"Step {i} uses unsupported legacy field {legacy}; use handler_slugs and handler_configs",
                    legacy,
                )
        if spec is None:
            problem(i, f"Step {i} has unknown step_type '{step.step_type}'", "step_type")
            continue
        slugs = step.handler_slugs or []
        if spec.uses_handler:
            for slug in slugs:
                if slug not in HANDLERS:
                    raise AbilityError(
                        "handler_not_found",
                        f"Handler '{slug}' not found. Registered handlers: {', '.join(HANDLERS)}.",
                        handler_slug=slug,
                        step=i,
                    )
            if step.step_type == "fetch" and len(slugs) != 1:
                problem(i, f"Step {i} (fetch) requires exactly one handler", "handler_slugs")
            elif not slugs:
                problem(i, f"Step {i} requires at least one handler", "handler_slugs")
            if step.flow_step_settings is not None:
                problem(
                    i,
                    f"Step {i} ({step.step_type}) uses handlers; flow_step_settings do not apply",
                    "flow_step_settings",
                )
        else:
            for name in ("handler_slugs", "handler_configs"):
                if getattr(step, name) is not None:
                    problem(i, f"Step {i} ({step.step_type}) uses no handler; remove {name}", name)
        if step.step_type != "ai":
            for name in ("user_message", *AI_FIELDS):
                if getattr(step, name) is not None:
                    problem(i, f"Step {i} ({step.step_type}): {name} applies to ai steps only", name)
        elif step.provider is not None and step.provider not in ("", *PROVIDERS):
            problem(
                i, f"Step {i} has unknown provider '{step.provider}' (use {', '.join(PROVIDERS)} or '')", "provider"
            )
        edit = {
            k: v
            for k, v in (
                ("handler_slugs", step.handler_slugs),
                ("handler_configs", step.handler_configs),
                ("flow_step_settings", step.flow_step_settings),
                ("user_message", step.user_message),
            )
            if v is not None
        }
        probe = seed_flow_step(
            {"pipeline_step_id": f"1_{uuid.uuid4()}", "step_type": step.step_type, "execution_order": i},
            flow_id=1,
            pipeline_id=1,
        )
        if len(problems) == count_before and edit:
            try:
                probe = apply_step_edit(
                    probe, StepEdit.from_input(edit), box=ctx.runtime.box, files_roots=files_roots
                ).entry
            except AbilityError as err:
                if err.code == "handler_not_found":
                    raise AbilityError(err.code, err.message, **err.data, step=i) from None
                field = f"handler_configs.{err.data['handler_slug']}" if "handler_slug" in err.data else None
                if err.code == "invalid_handler_config":  # the flow tools' code, unless the shape is wrong too
                    config_errors.append(AbilityError(err.code, f"Step {i}: {err.message}", **err.data, step=i))
                else:
                    problem(i, f"Step {i}: {err.message}", field)
        seed = {k: v for k, v in seed_of(step).items() if k in ("step_type", "label", *AI_FIELDS)}
        preview = {k: v for k, v in mask(probe).items() if k in PREVIEW_KEYS}
        out.append({"seed": seed, "edit": edit, "preview": preview})
    if problems:
        for config_error in config_errors:
            data = config_error.data
            problem(data["step"], config_error.message, f"handler_configs.{data['handler_slug']}")
        summary = "; ".join(p["message"].rstrip(".") for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AbilityError("invalid_workflow", f"Invalid workflow: {summary}{more}.", errors=problems)
    if config_errors:
        raise config_errors[0]
    return out
