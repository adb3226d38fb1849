"""import-agent: create an agent with its pipelines and flows from a bundle.

The whole bundle is validated first (``abilities.agent_bundle``), then the agent, its pipelines (fresh
ids) and flows are created in the call's one transaction; schedules start paused unless
``activate_schedules``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from datamachine_mcp.abilities.agent_bundle import BundleErrors, dry_run_warnings, plan_bundle
from datamachine_mcp.abilities.agent_common import agent_uri
from datamachine_mcp.abilities.agent_creation import (
    enforce_agent_limit,
    insert_agent,
    refuse_agent_bound,
    slug_free,
    slug_or_error,
)
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.flow_ops import create_flow_record, seeded_warnings
from datamachine_mcp.abilities.pipeline_common import new_pipeline_step_id, ordered_steps
from datamachine_mcp.abilities.pipeline_views import notify_flow, notify_pipeline
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.storage.models import Agent, Pipeline
from datamachine_mcp.storage.timeutil import utcnow


def _import_schedule(raw: dict[str, Any], *, activate: bool, now: datetime) -> tuple[dict[str, Any], bool]:
    """The imported schedule and whether it is paused: paused unless activating; a past one_time becomes manual."""
    client = dict(raw)
    if client["interval"] == "one_time" and client["timestamp"] <= now.timestamp():
        return {"interval": "manual"}, False
    if client["interval"] != "manual" and not activate:
        client["enabled"] = False
    return client, client["interval"] != "manual" and client.get("enabled") is False


# --- import-agent -------------------------------------------------------------------------------


class ImportAgentIn(Input):
    bundle: dict[str, Any] = Field(description="Bundle from export-agent")
    agent_slug: str | None = Field(None, max_length=400, description="New slug")
    agent_name: str | None = Field(None, max_length=200, description="New display name")
    owner_id: int | None = Field(None, ge=1, description="Owner (global admins)")
    on_conflict: Literal["error", "skip"] = Field("error", description="If the slug exists")
    activate_schedules: bool = Field(False, description="Keep schedules enabled")
    dry_run: bool = Field(False, description="Dry run")


class ImportedOut(Output):
    pipelines: int = Field(description="Pipelines created (dry run: that would be created)")
    flows: int = Field(description="Flows created (dry run: that would be created)")
    pipeline_ids: list[int] = Field(description="Ids of the new pipelines")
    flow_ids: list[int] = Field(description="Ids of the new flows")


class ImportAgentOut(Output):
    agent_id: int | None = Field(description="New agent (existing one when skipped; null on a dry run)")
    agent_slug: str = Field(description="Slug of the agent")
    skipped: bool = Field(description="The slug existed and on_conflict was skip: nothing was written")
    dry_run: bool = Field(description="Nothing was written")
    imported: ImportedOut = Field(description="What was (or would be) created")
    paused_flow_ids: list[int] = Field(description="New flows whose schedule is paused (resume-flow starts them)")
    warnings: list[str] = Field(description="Things to do before running, e.g. secrets to set with update-flow-step")


def _result(agent_id: int | None, slug: str, *, skipped: bool = False, dry_run: bool = False, **rest: Any) -> Any:
    imported = {"pipelines": 0, "flows": 0, "pipeline_ids": [], "flow_ids": [], **rest.pop("imported", {})}
    return ImportAgentOut.model_validate(
        {
            "agent_id": agent_id,
            "agent_slug": slug,
            "skipped": skipped,
            "dry_run": dry_run,
            "imported": imported,
            "paused_flow_ids": rest.get("paused", []),
            "warnings": rest.get("warnings", []),
        }
    )


@ability(
    "import-agent",
    toolset="agents",
    level="admin",
    description=("Create an agent with its pipelines and flows from an export-agent bundle."),
)
async def import_agent(ctx: AbilityContext, inp: ImportAgentIn) -> ImportAgentOut:
    p = ctx.principal
    refuse_agent_bound(ctx)
    pipelines, flows = await plan_bundle(ctx, inp.bundle)
    meta = inp.bundle["agent"]
    raw_slug = inp.agent_slug if inp.agent_slug is not None else meta.get("agent_slug")
    if not isinstance(raw_slug, str):
        BundleErrors.raise_one("agent.agent_slug", "is required (or pass agent_slug)")
    slug = slug_or_error(raw_slug)
    name = (inp.agent_name or "").strip() or (meta.get("agent_name") or "").strip() or slug
    existing = (await ctx.session.execute(select(Agent.agent_id).where(Agent.agent_slug == slug))).scalar()
    if existing is not None and inp.on_conflict == "skip":
        return _result(existing, slug, skipped=True, dry_run=inp.dry_run)
    await enforce_agent_limit(ctx)
    await slug_free(ctx, slug)
    if inp.dry_run:
        counts = {"pipelines": len(pipelines), "flows": len(flows)}
        return _result(None, slug, dry_run=True, imported=counts, warnings=dry_run_warnings(pipelines, flows))
    owner_id = inp.owner_id if (p.is_admin and inp.owner_id is not None) else p.user_id
    agent = await insert_agent(ctx, slug=slug, name=name, owner_id=owner_id, config=meta.get("agent_config") or {})
    now = utcnow()
    created: dict[str, tuple[Pipeline, dict[str, str]]] = {}
    for plan in pipelines:
        pipeline = Pipeline(
            user_id=p.user_id,
            agent_id=agent.agent_id,
            pipeline_name=plan.name,
            pipeline_config={},
            created_at=now,
            updated_at=now,
        )
        ctx.session.add(pipeline)
        await ctx.session.flush()
        config, refmap = {}, {}
        for order, (sref, step) in enumerate(plan.steps):
            psid = new_pipeline_step_id(pipeline.pipeline_id)
            config[psid] = {**step, "pipeline_step_id": psid, "execution_order": order}
            refmap[sref] = psid
        pipeline.pipeline_config = config
        created[plan.ref] = (pipeline, refmap)
    flow_ids: list[int] = []
    paused_ids: list[int] = []
    warnings: list[str] = []
    for flow_plan in flows:
        pipeline, refmap = created[flow_plan.pipeline_ref]
        schedule, paused = _import_schedule(flow_plan.schedule, activate=inp.activate_schedules, now=now)
        flow, _, _ = await create_flow_record(
            ctx, pipeline, flow_name=flow_plan.name, agent_id=agent.agent_id, user_id=p.user_id, schedule=schedule
        )
        flow_config = dict(flow.flow_config)
        for sref, values in flow_plan.steps.items():
            fsid = f"{refmap[sref]}_{flow.flow_id}"
            flow_config[fsid] = {**flow_config[fsid], **values}
        flow.flow_config = flow_config
        warnings.extend(w for entry in ordered_steps(flow_config) for w in seeded_warnings(entry))
        flow_ids.append(flow.flow_id)
        if paused:
            paused_ids.append(flow.flow_id)
        notify_flow(ctx, flow)
    pipeline_ids = [pl.pipeline_id for pl, _ in created.values()]
    await ctx.audit(
        f"agent '{slug}' imported ({len(pipeline_ids)} pipelines, {len(flow_ids)} flows)",
        target=("agent", agent.agent_id),
        agent_id=agent.agent_id,
        pipeline_ids=pipeline_ids[:100],
        flow_ids=flow_ids[:100],
    )
    for pid in pipeline_ids:
        notify_pipeline(ctx, pid, list_changed=True)
    ctx.notify_updated(agent_uri(slug))
    ctx.notify_list_changed()
    counts = {"pipelines": len(pipeline_ids), "flows": len(flow_ids)}
    return _result(
        agent.agent_id,
        slug,
        imported={**counts, "pipeline_ids": pipeline_ids, "flow_ids": flow_ids},
        paused=paused_ids,
        warnings=warnings,
    )
