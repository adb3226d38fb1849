"""Jobs toolset: execute-workflow, an ad-hoc run from inline steps (docs/engine.md, Other creation paths).

No pipeline or flow row is written: the steps become an ephemeral plan (``ephemeral_step_{i}``) inside the
job's snapshot, with secret handler fields encrypted. Direct jobs never deduplicate.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field

from datamachine_mcp.abilities.access import Owner
from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import StepEdit, apply_step_edit
from datamachine_mcp.abilities.job_common import JobOut
from datamachine_mcp.abilities.jobs import DEFAULT_WAIT, MAX_WAIT, wait_into
from datamachine_mcp.abilities.pipeline_workflow import WorkflowIn, validate_workflow
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.abilities.uris import JOB
from datamachine_mcp.engine import front
from datamachine_mcp.engine.catalog import HANDLERS, STEP_TYPES
from datamachine_mcp.engine.front import check_initial_data
from datamachine_mcp.storage.crypto import MASK
from datamachine_mcp.storage.models import Agent
from datamachine_mcp.storage.timeutil import iso, utcnow

DEFAULT_SOURCE = "direct"
DEFAULT_LABEL = "Direct Workflow"
MAX_SOURCE = 50
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z


class ExecuteWorkflowIn(Input):
    workflow: WorkflowIn = Field(description="Steps to run")
    initial_data: dict[str, Any] = Field(
        default_factory=dict,
        description="Run inputs",
    )
    dry_run: bool = Field(False, description="Publish/update only preview")
    timestamp: int | None = Field(None, ge=1, le=MAX_TIMESTAMP, description="Unix start time")
    operation_key: str | None = Field(None, min_length=1, max_length=191, description="Same key, same job")
    agent_id: int | None = Field(None, ge=1, description="Owner agent")
    wait_seconds: float = Field(DEFAULT_WAIT, ge=0, le=MAX_WAIT, description="Seconds to wait for the result")


class ExecuteWorkflowOut(Output):
    execution_mode: Literal["direct"] = Field(description="Always direct (no pipeline or flow)")
    execution_type: Literal["immediate", "delayed"] = Field(description="delayed when timestamp is in the future")
    job_id: int = Field(description="The job")
    step_count: int = Field(description="Steps in the workflow")
    dry_run: bool = Field(description="Publish/update handlers only preview")
    replayed: bool = Field(description="An existing job was returned for this operation_key")
    status: str = Field(description="Job status at return")
    scheduled_for: str | None = Opt("Start time of a delayed run (ISO 8601 UTC)")
    message: str = Field(description="Human-readable result")
    job: JobOut | None = Opt("The job (with packets), when waited")
    final: bool | None = Opt("The job reached a final status (when waited)")
    timed_out: bool | None = Opt("wait_seconds passed first (when waited)")
    follow_up: str | None = Opt("When the wait ended first: how to follow the job")


def _initial_text(data: dict[str, Any], key: str, default: str, limit: int | None) -> str:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip() or (limit is not None and len(value.strip()) > limit):
        bound = f" of at most {limit} characters" if limit else ""
        raise AbilityError(
            "invalid_initial_data",
            f"initial_data.{key} must be a non-empty string{bound}.",
            keys=[key],
        )
    return value.strip()


def _fingerprint_workflow(workflow: dict[str, Any]) -> dict[str, Any]:
    """The workflow as fingerprinted: secret handler values masked, so no secret is ever hashed into the
    job's readable engine_data (a key repeated with only a secret changed replays the first job)."""
    steps = []
    for step in workflow.get("steps") or []:
        step = dict(step)
        spec = STEP_TYPES.get(str(step.get("step_type")))
        configs = step.get("handler_configs")
        if spec is not None and spec.uses_handler and isinstance(configs, dict):
            masked = {}
            for slug, config in configs.items():
                handler = HANDLERS.get(slug)
                fields = handler.all_fields() if handler else {}
                masked[slug] = {
                    k: (MASK if k in fields and fields[k].secret and v is not None else v)
                    for k, v in (config or {}).items()
                }
            step["handler_configs"] = masked
        steps.append(step)
    return {**workflow, "steps": steps}


