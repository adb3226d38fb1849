"""Shared pieces of the job tools: loading a job with its role check, and the Job output shape."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.access import ROLE_RANK, Role
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.pipeline_common import owner_of
from datamachine_mcp.abilities.schema import Opt, Output, ts
from datamachine_mcp.engine import status as st
from datamachine_mcp.storage.crypto import MASK, mask
from datamachine_mcp.storage.models import Job


def job_ref(value: str | None) -> int | str | None:
    """A job's pipeline_id/flow_id as the API shows it: int, "direct" or null."""
    if value is None or value == "direct":
        return value
    return int(value)


async def load_job(ctx: AbilityContext, job_id: int, required: Role, *, mutating: bool) -> tuple[Job, str]:
    job = await ctx.session.get(Job, job_id)
    if job is None:
        raise AbilityError("job_not_found", f"Job {job_id} not found.", job_id=job_id)
    role = await ctx.access.authorize(
        await owner_of(ctx, job.agent_id, job.user_id),
        required,
        mutating=mutating,
        target={"type": "job", "id": job_id},
    )
    return job, role


class JobWait(Output):
    kind: str = Field(description="approval or webhook_gate")
    expires_at: str | None = Field(description="When the wait times out (ISO 8601 UTC)")
    action_id: str | None = Opt("Approval action id (resolve-pending-action)")
    resume_url: str | None = Opt("Webhook gate resume URL (masked below operator)")


class JobOut(Output):
    job_id: int = Field(description="Job id")
    pipeline_id: int | str | None = Field(description='Pipeline id, "direct", or null for system jobs')
    flow_id: int | str | None = Field(description='Flow id, "direct", or null for system jobs')
    pipeline_name: str | None = Field(description="Pipeline name at run time")
    flow_name: str | None = Field(description="Flow name at run time")
    source: str = Field(description="pipeline, direct, system or a caller label")
    label: str | None = Field(description="Flow name, item title (batch children) or task label")
    parent_job_id: int | None = Field(description="Batch parent")
    user_id: int = Field(description="User the job runs for")
    agent_id: int | None = Field(description="Agent the job runs for")
    run_trigger: str = Field(description="manual, schedule, webhook, batch, workflow or system")
    status: str = Field(description='Display status, "<base> - <reason>"')
    base_status: str = Field(description="Base status")
    status_reason: str | None = Field(description="Reason part of the status")
    current_step_id: str | None = Field(description="flow_step_id being run, next, or parked at")
    attempts: int = Field(description="Starts of the current step")
    max_attempts: int = Field(description="Maximum starts of one step")
    run_at: str = Field(description="Earliest time a pending job runs (ISO 8601 UTC)")
    handler_slug: str | None = Field(description="First handler of the plan")
    created_at: str = Field(description="ISO 8601 UTC")
    started_at: str | None = Field(description="First claim by a worker")
    completed_at: str | None = Field(description="When the job became final")
    updated_at: str = Field(description="Last change")
    error: dict[str, Any] | None = Field(description="Failure details (trace only for admins of the job's agent)")
    wait: JobWait | None = Field(description="Gate details while waiting")
    child_counts: dict[str, int] | None = Field(description="Children per base status (batch parents)")
    engine_data: dict[str, Any] | None = Opt("Engine data (redacted)")
    packets: list[dict[str, Any]] | None = Opt(
        "Data packets: the result after success, the failed step's input after failure"
    )


def redact(engine_data: dict[str, Any] | None, *, admin: bool) -> dict[str, Any]:
    data = mask(dict(engine_data or {}))
    error = data.get("error")
    if isinstance(error, dict) and not admin:
        data["error"] = {k: v for k, v in error.items() if k != "trace"}
    gate = data.get("webhook_gate")
    if isinstance(gate, dict):
        data["webhook_gate"] = {**gate, "token": MASK}
    return data


async def child_counts(ctx: AbilityContext, job_ids: list[int]) -> dict[int, dict[str, int]]:
    if not job_ids:
        return {}
    rows = await ctx.session.execute(
        select(Job.parent_job_id, Job.status, func.count())
        .where(Job.parent_job_id.in_(job_ids))
        .group_by(Job.parent_job_id, Job.status)
    )
    out: dict[int, dict[str, int]] = {}
    for parent, status, n in rows.all():
        assert parent is not None  # the query selects children of job_ids only
        counts = out.setdefault(parent, {"total": 0})
        counts[status] = n
        counts["total"] += n
    return out


def job_dict(
    job: Job,
    *,
    role: str | None,
    counts: dict[str, int] | None = None,
    include_engine_data: bool = False,
    include_packets: bool = False,
    public_base_url: str | None = None,
    gate_token: str | None = None,
) -> dict[str, Any]:
    data = job.engine_data or {}
    admin = role is not None and ROLE_RANK.get(role, -1) >= ROLE_RANK["admin"]
    operator = role is not None and ROLE_RANK.get(role, -1) >= ROLE_RANK["operator"]
    error = data.get("error")
    if isinstance(error, dict):
        error = {k: v for k, v in error.items() if k != "trace" or admin}
    wait = None
    if job.status == st.WAITING and job.wait_kind:
        wait = {"kind": job.wait_kind, "expires_at": ts(job.wait_expires_at)}
        if job.wait_kind == "approval":
            wait["action_id"] = job.wait_ref
        else:
            url = None
            if public_base_url and gate_token:
                url = f"{public_base_url.rstrip('/')}/webhooks/gates/{gate_token}"
            wait["resume_url"] = url if operator else MASK
    out: dict[str, Any] = {
        "job_id": job.job_id,
        "pipeline_id": job_ref(job.pipeline_id),
        "flow_id": job_ref(job.flow_id),
        "pipeline_name": (data.get("pipeline") or {}).get("name") if job.pipeline_id else None,
        "flow_name": (data.get("flow") or {}).get("name") if job.flow_id else None,
        "source": job.source,
        "label": job.label,
        "parent_job_id": job.parent_job_id,
        "user_id": job.user_id,
        "agent_id": job.agent_id,
        "run_trigger": job.run_trigger,
        "status": st.display(job.status, job.status_reason),
        "base_status": job.status,
        "status_reason": job.status_reason,
        "current_step_id": job.current_step_id,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "run_at": ts(job.run_at),
        "handler_slug": job.handler_slug,
        "created_at": ts(job.created_at),
        "started_at": ts(job.started_at),
        "completed_at": ts(job.completed_at),
        "updated_at": ts(job.updated_at),
        "error": error if isinstance(error, dict) else None,
        "wait": wait,
        "child_counts": (counts or {"total": 0}) if data.get("batch") else None,
    }
    if include_engine_data:
        out["engine_data"] = redact(data, admin=admin)
    if include_packets:
        out["packets"] = mask(list(job.packets or []))
    return out
