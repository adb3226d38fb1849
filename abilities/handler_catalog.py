"""The step-type and handler registries as tools (get-step-types, get-handlers,
get-handler-config-fields, validate-handler).

All four read ``engine.catalog`` only: no storage, no per-resource role.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.engine.catalog import HANDLERS, STEP_TYPES, FieldSpec, HandlerSpec, StepType


class FieldSpecOut(Output):
    """One config or settings field."""

    type: Literal["string", "integer", "number", "boolean", "object", "array"] = Field(description="JSON type")
    required: bool = Field(description="Must be set before the step can run")
    default: Any = Opt("Value used when the field is absent")
    secret: bool = Field(description="Stored encrypted, read back as ********, dropped by exports")
    description: str = Field(description="What the field does")
    enum: list[Any] | None = Opt("Allowed values")
    min: float | None = Opt("Minimum (numbers)")
    max: float | None = Opt("Maximum (numbers)")


def field_specs(fields: dict[str, FieldSpec]) -> dict[str, dict[str, Any]]:
    return {name: spec.public() for name, spec in fields.items()}


def _blank(value: str | None) -> bool:
    return value is not None and not value.strip()


# --- get-step-types ---------------------------------------------------------------------------


class GetStepTypesIn(Input):
    step_type_slug: str | None = Field(None, max_length=100, description="One step type")


class StepTypeOut(Output):
    label: str = Field(description="Display label")
    description: str = Field(description="What the step does")
    uses_handler: bool = Field(description="True for fetch, publish and update (handler_slugs + handler_configs)")
    multi_handler: bool = Field(description="Accepts more than one handler (publish, update)")
    queue_slot: Literal["prompt_queue", "config_patch_queue"] | None = Field(
        description="The step's queue: prompt_queue (ai), config_patch_queue (fetch) or null"
    )
    settings_fields: dict[str, FieldSpecOut] = Field(
        description="flow_step_settings fields of a handler-free step, by name"
    )


class GetStepTypesOut(Output):
    step_types: dict[str, StepTypeOut] = Field(description="Step types by slug")
    count: int = Field(description="Number of step types returned")


def step_type_dict(spec: StepType) -> dict[str, Any]:
    return {
        "label": spec.label,
        "description": spec.description,
        "uses_handler": spec.uses_handler,
        "multi_handler": spec.multi_handler,
        "queue_slot": spec.queue_slot,
        "settings_fields": field_specs(spec.settings_fields),
    }


@ability(
    "get-step-types",
    toolset="pipelines",
    level="any",
    read_only=True,
    idempotent=True,
    description=("List step types and whether each needs a handler."),
)
async def get_step_types(ctx: AbilityContext, inp: GetStepTypesIn) -> GetStepTypesOut:
    if _blank(inp.step_type_slug):
        raise AbilityError("step_type_slug_invalid", "step_type_slug must be a non-empty string; omit it to list all.")
    slug = inp.step_type_slug.strip() if inp.step_type_slug is not None else None
    selected = {s: t for s, t in STEP_TYPES.items() if slug is None or s == slug}
    return GetStepTypesOut.model_validate(
        {"step_types": {s: step_type_dict(t) for s, t in selected.items()}, "count": len(selected)}
    )


# --- get-handlers -----------------------------------------------------------------------------


class GetHandlersIn(Input):
    handler_slug: str | None = Field(None, max_length=100, description="One handler")
    step_type: str | None = Field(None, max_length=100, description="Step type filter")


class HandlerOut(Output):
    label: str = Field(description="Display label")
    description: str = Field(description="What the handler does")
    step_types: list[str] = Field(description="Step types it serves")
    field_count: int = Field(description="Number of config fields (for step_type when given)")
    supports_test: bool = Field(description="Can be dry-run with test-handler (fetch handlers)")


class GetHandlersOut(Output):
    handlers: dict[str, HandlerOut] = Field(description="Handlers by slug")
    count: int = Field(description="Number of handlers returned")
    step_type: str | None = Field(description="The step_type filter applied, or null")


def handler_dict(handler: HandlerSpec, step_type: str | None) -> dict[str, Any]:
    fields = handler.fields_for(step_type) if step_type is not None else handler.all_fields()
    return {
        "label": handler.label,
        "description": handler.description,
        "step_types": list(handler.step_types),
        "field_count": len(fields),
        "supports_test": handler.supports_test,
    }


@ability(
    "get-handlers",
    core=True,
    toolset="pipelines",
    level="any",
    read_only=True,
    idempotent=True,
    description=("List handlers (rss, http_json, files, webhook, wordpress…), optionally for one step type."),
)
async def get_handlers(ctx: AbilityContext, inp: GetHandlersIn) -> GetHandlersOut:
    if _blank(inp.handler_slug):
        raise AbilityError("handler_slug_invalid", "handler_slug must be a non-empty string; omit it to list all.")
    if inp.handler_slug is not None:
        slug = inp.handler_slug.strip()
        handler = HANDLERS.get(slug)
        handlers = {slug: handler_dict(handler, None)} if handler is not None else {}
        return GetHandlersOut.model_validate({"handlers": handlers, "count": len(handlers), "step_type": None})
    step_type = inp.step_type.strip() if inp.step_type and inp.step_type.strip() else None
    handlers = {
        slug: handler_dict(h, step_type)
        for slug, h in HANDLERS.items()
        if step_type is None or step_type in h.step_types
    }
    return GetHandlersOut.model_validate({"handlers": handlers, "count": len(handlers), "step_type": step_type})


# --- get-handler-config-fields ----------------------------------------------------------------


class GetHandlerFieldsIn(Input):
    handler_slug: str = Field(max_length=100, description="Handler")


class GetHandlerFieldsOut(Output):
    handler_slug: str = Field(description="The handler")
    fields: dict[str, FieldSpecOut] = Field(
        description="Config fields by name, including the common fetch fields (max_items, …) of fetch handlers"
    )


@ability(
    "get-handler-config-fields",
    core=True,
    toolset="pipelines",
    level="any",
    read_only=True,
    idempotent=True,
    description=("Get the config fields a handler accepts: type, required, default, secret, choices."),
)
async def get_handler_config_fields(ctx: AbilityContext, inp: GetHandlerFieldsIn) -> GetHandlerFieldsOut:
    slug = inp.handler_slug.strip()
    if not slug:
        raise AbilityError("handler_slug_required", "handler_slug is required (see get-handlers for the slugs).")
    handler = HANDLERS.get(slug)
    if handler is None:
        raise AbilityError(
            "handler_not_found",
            f"Handler '{slug}' not found. Registered handlers: {', '.join(HANDLERS)}.",
            handler_slug=slug,
        )
    return GetHandlerFieldsOut.model_validate({"handler_slug": slug, "fields": field_specs(handler.all_fields())})


# --- validate-handler -------------------------------------------------------------------------


class ValidateHandlerIn(Input):
    handler_slug: str = Field(description="Handler")
    step_type: str | None = Field(None, description="Step type it must serve")


class ValidateHandlerOut(Output):
    valid: bool = Field(description="The handler exists (and serves step_type when given)")
    error: str | None = Opt("Why it is not valid")


@ability(
    "validate-handler",
    toolset="pipelines",
    level="any",
    read_only=True,
    idempotent=True,
    description=("Check whether a handler exists (for a step type)."),
)
async def validate_handler(ctx: AbilityContext, inp: ValidateHandlerIn) -> ValidateHandlerOut:
    slug = inp.handler_slug.strip()
    if not slug:
        return ValidateHandlerOut(valid=False, error="handler_slug is required")
    handler = HANDLERS.get(slug)
    if handler is None:
        return ValidateHandlerOut(valid=False, error=f"Handler '{slug}' not found")
    step_type = inp.step_type.strip() if inp.step_type is not None else None
    if step_type and step_type not in handler.step_types:
        return ValidateHandlerOut(valid=False, error=f"Handler '{slug}' not found for step type '{step_type}'")
    return ValidateHandlerOut(valid=True)
