"""The system task step: retention, stuck-job recovery, echo."""

from __future__ import annotations

import json
from typing import Any

from datamachine_mcp.engine.catalog import FieldSpec, StepType
from datamachine_mcp.engine.steps import StepResult, StepRun, failure
from datamachine_mcp.storage.timeutil import iso


async def run(run: StepRun) -> StepResult:
    settings = dict(run.step.get("flow_step_settings") or {})
    task = settings.get("task_type")
    params: dict[str, Any] = dict(settings.get("params") or {})
    if task == "echo":
        result: Any = params
    elif task == "recover_stuck_jobs":
        from datamachine_mcp.engine.recovery import recover

        result = await recover(run.services, **params)
    elif task == "retention":
        from datamachine_mcp.engine.retention import run_retention

        result = await run_retention(run.services, dry_run=bool(params.get("dry_run")))
    else:
        return failure("system_task_not_found", f"Unknown system task '{task}'.", retryable=False)
    packet = {
        "type": "system_task_result",
        "timestamp": iso(run.now()),
        "data": {"title": task, "body": json.dumps(result, default=str), "result": result},
        "metadata": {"flow_step_id": run.flow_step_id, "task_type": task},
    }
    return StepResult(status="succeeded", packets=[packet], handlers=[str(task)])


STEP_TYPES = StepType(
    "system_task",
    "System task",
    "Run a maintenance task (retention, recover_stuck_jobs, echo).",
    False,
    settings_fields={
        "task_type": FieldSpec(
            "string", "Task to run", required=True, enum=("retention", "recover_stuck_jobs", "echo")
        ),
        "params": FieldSpec("object", "Task parameters", default={}),
    },
    run=run,
    position=70,
)
