"""export-agent: an agent with its pipelines and flows as a portable bundle.

Secrets never leave the server: they are dropped and their paths listed in ``redacted_fields``. The
bundle format is described in ``abilities.agent_bundle``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlalchemy import select

from datamachine_mcp.abilities.agent_bundle import FORMAT, VERSION
from datamachine_mcp.abilities.agent_common import AgentSelector, load_agent
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.pipeline_common import ordered_steps
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Output
from datamachine_mcp.engine.catalog import HANDLERS
from datamachine_mcp.engine.schedule import client_keys
from datamachine_mcp.storage.crypto import MASK, is_envelope
from datamachine_mcp.storage.models import Flow, Pipeline
from datamachine_mcp.storage.timeutil import iso, utcnow


def _secret_names(slug: str | None) -> set[str]:
    handler = HANDLERS.get(slug or "")
    return {n for n, f in handler.all_fields().items() if f.secret} if handler else set()


def _strip(value: Any, path: str, redacted: list[str], secret: set[str] | frozenset[str] = frozenset()) -> Any:
    """``value`` without secret fields and encryption envelopes (at any depth); their paths go to ``redacted``."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in secret or is_envelope(item) or item == MASK:
                redacted.append(f"{path}.{key}")
            else:
                out[key] = _strip(item, f"{path}.{key}", redacted)
        return out
    if isinstance(value, list):
        return [_strip(item, f"{path}[{i}]", redacted) for i, item in enumerate(value)]
    return value


def _export_step(step: dict[str, Any], path: str, redacted: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"ref": step["pipeline_step_id"]}
    for key, value in step.items():
        if key == "pipeline_step_id":
            continue
        if key == "handler_config" and isinstance(value, dict):
            value = _strip(value, f"{path}.handler_config", redacted, _secret_names(step.get("handler_slug")))
        else:
            value = _strip(value, f"{path}.{key}", redacted)
        out[key] = value
    return out


def _export_flow_step(entry: dict[str, Any], path: str, redacted: list[str], queues: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"step_ref": entry["pipeline_step_id"]}
    if "handler_slugs" in entry:
        out["handler_slugs"] = list(entry.get("handler_slugs") or [])
        out["handler_configs"] = {
            slug: _strip(cfg, f"{path}.handler_configs.{slug}", redacted, _secret_names(slug))
            for slug, cfg in (entry.get("handler_configs") or {}).items()
        }
    if "flow_step_settings" in entry:
        out["flow_step_settings"] = _strip(
            entry.get("flow_step_settings") or {}, f"{path}.flow_step_settings", redacted
        )
    if "queue_mode" in entry:
        out["queue_mode"] = entry["queue_mode"]
    if queues and entry.get("step_type") == "ai":
        out["prompt_queue"] = [dict(q) for q in entry.get("prompt_queue") or []]
    return out


class ExportAgentIn(AgentSelector):
    include_flows: bool = Field(True, description="Include flows")
    include_queues: bool = Field(True, description="Include prompt queues")


class BundleCounts(Output):
    pipelines: int = Field(description="Pipelines in the bundle")
    flows: int = Field(description="Flows in the bundle")


class ExportAgentOut(Output):
    agent_id: int = Field(description="Exported agent's id")
    agent_slug: str = Field(description="Exported agent's slug")
    bundle: dict[str, Any] = Field(
        description="Bundle v1 (format datamachine-mcp.agent-bundle); give it to import-agent"
    )
    counts: BundleCounts = Field(description="What the bundle holds")
    redacted_fields: list[str] = Field(description="Bundle paths of secrets that were removed")


@ability(
    "export-agent",
    toolset="agents",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Export an agent with its pipelines and flows as a JSON bundle (no secrets)."),
)
async def export_agent(ctx: AbilityContext, inp: ExportAgentIn) -> ExportAgentOut:
    agent, _ = await load_agent(ctx, inp, "viewer", mutating=False)
    redacted: list[str] = []
    rows = await ctx.session.execute(
        select(Pipeline).where(Pipeline.agent_id == agent.agent_id).order_by(Pipeline.pipeline_id)
    )
    pipelines, steps_of = [], {}
    for i, pipeline in enumerate(rows.scalars()):
        steps = ordered_steps(pipeline.pipeline_config)
        steps_of[pipeline.pipeline_id] = {s["pipeline_step_id"] for s in steps}
        pipelines.append(
            {
                "ref": str(pipeline.pipeline_id),
                "pipeline_name": pipeline.pipeline_name,
                "steps": [_export_step(s, f"pipelines[{i}].steps[{j}]", redacted) for j, s in enumerate(steps)],
            }
        )
    flows: list[dict[str, Any]] = []
    if inp.include_flows and steps_of:
        found = await ctx.session.execute(
            select(Flow)
            .where(Flow.agent_id == agent.agent_id, Flow.pipeline_id.in_(list(steps_of)))
            .order_by(Flow.flow_id)
        )
        for flow in found.scalars():
            i = len(flows)
            entries = [
                e for e in ordered_steps(flow.flow_config) if e.get("pipeline_step_id") in steps_of[flow.pipeline_id]
            ]
            flows.append(
                {
                    "pipeline_ref": str(flow.pipeline_id),
                    "flow_name": flow.flow_name,
                    "scheduling_config": client_keys(flow.scheduling_config) or {"interval": "manual"},
                    "steps": [
                        _export_flow_step(e, f"flows[{i}].steps[{j}]", redacted, inp.include_queues)
                        for j, e in enumerate(entries)
                    ],
                }
            )
    bundle = {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": iso(utcnow()),
        "agent": {
            "agent_slug": agent.agent_slug,
            "agent_name": agent.agent_name,
            "agent_config": _strip(dict(agent.agent_config or {}), "agent.agent_config", redacted),
        },
        "pipelines": pipelines,
        "flows": flows,
    }
    return ExportAgentOut.model_validate(
        {
            "agent_id": agent.agent_id,
            "agent_slug": agent.agent_slug,
            "bundle": bundle,
            "counts": {"pipelines": len(pipelines), "flows": len(flows)},
            "redacted_fields": redacted,
        }
    )
