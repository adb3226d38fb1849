"""Pipelines toolset, part 3: export-pipelines and its CSV format.

The CSV format (RFC 4180, ``\\n`` line ends) has the header
``pipeline_id,pipeline_name,step_position,step_type,step_config,flow_id,flow_name,settings``. For
each pipeline and each step in order there is one *structure row* (``step_config`` = the
PipelineStep as JSON) followed by one *flow row* per flow whose step has settings (``settings`` =
``{handler_slugs?, handler_configs?, flow_step_settings?, queue_mode?, prompt_queue?}``). Secrets
are never exported.

Two additions keep a round trip lossless where the plain format would drop something: a flow
none of whose steps has settings still gets one flow row (at its first step, ``settings`` ``{}``),
and a pipeline without steps gets one row with empty ``step_position``/``step_type``/``step_config``
(its flows likewise with an empty ``step_position``).

import-pipelines, which reads this format, is in ``abilities.pipeline_import``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field
from sqlalchemy import select

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.pipeline_common import make_flow_step_id, ordered_steps, owner_of, step_label
from datamachine_mcp.abilities.pipeline_copy import strip_secrets
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.storage.models import Flow, Pipeline

HEADER = [
    "pipeline_id",
    "pipeline_name",
    "step_position",
    "step_type",
    "step_config",
    "flow_id",
    "flow_name",
    "settings",
]
SETTINGS_KEYS = ("handler_slugs", "handler_configs", "flow_step_settings", "queue_mode", "prompt_queue")


def _field(value: Any) -> str:
    """One RFC 4180 field: quoted when it holds a comma, a quote, CR or LF (quotes doubled)."""
    text = str(value)
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


class _Writer:
    """A CSV writer with RFC 4180 quoting and ``\n`` line ends (the csv module leaves a lone CR unquoted)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def writerow(self, row: list[Any]) -> None:
        self.lines.append(",".join(_field(v) for v in row) + "\n")

    def getvalue(self) -> str:
        return "".join(self.lines)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# --- export-pipelines -------------------------------------------------------------------------


class ExportPipelinesIn(Input):
    pipeline_ids: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, max_length=500, description="Default: all you can read"
    )
    format: Literal["csv"] = Field("csv", description="Export format (csv)")


class ExportPipelinesOut(Output):
    data: str = Field(description="The CSV document")
    count: int = Field(description="Pipelines exported")
    format: Literal["csv"] = Field(description="csv")
    redacted_fields: list[str] = Field(
        description='Secret fields left out, e.g. "pipeline 3 / flow 7 / step 0: webhook.secret"'
    )


def export_step(step: dict[str, Any], where: str, redacted: list[str]) -> dict[str, Any]:
    """A PipelineStep for step_config: label filled in, secret handler defaults removed."""
    out = dict(step)
    out.setdefault("label", step_label(step.get("step_type", "")))
    if isinstance(out.get("handler_config"), dict):
        slug = out.get("handler_slug") or ""
        out["handler_config"], removed = strip_secrets(slug, out["handler_config"])
        redacted.extend(f"{where}: {slug}.{name}" for name in removed)
    return out


def export_settings(entry: dict[str, Any] | None, where: str, redacted: list[str]) -> dict[str, Any]:
    """The settings of one flow step (empty parts left out; secrets removed)."""
    if not entry:
        return {}
    out: dict[str, Any] = {}
    slugs = entry.get("handler_slugs")
    if isinstance(slugs, list) and slugs:
        out["handler_slugs"] = list(slugs)
        configs: dict[str, Any] = {}
        for slug, config in (entry.get("handler_configs") or {}).items():
            configs[slug], removed = strip_secrets(slug, config if isinstance(config, dict) else {})
            redacted.extend(f"{where}: {slug}.{name}" for name in removed)
        out["handler_configs"] = configs
    if entry.get("flow_step_settings"):
        out["flow_step_settings"] = entry["flow_step_settings"]
    if entry.get("queue_mode") not in (None, "static"):
        out["queue_mode"] = entry["queue_mode"]
    if entry.get("prompt_queue"):
        out["prompt_queue"] = entry["prompt_queue"]
    return out


def render_csv(pipelines: list[Pipeline], flows: dict[int, list[Flow]]) -> tuple[str, list[str]]:
    writer = _Writer()
    writer.writerow(HEADER)
    redacted: list[str] = []
    for pipeline in pipelines:
        pid, name = pipeline.pipeline_id, pipeline.pipeline_name
        steps = ordered_steps(pipeline.pipeline_config)
        own_flows = flows.get(pid, [])
        # settings[flow_id][position]
        settings: dict[int, list[dict[str, Any]]] = {}
        for flow in own_flows:
            config = flow.flow_config or {}
            settings[flow.flow_id] = [
                export_settings(
                    config.get(make_flow_step_id(step["pipeline_step_id"], flow.flow_id)),
                    f"pipeline {pid} / flow {flow.flow_id} / step {pos}",
                    redacted,
                )
                for pos, step in enumerate(steps)
            ]
        if not steps:
            writer.writerow([pid, name, "", "", "", "", "", ""])
            for flow in own_flows:
                writer.writerow([pid, name, "", "", "", flow.flow_id, flow.flow_name, "{}"])
            continue
        for pos, step in enumerate(steps):
            step_config = export_step(step, f"pipeline {pid} / step {pos}", redacted)
            writer.writerow([pid, name, pos, step["step_type"], _json(step_config), "", "", ""])
            for flow in own_flows:
                mine = settings[flow.flow_id]
                if mine[pos] or (pos == 0 and not any(mine)):
                    writer.writerow([pid, name, pos, "", "", flow.flow_id, flow.flow_name, _json(mine[pos])])
    return writer.getvalue(), redacted


@ability(
    "export-pipelines",
    toolset="pipelines",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Export pipelines and flow step settings as CSV (no credentials)."),
)
async def export_pipelines(ctx: AbilityContext, inp: ExportPipelinesIn) -> ExportPipelinesOut:
    s = ctx.session
    if inp.pipeline_ids is not None:
        wanted = sorted(set(inp.pipeline_ids))
        found = list(
            (await s.execute(select(Pipeline).where(Pipeline.pipeline_id.in_(wanted)).order_by(Pipeline.pipeline_id)))
            .scalars()
            .all()
        )
        missing = sorted(set(wanted) - {p.pipeline_id for p in found})
        if missing:
            raise AbilityError(
                "pipeline_not_found",
                f"Pipeline(s) {', '.join(map(str, missing))} not found.",
                pipeline_ids=missing,
            )
        for pipeline in found:
            await ctx.access.authorize(
                await owner_of(ctx, pipeline.agent_id, pipeline.user_id),
                "viewer",
                mutating=False,
                target={"type": "pipeline", "id": pipeline.pipeline_id},
            )
        pipelines = found
    else:
        scope = await ctx.access.scope_filter(Pipeline.agent_id, Pipeline.user_id)
        pipelines = list((await s.execute(select(Pipeline).where(scope).order_by(Pipeline.pipeline_id))).scalars())
    flows: dict[int, list[Flow]] = {}
    ids = [p.pipeline_id for p in pipelines]
    if ids:
        readable = await ctx.access.scope_filter(Flow.agent_id, Flow.user_id)
        rows = await s.execute(select(Flow).where(Flow.pipeline_id.in_(ids), readable).order_by(Flow.flow_id))
        for flow in rows.scalars():
            flows.setdefault(flow.pipeline_id, []).append(flow)
    data, redacted = render_csv(pipelines, flows)
    return ExportPipelinesOut(data=data, count=len(pipelines), format="csv", redacted_fields=redacted)
