"""The agent bundle: its format and the validation of a bundle to import.

Bundle v1: ``{format, version, exported_at, agent, pipelines, flows}``. Refs are the source ids as
strings (pipelines: pipeline_id, steps: pipeline_step_id). Secrets never leave the server: they are
dropped and their paths listed in ``redacted_fields``. Import validates the whole bundle before it
writes anything, then creates the agent, its pipelines (fresh ids) and flows in the call's one
transaction; schedules start paused unless ``activate_schedules``.

export-agent is in ``abilities.agent_export``, import-agent in ``abilities.agent_import``; this module
checks a bundle and plans what import-agent creates, writing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import normalize_schedule, seeded_warnings
from datamachine_mcp.abilities.pipeline_common import build_pipeline_step, seed_flow_step
from datamachine_mcp.engine.catalog import STEP_TYPES
from datamachine_mcp.engine.configs import (
    ConfigError,
    handler_for,
    seal_secrets,
    validate_handler_config,
    validate_step_settings,
)
from datamachine_mcp.engine.schedule import client_keys
from datamachine_mcp.storage.timeutil import iso, utcnow

FORMAT = "datamachine-mcp.agent-bundle"
VERSION = 1
QUEUE_MODES = ("static", "drain", "loop")


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
                f"The bundle is not a valid {FORMAT} v{VERSION}: {first['path']}: {first['message'].rstrip('.')}{more}.",
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
            except AbilityError as err:  # ConfigError included
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


_HANDLER_CODES = ("handler_not_found", "invalid_handler", "invalid_handler_config")


async def plan_bundle(ctx: AbilityContext, bundle: dict[str, Any]) -> tuple[list[PipelinePlan], list[FlowPlan]]:
    """Validate everything; raise ``invalid_bundle`` (all structural problems) or the first config error."""
    errs = BundleErrors()
    refs = _check_structure(bundle, errs)
    schedules = []
    for i, f in enumerate(bundle.get("flows") or []):
        raw = f.get("scheduling_config", {"interval": "manual"}) if isinstance(f, dict) else {}
        try:
            client = client_keys(_obj(raw, f"flows[{i}].scheduling_config", errs))
            schedules.append(normalize_schedule(client, allow_past=True))
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


def dry_run_warnings(pipelines: list[PipelinePlan], flows: list[FlowPlan]) -> list[str]:
    """Missing required handler fields the imported flows would have (labelled by bundle position)."""
    steps_of = {p.ref: p.steps for p in pipelines}
    warnings = []
    for i, plan in enumerate(flows):
        for sref, step in steps_of[plan.pipeline_ref]:
            entry = {**seed_flow_step(step, flow_id=1, pipeline_id=0), **plan.steps.get(sref, {})}
            entry["flow_step_id"] = f"flows[{i}] step {sref}"
            warnings.extend(seeded_warnings(entry))
    return warnings
