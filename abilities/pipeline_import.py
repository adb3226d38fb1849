"""Pipelines toolset: import-pipelines.

Reads the CSV that export-pipelines writes (the format is described in ``abilities.pipeline_export``):
every row is parsed (``abilities.pipeline_csv``) and every pipeline planned with placeholder ids before
anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import create_flow_record, seeded_warnings
from datamachine_mcp.abilities.pipeline_common import build_pipeline_step, make_flow_step_id, seed_flow_step
from datamachine_mcp.abilities.pipeline_csv import MAX_DATA, Group, bad_row, parse_csv
from datamachine_mcp.abilities.pipeline_export import SETTINGS_KEYS
from datamachine_mcp.abilities.pipeline_shapes import new_resource_owner
from datamachine_mcp.abilities.pipeline_views import notify_flow, notify_pipeline
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.engine.catalog import STEP_TYPES
from datamachine_mcp.engine.configs import (
    ConfigError,
    handler_for,
    seal_secrets,
    validate_handler_config,
    validate_step_settings,
)
from datamachine_mcp.storage.crypto import SecretBox
from datamachine_mcp.storage.models import Flow, Pipeline
from datamachine_mcp.storage.timeutil import iso, utcnow

# --- import-pipelines -------------------------------------------------------------------------


class ImportPipelinesIn(Input):
    data: str = Field(max_length=MAX_DATA, description="CSV from export-pipelines")
    format: Literal["csv"] = Field("csv", description="Import format (csv)")
    agent_id: int | None = Field(None, ge=1, description="Owner agent")
    on_conflict: Literal["skip", "create"] = Field("skip", description="On a same-name pipeline")


class SkippedOut(Output):
    pipeline_name: str = Field(description="Name of the pipeline not imported")
    existing_pipeline_id: int = Field(description="The existing pipeline with that name")


class ImportPipelinesOut(Output):
    imported: list[int] = Field(description="Ids of the pipelines created")
    skipped: list[SkippedOut] = Field(description="Pipelines skipped because the name exists (on_conflict=skip)")
    flows_created: int = Field(description="Flows created")
    count: int = Field(description="Pipelines created")
    warnings: list[str] = Field(description="Configs that still need values (e.g. secrets the export removed)")
    message: str = Field(description="Human-readable result")


def _config_error(err: ConfigError, row: int) -> AbilityError:
    return AbilityError(err.code, f"Row {row}: {err.message}", **err.data, row=row)


def apply_settings(
    entry: dict[str, Any],
    settings: dict[str, Any],
    row: int,
    *,
    box: SecretBox,
    files_roots: list[Path] | None,
) -> dict[str, Any]:
    """A flow step with an exported ``settings`` object applied (validated; required fields not enforced)."""
    unknown = sorted(k for k in settings if k not in SETTINGS_KEYS)
    if unknown:
        raise bad_row(row, f"unknown settings key(s): {', '.join(unknown)} (allowed: {', '.join(SETTINGS_KEYS)})")
    out = dict(entry)
    step_type = entry["step_type"]
    spec = STEP_TYPES[step_type]
    try:
        if spec.uses_handler:
            if "flow_step_settings" in settings:
                raise bad_row(row, f"flow_step_settings do not apply to a {step_type} step")
            slugs = settings.get("handler_slugs", out.get("handler_slugs") or [])
            if not isinstance(slugs, list) or not all(isinstance(s, str) for s in slugs):
                raise bad_row(row, "handler_slugs must be a list of handler slugs")
            if len(set(slugs)) != len(slugs):
                raise AbilityError("invalid_handler", f"Row {row}: handler_slugs lists a handler twice.", row=row)
            if step_type == "fetch" and len(slugs) > 1:
                raise AbilityError("invalid_handler", f"Row {row}: a fetch step holds exactly one handler.", row=row)
            given = settings.get("handler_configs", {})
            if not isinstance(given, dict) or not all(isinstance(c, dict) for c in given.values()):
                raise bad_row(row, "handler_configs must be an object of objects keyed by handler slug")
            stray = [s for s in given if s not in slugs]
            if stray:
                raise AbilityError(
                    "invalid_handler",
                    f"Row {row}: handler_configs names {', '.join(stray)}, which is not in handler_slugs.",
                    row=row,
                )
            stored = out.get("handler_configs") or {}
            configs: dict[str, dict[str, Any]] = {}
            for slug in slugs:
                handler = handler_for(step_type, slug)
                config = dict(given.get(slug, stored.get(slug, {})))
                validate_handler_config(handler, step_type, config, check_required=False, files_roots=files_roots)
                configs[slug] = seal_secrets(handler, config, box)
            out["handler_slugs"] = list(slugs)
            out["handler_configs"] = configs
        else:
            if "handler_slugs" in settings or "handler_configs" in settings:
                raise AbilityError(
                    "invalid_handler", f"Row {row}: a {step_type} step uses no handlers.", row=row, step_type=step_type
                )
            if "flow_step_settings" in settings:
                values = settings["flow_step_settings"]
                if not isinstance(values, dict):
                    raise bad_row(row, "flow_step_settings must be an object")
                try:
                    validate_step_settings(step_type, values, check_required=False)
                except ConfigError as err:
                    raise bad_row(row, err.message) from None
                out["flow_step_settings"] = dict(values)
    except ConfigError as err:
        raise _config_error(err, row) from None
    if "queue_mode" in settings:
        if spec.queue_slot is None:
            raise bad_row(row, f"queue_mode applies to ai and fetch steps, not {step_type}")
        if settings["queue_mode"] not in ("static", "drain", "loop"):
            raise bad_row(row, "queue_mode must be static, drain or loop")
        out["queue_mode"] = settings["queue_mode"]
    if "prompt_queue" in settings:
        queue = settings["prompt_queue"]
        if step_type != "ai":
            raise bad_row(row, f"prompt_queue applies to ai steps, not {step_type}")
        if not isinstance(queue, list) or not all(
            isinstance(q, dict) and isinstance(q.get("prompt"), str) for q in queue
        ):
            raise bad_row(row, "prompt_queue must be a list of {prompt, added_at}")
        stamp = iso(utcnow())
        out["prompt_queue"] = [
            {"prompt": q["prompt"], "added_at": q["added_at"] if isinstance(q.get("added_at"), str) else stamp}
            for q in queue
        ]
    return out


@dataclass
class Plan:
    """One pipeline to create: its step seeds (by position) and flows (settings by step index)."""

    group: Group
    seeds: list[tuple[int, dict[str, Any]]]
    flows: list[tuple[str, list[tuple[int, int, dict[str, Any]]]]]


def plan_group(group: Group, *, box: SecretBox, files_roots: list[Path] | None) -> Plan:
    """Validate a group with placeholder ids (nothing written); the plan is replayed with real ids."""
    ordered = [group.steps[p] for p in sorted(group.steps)]
    index = {row.position: i for i, row in enumerate(ordered)}
    seeds: list[tuple[int, dict[str, Any]]] = []
    probe_steps = []
    for i, srow in enumerate(ordered):
        seed = {**srow.config, "step_type": srow.step_type}
        try:
            probe_steps.append(build_pipeline_step(1, seed, i, box=box, files_roots=files_roots))
        except AbilityError as err:
            if err.code in ("handler_not_found", "invalid_handler", "invalid_handler_config"):
                raise AbilityError(err.code, f"Row {srow.row}: {err.message}", **err.data, row=srow.row) from None
            raise bad_row(srow.row, err.message) from None
        seeds.append((srow.row, seed))
    flows = []
    # Source flows in their original id order (first appearance for non-numeric ids), so that an
    # export of the imported pipeline lists them in the same order.
    sources = sorted(
        enumerate(group.flows.values()),
        key=lambda item: (0, int(item[1].key), item[0]) if item[1].key.isdigit() else (1, 0, item[0]),
    )
    for _, source in sources:
        applied: list[tuple[int, int, dict[str, Any]]] = []
        for frow in source.rows:
            if frow.position is None:
                continue
            i = index[frow.position]
            entry = seed_flow_step(probe_steps[i], flow_id=1, pipeline_id=1)
            apply_settings(entry, frow.settings, frow.row, box=box, files_roots=files_roots)
            applied.append((frow.row, i, frow.settings))
        flows.append((source.name, applied))
    return Plan(group=group, seeds=seeds, flows=flows)


@ability(
    "import-pipelines",
    toolset="pipelines",
    level="admin",
    description=("Import pipelines and flows from export-pipelines CSV."),
)
async def import_pipelines(ctx: AbilityContext, inp: ImportPipelinesIn) -> ImportPipelinesOut:
    agent_id, user_id = await new_resource_owner(ctx, inp.agent_id)
    snap = await ctx.settings()
    roots = snap.files_roots()
    box = ctx.runtime.box
    plans = [plan_group(g, box=box, files_roots=roots) for g in parse_csv(inp.data)]

    owner_cond = (
        Pipeline.agent_id == agent_id
        if agent_id is not None
        else (Pipeline.agent_id.is_(None) & (Pipeline.user_id == user_id))
    )
    existing: dict[str, int] = {}
    names = sorted({p.group.name for p in plans})
    if names:
        rows = await ctx.session.execute(
            select(Pipeline.pipeline_name, Pipeline.pipeline_id)
            .where(owner_cond, Pipeline.pipeline_name.in_(names))
            .order_by(Pipeline.pipeline_id)
        )
        for pname, pid in rows.all():
            existing.setdefault(pname, pid)

    imported: list[int] = []
    skipped: list[dict[str, Any]] = []
    created_flows: list[Flow] = []
    warnings: list[str] = []
    now = utcnow()
    for plan in plans:
        name = plan.group.name[:255]
        if inp.on_conflict == "skip" and name in existing:
            skipped.append({"pipeline_name": name, "existing_pipeline_id": existing[name]})
            continue
        pipeline = Pipeline(
            user_id=user_id, agent_id=agent_id, pipeline_name=name, pipeline_config={}, created_at=now, updated_at=now
        )
        ctx.session.add(pipeline)
        await ctx.session.flush()
        pid = pipeline.pipeline_id
        steps = [
            build_pipeline_step(pid, seed, i, box=box, files_roots=roots) for i, (_, seed) in enumerate(plan.seeds)
        ]
        pipeline.pipeline_config = {s["pipeline_step_id"]: s for s in steps}
        flow_specs = plan.flows or [("Default Flow", [])]
        for flow_name, applied in flow_specs:
            flow, _, _ = await create_flow_record(
                ctx,
                pipeline,
                flow_name=flow_name[:255],
                agent_id=agent_id,
                user_id=user_id,
                schedule={"interval": "manual"},
            )
            config = dict(flow.flow_config)
            for row, i, settings in applied:
                fsid = make_flow_step_id(steps[i]["pipeline_step_id"], flow.flow_id)
                config[fsid] = apply_settings(config[fsid], settings, row, box=box, files_roots=roots)
            flow.flow_config = config
            for entry in config.values():
                warnings.extend(f"Pipeline '{name}', flow '{flow.flow_name}': {w}" for w in seeded_warnings(entry))
            created_flows.append(flow)
        imported.append(pid)

    if imported:
        await ctx.audit(
            f"imported {len(imported)} pipeline(s) ({', '.join(map(str, imported))}) with "
            f"{len(created_flows)} flow(s); skipped {len(skipped)}",
            target=("pipeline", imported[0] if len(imported) == 1 else imported),
            changes=["pipelines", "flows"],
            agent_id=agent_id,
            pipeline_id=imported[0] if len(imported) == 1 else None,
        )
        for pid in imported:
            notify_pipeline(ctx, pid, list_changed=True)
        for flow in created_flows:
            notify_flow(ctx, flow)
    message = f"Imported {len(imported)} pipeline(s) with {len(created_flows)} flow(s)"
    message += f"; skipped {len(skipped)} existing." if skipped else "."
    return ImportPipelinesOut.model_validate(
        {
            "imported": imported,
            "skipped": skipped,
            "flows_created": len(created_flows),
            "count": len(imported),
            "warnings": warnings,
            "message": message,
        }
    )
