"""Execution plans and the engine snapshot (docs/engine.md, The snapshot; docs/storage.md, engine_data).

A job reads its configuration only from the snapshot written at creation, so editing a flow never
changes runs already created; queues are the exception (read live from the flow row).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from datamachine_mcp.engine.catalog import STEP_TYPES, wait_kinds
from datamachine_mcp.engine.errors import CodedError

SNAPSHOT_KEYS = ("job", "flow", "pipeline", "flow_config", "pipeline_config", "dry_run_mode")
# The engine's own keys; each parking step type adds its wait kind (its state key), see control_keys().
ENGINE_CONTROL_KEYS = (
    "job_status",
    "retry",
    "queue_backups",
    "batch",
    "batch_results",
    "error",
    "publish_progress",
)
OBSERVABILITY_KEYS = ("step_results", "run_metrics")


def control_keys() -> frozenset[str]:
    """Control keys of engine_data: not copied into batch children, not settable by inputs."""
    return _control_keys(wait_kinds())  # wait_kinds() follows step types registered at run time


def reserved_keys() -> frozenset[str]:
    """Keys ``initial_data`` and packets may not set."""
    return _reserved_keys(wait_kinds())


@cache
def _control_keys(kinds: tuple[str, ...]) -> frozenset[str]:
    return frozenset(ENGINE_CONTROL_KEYS + kinds)


@cache
def _reserved_keys(kinds: tuple[str, ...]) -> frozenset[str]:
    return frozenset(SNAPSHOT_KEYS + OBSERVABILITY_KEYS) | _control_keys(kinds)


QUEUE_KEYS = ("prompt_queue", "config_patch_queue")


class PlanError(CodedError):
    """A flow or workflow that cannot become an execution plan, or reserved initial_data keys."""


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(value: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical(value).encode()).hexdigest()


def check_initial_data(data: dict[str, Any]) -> None:
    reserved = sorted(k for k in data if k in reserved_keys())
    if reserved:
        raise PlanError(
            "invalid_initial_data",
            f"initial_data may not set the reserved engine key(s) {', '.join(reserved)}; rename them.",
            keys=reserved,
        )


@dataclass(frozen=True)
class Plan:
    steps: tuple[dict[str, Any], ...]

    @property
    def first(self) -> dict[str, Any]:
        return self.steps[0]

    def index(self, flow_step_id: str) -> int:
        for i, step in enumerate(self.steps):
            if step["flow_step_id"] == flow_step_id:
                return i
        raise KeyError(flow_step_id)

    def get(self, flow_step_id: str) -> dict[str, Any] | None:
        for step in self.steps:
            if step["flow_step_id"] == flow_step_id:
                return step
        return None

    def next_after(self, flow_step_id: str) -> dict[str, Any] | None:
        i = self.index(flow_step_id)
        return self.steps[i + 1] if i + 1 < len(self.steps) else None


def resolve_plan(flow_config: dict[str, Any] | None) -> Plan:
    """Steps sorted by integer execution_order; raises no_first_step / invalid_execution_plan."""
    entries = [e for e in (flow_config or {}).values() if isinstance(e, dict)]
    if not entries:
        raise PlanError("no_first_step", "Flow execution failed - no first step found.")
    seen: dict[int, str] = {}
    for entry in entries:
        fsid = entry.get("flow_step_id") or "?"
        order = entry.get("execution_order")
        if not isinstance(order, int) or isinstance(order, bool):
            raise PlanError("invalid_execution_plan", f"Step {fsid} has no integer execution_order.", flow_step_id=fsid)
        if order in seen:
            raise PlanError(
                "invalid_execution_plan",
                f"Steps {seen[order]} and {fsid} share execution_order {order}.",
                flow_step_id=fsid,
            )
        seen[order] = fsid
        step_type = entry.get("step_type")
        spec = STEP_TYPES.get(step_type) if isinstance(step_type, str) else None
        if spec is None:
            raise PlanError(
                "invalid_execution_plan", f"Step {fsid} has unregistered step_type '{step_type}'.", flow_step_id=fsid
            )
        if spec.uses_handler and not entry.get("handler_slugs"):
            raise PlanError(
                "invalid_execution_plan",
                f"Step {fsid} ({step_type}) has no handler; choose one with update-flow-step.",
                flow_step_id=fsid,
            )
    return Plan(tuple(sorted(entries, key=lambda e: e["execution_order"])))


def plan_of(engine_data: dict[str, Any]) -> Plan:
    return resolve_plan(engine_data.get("flow_config"))


def step_config(engine_data: dict[str, Any], flow_step_id: str) -> dict[str, Any] | None:
    """A step's configuration from the snapshot: its pipeline step merged under its flow step."""
    entry = (engine_data.get("flow_config") or {}).get(flow_step_id)
    if not isinstance(entry, dict):
        return None
    pipeline_step = (engine_data.get("pipeline_config") or {}).get(entry.get("pipeline_step_id", ""), {})
    return {**pipeline_step, **entry}