@ability(
    "execute-workflow",
    links={"job_id": JOB},
    toolset="jobs",
    level="operator",
    open_world=True,
    transaction="manual",
    description=("Run inline steps as a job, without a saved pipeline or flow."),
)
async def execute_workflow(ctx: AbilityContext, inp: ExecuteWorkflowIn) -> ExecuteWorkflowOut:
    now = utcnow()
    p = ctx.principal
    steps_in = inp.workflow.steps
    async with ctx.transaction() as session:
        # Owner of the job: the agent named, else the session's agent, else the caller's user.
        agent: Agent | None = None
        agent_id = inp.agent_id if inp.agent_id is not None else p.agent_id
        if agent_id is not None:
            agent = await session.get(Agent, agent_id)
            if agent is None:
                raise AbilityError("agent_not_found", f"Agent {agent_id} not found.", agent_id=agent_id)
            await ctx.access.authorize(
                agent_owner(agent), "operator", mutating=True, target={"type": "agent", "id": agent_id}
            )
        else:
            await ctx.access.authorize(Owner(agent_id=None, user_id=p.user_id), "operator", mutating=True)
        check_initial_data(inp.initial_data)
        source = _initial_text(inp.initial_data, "job_source", DEFAULT_SOURCE, MAX_SOURCE)
        label = _initial_text(inp.initial_data, "job_label", DEFAULT_LABEL, None)[:255]
        snap = await ctx.settings()
        files_roots = snap.files_roots()
        checked = validate_workflow(ctx, steps_in, files_roots)  # invalid_workflow, handler_not_found
        steps: list[dict[str, Any]] = []
        for i, entry in enumerate(checked):
            step: dict[str, Any] = dict(entry["seed"])
            if entry["edit"]:
                probe = {"flow_step_id": f"ephemeral_step_{i}", "step_type": step["step_type"], "execution_order": i}
                # Validated above; this builds the stored config with secret fields encrypted.
                built = apply_step_edit(
                    probe, StepEdit.from_input(entry["edit"]), box=ctx.runtime.box, files_roots=files_roots, now=now
                ).entry
                for key in ("handler_slugs", "handler_configs", "flow_step_settings"):
                    if key in built:
                        step[key] = built[key]
                if "user_message" in entry["edit"]:
                    step["user_message"] = entry["edit"]["user_message"]
            steps.append(step)
        run_at = now
        if inp.timestamp is not None:
            start = datetime.fromtimestamp(inp.timestamp, UTC)
            if start > now:
                run_at = start
        idempotency_key = f"client:{p.user_id}:{inp.operation_key}" if inp.operation_key else None
        request = {
            "workflow": _fingerprint_workflow(inp.workflow.model_dump(exclude_unset=True)),
            "initial_data": inp.initial_data,
            "dry_run": inp.dry_run,
            "timestamp": inp.timestamp,
        }
        _, created = await front.run_workflow(
            session,
            steps=steps,
            user_id=p.user_id,
            agent_id=agent.agent_id if agent is not None else None,
            agent_slug=agent.agent_slug if agent is not None else None,
            source=source,
            label=label,
            initial_data=inp.initial_data,
            dry_run=inp.dry_run,
            run_at=run_at,
            idempotency_key=idempotency_key,
            request=request,
            max_attempts=snap.int("retry_max_attempts"),
            now=now,
            origin_session_id=p.session_id,
            threshold=str(snap["log_level"]),
        )
        job = created.job
        if not created.replayed:
            await ctx.audit(
                f"direct workflow job {job.job_id} created ({len(steps)} steps)",
                target=("job", job.job_id),
                agent_id=job.agent_id,
                job_id=job.job_id,
                dry_run=inp.dry_run,
                run_at=iso(job.run_at),
            )
        job_id, status = job.job_id, job.status
        delayed = job.run_at > job.created_at
        scheduled_for = iso(job.run_at) if delayed else None
        dry_run = bool((job.engine_data or {}).get("dry_run_mode"))
    if not created.replayed:
        await front.announce(ctx.runtime.engine, front.Changes(jobs={job_id}), wake=not delayed)
    if created.replayed:
        message = f"Operation key already used: returning job {job_id} ({status})."
    elif delayed:
        message = f"Direct workflow job {job_id} scheduled for {scheduled_for} ({len(steps)} steps)."
    else:
        message = f"Direct workflow job {job_id} created ({len(steps)} steps); a worker starts it shortly."
    out: dict[str, Any] = {
        "execution_mode": "direct",
        "execution_type": "delayed" if delayed else "immediate",
        "job_id": job_id,
        "step_count": len(steps),
        "dry_run": dry_run,
        "replayed": created.replayed,
        "status": status,
        "scheduled_for": scheduled_for,
        "message": message,
    }
    await wait_into(ctx, out, job_id, inp.wait_seconds)
    # After a wait the message reports what the wait saw, not the job's creation (a replay's stands).
    if out.get("final") and not created.replayed:
        out["message"] = f"Direct workflow job {job_id} ({len(steps)} steps) finished: {out['status']}."
    elif out.get("timed_out") and not created.replayed and not delayed:
        out["message"] = f"Direct workflow job {job_id} ({len(steps)} steps) is still {out['status']}."
    return ExecuteWorkflowOut.model_validate(out)
