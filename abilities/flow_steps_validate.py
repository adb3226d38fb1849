"""Flows toolset: validate-flow-steps-config, the preview of configure-flow-steps (the planning both share is
in ``abilities.flow_bulk_edit``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.flow_bulk_edit import (
    BulkChange,
    FlowConfigIn,
    admin_or_reason,
    plan_bulk,
)
from datamachine_mcp.abilities.flow_steps_config import StepChange
from datamachine_mcp.abilities.pipeline_common import flows_of, load_pipeline
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.engine.catalog import HANDLERS


class ValidateFlowConfigIn(Input):
    flow_id: int = Field(ge=1, description="Flow of the pipeline")
    handler_config: dict[str, Any] | None = Field(None, description="Config to validate")


class ValidateFlowStepsConfigIn(Input):
    pipeline_id: int = Field(ge=1, description="Pipeline")
    step_type: str | None = Field(None, max_length=50, description="Step type filter")
    handler_slug: str | None = Field(None, max_length=100, description="Handler filter")
    target_handler_slug: str | None = Field(None, max_length=100, description="Handler to switch to")
    handler_config: dict[str, Any] | None = Field(None, description="Config to validate")
    flow_configs: list[ValidateFlowConfigIn] | None = Field(None, max_length=500, description="Per-flow configs")


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
    description=("Preview a configure-flow-steps change."),
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
        f.flow_id for f in {f.flow_id: f for f, _, _ in plan.updates}.values() if await admin_or_reason(ctx, f, owners)
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