def first_handler(plan: Plan) -> str | None:
    for step in plan.steps:
        slugs = step.get("handler_slugs")
        if slugs:
            return str(slugs[0])
    return None


def snapshot(
    *,
    job: dict[str, Any],
    flow: dict[str, Any],
    pipeline: dict[str, Any],
    flow_config: dict[str, Any],
    pipeline_config: dict[str, Any],
    dry_run: bool,
    keep_queues: bool = False,
) -> dict[str, Any]:
    """The snapshot keys of engine_data; flow queues are stripped (they are consumed live from the
    flow row) except for direct workflows, whose one static prompt lives only here."""
    stripped = {
        fsid: {k: v for k, v in entry.items() if keep_queues or k not in QUEUE_KEYS}
        if isinstance(entry, dict)
        else entry
        for fsid, entry in flow_config.items()
    }
    return {
        "job": job,
        "flow": flow,
        "pipeline": pipeline,
        "flow_config": stripped,
        "pipeline_config": pipeline_config,
        "dry_run_mode": dry_run,
    }


def direct_configs(steps: list[dict[str, Any]], *, now_iso: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """flow_config and pipeline_config of an ephemeral workflow (ids ``ephemeral_step_{i}``).

    An AI step's ``user_message`` becomes a one-entry static prompt queue kept in the snapshot.
    """
    flow_config: dict[str, Any] = {}
    pipeline_config: dict[str, Any] = {}
    ai_keys = ("provider", "model", "system_prompt", "temperature", "max_tokens", "skip_marker")
    for i, step in enumerate(steps):
        fsid, psid = f"ephemeral_step_{i}", f"ephemeral_pipeline_{i}"
        step_type = step["step_type"]
        spec = STEP_TYPES[step_type]
        pstep: dict[str, Any] = {
            "pipeline_step_id": psid,
            "step_type": step_type,
            "execution_order": i,
            "label": step.get("label") or spec.label,
        }
        pstep.update({k: step[k] for k in ai_keys if step.get(k) is not None})
        entry: dict[str, Any] = {
            "flow_step_id": fsid,
            "pipeline_step_id": psid,
            "step_type": step_type,
            "execution_order": i,
            "pipeline_id": "direct",
            "flow_id": "direct",
        }
        if spec.uses_handler:
            entry["handler_slugs"] = list(step.get("handler_slugs") or [])
            entry["handler_configs"] = dict(step.get("handler_configs") or {})
        else:
            entry["flow_step_settings"] = dict(step.get("flow_step_settings") or {})
        if step_type == "ai":
            entry["queue_mode"] = "static"
            message = (step.get("user_message") or "").strip()
            entry["prompt_queue"] = [{"prompt": message, "added_at": now_iso}] if message else []
        flow_config[fsid] = entry
        pipeline_config[psid] = pstep
    return flow_config, pipeline_config
