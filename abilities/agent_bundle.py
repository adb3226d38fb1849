"""export-agent and import-agent: an agent with its pipelines and flows as a portable bundle (abilities.md §4).

Bundle v1: ``{format, version, exported_at, agent, pipelines, flows}``. Refs are the source ids as
strings (pipelines: pipeline_id, steps: pipeline_step_id). Secrets never leave the server: they are
dropped and their paths listed in ``redacted_fields``. Import validates the whole bundle before it
writes anything, then creates the agent, its pipelines (fresh ids) and flows in the call's one
transaction; schedules start paused unless ``activate_schedules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from abilities.agent_common import AgentSelector, agent_uri, load_agent
from abilities.agents import enforce_agent_limit, insert_agent, refuse_agent_bound, slug_free, slug_or_error
from abilities.context import AbilityContext
from abilities.errors import AbilityError
from abilities.flow_ops import create_flow_record, normalize_schedule, seeded_warnings
from abilities.pipeline_common import (
    build_pipeline_step,
    new_pipeline_step_id,
    notify_flow,
    notify_pipeline,
    ordered_steps,
    seed_flow_step,
)
from abilities.registry import ability
from abilities.schema import Input, Output
from engine.catalog import HANDLERS, STEP_TYPES
from engine.configs import ConfigError, handler_for, seal_secrets, validate_handler_config, validate_step_settings
from engine.schedule import client_keys
from storage.crypto import MASK, is_envelope
from storage.models import Agent, Flow, Pipeline
from storage.timeutil import iso, utcnow

FORMAT = "datamachine-mcp.agent-bundle"
VERSION = 1
QUEUE_MODES = ("static", "drain", "loop")


# --- export -------------------------------------------------------------------------------------


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
    include_flows: bool = Field(True, description="Include flows (step configs and schedules)")
    include_queues: bool = Field(True, description="Include prompt queues of ai flow steps")


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
    description=(
        "Export an agent with its pipelines, flows and prompt queues as a portable JSON bundle (secrets removed). "
        "Use import-agent to recreate it."
    ),
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


# --- import: validation and plan (nothing is written) -------------------------------------------


@dataclass
class PipelinePlan:
    ref: str
    name: str
    steps: list[tuple[str, dict[str, Any]]]  # (bundle step ref, validated step without its final id)


@dataclass
class FlowPlan:
    pipeline_ref: str
    name: str
    schedule: dict[str, Any]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # step ref -> flow step keys to set


class BundleErrors:
    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append({"path": path, "message": message})

    @classmethod
    def raise_one(cls, path: str, message: str) -> None:
        errs = cls()
        errs.add(path, message)
        errs.raise_if_any()

    def raise_if_any(self) -> None:
        if self.errors:
            first = self.errors[0]
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise AbilityError(
                "invalid_bundle",
                f"The bundle is not a valid {FORMAT} v{VERSION}: {first['path']}: {first['message']}{more}.",
                errors=self.errors,
            )


def _obj(value: Any, path: str, errs: BundleErrors) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    errs.add(path, "must be an object")
    return {}


def _list(value: Any, path: str, errs: BundleErrors) -> list[Any]:
    if isinstance(value, list):
        return value
    errs.add(path, "must be an array")
    return []


def _name(value: Any, path: str, errs: BundleErrors, *, limit: int, default: str | None = None) -> str:
    text = value.strip() if isinstance(value, str) else None
    if text is None and value is not None:
        errs.add(path, "must be a string")
    elif text and len(text) > limit:
        errs.add(path, f"must be at most {limit} characters")
    elif not text and default is None:
        errs.add(path, "is required")
    return text or default or ""


def _config_error(err: ConfigError | AbilityError, path: str) -> AbilityError:
    return AbilityError(err.code, f"{path}: {err.message}", path=path, **err.data)


def _check_structure(bundle: dict[str, Any], errs: BundleErrors) -> dict[str, dict[str, str]]:
    """Format, keys, types and refs. Returns ``{pipeline ref: {step ref: step_type}}``."""
    if bundle.get("format") != FORMAT:
        errs.add("format", f"must be '{FORMAT}'")
    if bundle.get("version") != VERSION:
        errs.add("version", f"must be {VERSION} (got {bundle.get('version')!r})")
    agent = _obj(bundle.get("agent"), "agent", errs)
    if "agent_config" in agent:
        _obj(agent["agent_config"], "agent.agent_config", errs)
    _name(agent.get("agent_name"), "agent.agent_name", errs, limit=200, default="")
    refs: dict[str, dict[str, str]] = {}
    for i, raw in enumerate(_list(bundle.get("pipelines"), "pipelines", errs)):
        p = _obj(raw, f"pipelines[{i}]", errs)
        ref = p.get("ref")
        if not isinstance(ref, str) or not ref:
            errs.add(f"pipelines[{i}].ref", "must be a non-empty string")
        elif ref in refs:
            errs.add(f"pipelines[{i}].ref", f"duplicates ref '{ref}'")
        _name(p.get("pipeline_name"), f"pipelines[{i}].pipeline_name", errs, limit=255)
        steps: dict[str, str] = {}
        for j, raw_step in enumerate(_list(p.get("steps", []), f"pipelines[{i}].steps", errs)):
            path = f"pipelines[{i}].steps[{j}]"
            step = _obj(raw_step, path, errs)
            sref, stype = step.get("ref"), step.get("step_type")
            if not isinstance(sref, str) or not sref or sref in steps:
                errs.add(f"{path}.ref", "must be a non-empty string, unique within the pipeline")
            if stype not in STEP_TYPES:
                errs.add(f"{path}.step_type", f"unknown step type {stype!r} (known: {', '.join(STEP_TYPES)})")
            if isinstance(sref, str):
                steps[sref] = str(stype)
        if isinstance(ref, str):
            refs[ref] = steps
    for i, raw in enumerate(_list(bundle.get("flows", []), "flows", errs)):
        f = _obj(raw, f"flows[{i}]", errs)
        pref = f.get("pipeline_ref")
        if pref not in refs:
            errs.add(f"flows[{i}].pipeline_ref", f"names no pipeline of the bundle ({pref!r})")
        _name(f.get("flow_name"), f"flows[{i}].flow_name", errs, limit=255, default="Flow")
        seen: set[str] = set()
        for j, raw_step in enumerate(_list(f.get("steps", []), f"flows[{i}].steps", errs)):
            step = _obj(raw_step, f"flows[{i}].steps[{j}]", errs)
            sref = step.get("step_ref")
            if pref in refs and sref not in refs[pref]:
                errs.add(f"flows[{i}].steps[{j}].step_ref", f"names no step of pipeline '{pref}' ({sref!r})")
            elif sref in seen:
                errs.add(f"flows[{i}].steps[{j}].step_ref", f"step '{sref}' is configured twice")
            seen.add(str(sref))
    return refs


def _plan_flow_step(step: dict[str, Any], step_type: str, path: str, roots: Any, box: Any) -> dict[str, Any]:
    """The flow step keys to set, validated (required fields are not enforced: secrets were stripped)."""
    spec = STEP_TYPES[step_type]
    errs = BundleErrors()
    known = {"step_ref", "handler_slugs", "handler_configs", "flow_step_settings", "queue_mode", "prompt_queue"}
    for key in sorted(set(step) - known):
        errs.add(f"{path}.{key}", "unknown key")
    out: dict[str, Any] = {}
    if spec.uses_handler:
        if "flow_step_settings" in step:
            errs.add(f"{path}.flow_step_settings", f"a {step_type} step uses handlers, not flow_step_settings")
        slugs = _list(step.get("handler_slugs", []), f"{path}.handler_slugs", errs)
        configs = _obj(step.get("handler_configs", {}), f"{path}.handler_configs", errs)
        if any(not isinstance(s, str) for s in slugs) or len(set(map(str, slugs))) != len(slugs):
            errs.add(f"{path}.handler_slugs", "must be distinct handler slugs")
        errs.raise_if_any()
        if step_type == "fetch" and len(slugs) > 1:
            raise AbilityError("invalid_handler", f"{path}: a fetch step holds exactly one handler.", path=path)
        sealed = {}
        for slug in slugs:
            cpath = f"{path}.handler_configs.{slug}"
            try:
                handler = handler_for(step_type, slug)
                config = configs.get(slug, {})
                if not isinstance(config, dict):
                    raise AbilityError("invalid_handler_config", f"{cpath} must be an object.", handler_slug=slug)
                validate_handler_config(handler, step_type, config, check_required=False, files_roots=roots)
            except (ConfigError, AbilityError) as err:
                raise _config_error(err, cpath) from None
            sealed[slug] = seal_secrets(handler, config, box)
        for slug in configs:
            if slug not in slugs:
                raise AbilityError(
                    "invalid_handler",
                    f"{path}.handler_configs names '{slug}', which is not in handler_slugs.",
                    path=path,
                )
        if "handler_slugs" in step or "handler_configs" in step:
            out["handler_slugs"], out["handler_configs"] = list(slugs), sealed
    else:
        for key in ("handler_slugs", "handler_configs"):
            if step.get(key):
                errs.add(f"{path}.{key}", f"a {step_type} step uses no handlers")
        settings = _obj(step.get("flow_step_settings", {}), f"{path}.flow_step_settings", errs)
        errs.raise_if_any()
        try:
            validate_step_settings(step_type, settings, check_required=False)
        except ConfigError as err:
            raise _config_error(err, f"{path}.flow_step_settings") from None
        if "flow_step_settings" in step:
            out["flow_step_settings"] = dict(settings)
    if "queue_mode" in step:
        if spec.queue_slot is None or step["queue_mode"] not in QUEUE_MODES:
            errs.add(f"{path}.queue_mode", f"must be one of {', '.join(QUEUE_MODES)} on an ai or fetch step")
        out["queue_mode"] = step["queue_mode"]
    if "prompt_queue" in step:
        queue = _list(step["prompt_queue"], f"{path}.prompt_queue", errs)
        if step_type != "ai":
            errs.add(f"{path}.prompt_queue", "only ai steps have a prompt queue")
        now = iso(utcnow())
        out["prompt_queue"] = []
        for k, q in enumerate(queue):
            if not isinstance(q, dict) or not isinstance(q.get("prompt"), str) or not q["prompt"].strip():
                errs.add(f"{path}.prompt_queue[{k}]", "must be {prompt, added_at?} with a non-empty prompt")
                continue
            added = q.get("added_at") if isinstance(q.get("added_at"), str) else now
            out["prompt_queue"].append({"prompt": q["prompt"], "added_at": added})
    errs.raise_if_any()
    return out


def _import_schedule(raw: dict[str, Any], *, activate: bool, now: datetime) -> tuple[dict[str, Any], bool]:
    """The imported schedule and whether it is paused: paused unless activating; a past one_time becomes manual."""
    client = dict(raw)
    if client["interval"] == "one_time" and client["timestamp"] <= now.timestamp():
        return {"interval": "manual"}, False
    if client["interval"] != "manual" and not activate:
        client["enabled"] = False
    return client, client["interval"] != "manual" and client.get("enabled") is False


_HANDLER_CODES = ("handler_not_found", "invalid_handler", "invalid_handler_config")


async def _plan(ctx: AbilityContext, bundle: dict[str, Any]) -> tuple[list[PipelinePlan], list[FlowPlan]]:
    """Validate everything; raise ``invalid_bundle`` (all structural problems) or the first config error."""
    errs = BundleErrors()
    refs = _check_structure(bundle, errs)
    schedules = []
    for i, f in enumerate(bundle.get("flows") or []):
        raw = f.get("scheduling_config", {"interval": "manual"}) if isinstance(f, dict) else {}
        try:
            schedules.append(normalize_schedule(client_keys(_obj(raw, f"flows[{i}].scheduling_config", errs))))
        except AbilityError as err:
            errs.add(f"flows[{i}].scheduling_config", err.message)
    errs.raise_if_any()
    roots, box = (await ctx.settings()).files_roots(), ctx.runtime.box
    pipelines = []
    for i, p in enumerate(bundle["pipelines"]):
        steps = []
        for j, raw in enumerate(p.get("steps", [])):
            path = f"pipelines[{i}].steps[{j}]"
            seed = {k: v for k, v in raw.items() if k != "ref"}
            try:
                steps.append((raw["ref"], build_pipeline_step(0, seed, j, box=box, files_roots=roots)))
            except AbilityError as err:
                if err.code in _HANDLER_CODES:
                    raise _config_error(err, path) from None
                errs.add(path, err.message)
        pipelines.append(PipelinePlan(ref=p["ref"], name=p["pipeline_name"].strip(), steps=steps))
    errs.raise_if_any()
    flows = []
    for i, f in enumerate(bundle.get("flows") or []):
        name = _name(f.get("flow_name"), f"flows[{i}].flow_name", errs, limit=255, default="Flow")
        plan = FlowPlan(f["pipeline_ref"], name, schedules[i])
        types = refs[plan.pipeline_ref]
        for j, step in enumerate(f.get("steps", [])):
            sref = step["step_ref"]
            plan.steps[sref] = _plan_flow_step(step, types[sref], f"flows[{i}].steps[{j}]", roots, box)
        flows.append(plan)
    return pipelines, flows


def _dry_run_warnings(pipelines: list[PipelinePlan], flows: list[FlowPlan]) -> list[str]:
    """Missing required handler fields the imported flows would have (labelled by bundle position)."""
    steps_of = {p.ref: p.steps for p in pipelines}
    warnings = []
    for i, plan in enumerate(flows):
        for sref, step in steps_of[plan.pipeline_ref]:
            entry = {**seed_flow_step(step, flow_id=1, pipeline_id=0), **plan.steps.get(sref, {})}
            entry["flow_step_id"] = f"flows[{i}] step {sref}"
            warnings.extend(seeded_warnings(entry))
    return warnings


# --- import-agent -------------------------------------------------------------------------------


class ImportAgentIn(Input):
    bundle: dict[str, Any] = Field(
        description="Bundle from export-agent (format datamachine-mcp.agent-bundle, version 1)"
    )
    agent_slug: str | None = Field(None, max_length=400, description="Override the new agent's slug (sanitised)")
    agent_name: str | None = Field(None, max_length=200, description="Override the display name")
    owner_id: int | None = Field(None, ge=1, description="Owner (honoured for global admins only; default: you)")
    on_conflict: Literal["error", "skip"] = Field(
        "error", description="If the slug exists: error (agent_slug_conflict) or skip (write nothing)"
    )
    activate_schedules: bool = Field(False, description="Keep imported schedules enabled (default: paused)")
    dry_run: bool = Field(False, description="Validate and summarise only; write nothing")


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
    description=(
        "Create an agent with its pipelines and flows from a bundle produced by export-agent. "
        "Supports dry_run and slug override; imported schedules start paused."
    ),
)
async def import_agent(ctx: AbilityContext, inp: ImportAgentIn) -> ImportAgentOut:
    p = ctx.principal
    refuse_agent_bound(ctx)
    pipelines, flows = await _plan(ctx, inp.bundle)
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
        return _result(None, slug, dry_run=True, imported=counts, warnings=_dry_run_warnings(pipelines, flows))
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
    flow_ids, paused_ids, warnings = [], [], []
    for plan in flows:
        pipeline, refmap = created[plan.pipeline_ref]
        schedule, paused = _import_schedule(plan.schedule, activate=inp.activate_schedules, now=now)
        flow, _, _ = await create_flow_record(
            ctx, pipeline, flow_name=plan.name, agent_id=agent.agent_id, user_id=p.user_id, schedule=schedule
        )
        config = dict(flow.flow_config)
        for sref, values in plan.steps.items():
            fsid = f"{refmap[sref]}_{flow.flow_id}"
            config[fsid] = {**config[fsid], **values}
        flow.flow_config = config
        warnings.extend(w for entry in ordered_steps(config) for w in seeded_warnings(entry))
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
