"""Jobs toolset, manual controls: fail, cancel and retry a job (abilities.md §7, engine.md §11.5).

Each mutation runs in one transaction with one audit row; after it commits the changed jobs and flows are
announced through the engine (local waiters, ``datamachine://jobs/{id}`` subscribers), and local workers are
woken when something became claimable. Deleting and recovering jobs is in ``abilities.job_maintenance``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.job_common import load_job
from datamachine_mcp.abilities.jobs import publish_changes
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.engine import claims
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.jobs import flow_snapshot
from datamachine_mcp.engine.lifecycle import cancel_descendants, ed, finish
from datamachine_mcp.engine.maintenance import reopen_for_retry
from datamachine_mcp.engine.plan import SNAPSHOT_KEYS, first_handler, resolve_plan
from datamachine_mcp.storage.models import Flow, Job, Pipeline
from datamachine_mcp.storage.timeutil import utcnow

# --- fail-job / cancel-job --------------------------------------------------------------------


class EndJobOut(Output):
    job_id: int = Field(description="Job id")
    previous_status: str = Field(description="Display status before the call")
    new_status: str = Field(description='Display status after the call, e.g. "failed - manual"')
    changed: bool = Field(description="False when the job already had this status (nothing changed)")
    children_cancelled: int = Field(description="Active descendant jobs cancelled with it")
    message: str = Field(description="Human-readable result")


async def end_job(
    ctx: AbilityContext, job_id: int, reason: str, to_status: str, *, cascade_reason: str, verb: str, allowed: str
) -> EndJobOut:
    """fail-job / cancel-job (engine.md §11.5): CAS from an active status, terminal accounting, cascade."""
    now = utcnow()
    reason = reason.strip() or "manual"
    async with ctx.transaction() as session:
        job, _ = await load_job(ctx, job_id, "operator", mutating=True)
        previous = st.display(job.status, job.status_reason)
        if job.status == to_status:
            return EndJobOut(
                job_id=job_id,
                previous_status=previous,
                new_status=previous,
                changed=False,
                children_cancelled=0,
                message=f"Job {job_id} is already {to_status}",
            )
        if job.status in st.FINAL:
            raise AbilityError(
                "invalid_job_status",
                f"Job {job_id} has status '{previous}'; only {allowed} jobs can be {verb}.",
                job_id=job_id,
                status=previous,
            )
        threshold = str((await ctx.settings())["log_level"])
        data = ed(job)
        updates: dict[str, Any] = {}
        if job.status == st.WAITING:
            # A decision can no longer be made on this gate (engine.md §13.2).
            for key in ("approval", "webhook_gate"):
                if isinstance(data.get(key), dict) and data[key].get("status") == "pending":
                    updates[key] = {**data[key], "status": "cancelled"}
        if to_status == st.FAILED:
            updates["error"] = {
                "reason": reason,
                "flow_step_id": job.current_step_id,
                "message": f"Marked failed with fail-job by user {ctx.principal.user_id}: {reason}",
                "class": "manual",
                "handler": None,
                "http_status": None,
                "diagnostics": None,
            }
        # The CAS clears lease_owner, so a worker running the step finds its lease gone at the next
        # heartbeat (or commit) and abandons the step.
        changes = await finish(
            session,
            job_id,
            to_status,
            reason,
            now=now,
            allowed_from=st.ACTIVE,
            engine_updates=updates,
            threshold=threshold,
        )
        if changes is None:  # only possible where another writer can interleave (PostgreSQL)
            current = await session.get(Job, job_id, populate_existing=True)
            shown = st.display(current.status, current.status_reason) if current else "deleted"
            raise AbilityError(
                "invalid_job_status",
                f"Job {job_id} changed to '{shown}' meanwhile; read it again with get-jobs.",
                job_id=job_id,
                status=shown,
            )
        cancelled, more = await cancel_descendants(session, job_id, cascade_reason, now=now, threshold=threshold)
        changes.merge(more)
        new_status = st.display(to_status, st.clip_reason(reason))
        await ctx.audit(
            f"job {job_id} {new_status}" + (f" ({cancelled} child jobs cancelled)" if cancelled else ""),
            target=("job", job_id),
            changes=[f"status: {previous} -> {new_status}"],
            agent_id=job.agent_id,
            job_id=job_id,
            flow_id=job.flow_key,
            pipeline_id=job.pipeline_key,
        )
    await publish_changes(ctx, changes)
    more_text = f"; {cancelled} child job(s) cancelled" if cancelled else ""
    return EndJobOut(
        job_id=job_id,
        previous_status=previous,
        new_status=new_status,
        changed=True,
        children_cancelled=cancelled,
        message=f"Job {job_id} is now {new_status}{more_text}.",
    )


class FailJobIn(Input):
    job_id: int = Field(ge=1, description="Job")
    reason: str = Field("manual", min_length=1, max_length=500, description="Reason")


@ability(
    "fail-job",
    core=True,
    toolset="jobs",
    level="operator",
    idempotent=True,
    transaction="manual",
    description=("Mark an unfinished job failed with a reason; its items and prompts are released."),
)
async def fail_job(ctx: AbilityContext, inp: FailJobIn) -> EndJobOut:
    return await end_job(
        ctx,
        inp.job_id,
        inp.reason,
        st.FAILED,
        cascade_reason="parent_failed",
        verb="failed",
        allowed="pending, processing or waiting",
    )


class CancelJobIn(Input):
    job_id: int = Field(ge=1, description="Job")
    reason: str = Field("manual", min_length=1, max_length=500, description="Reason")


@ability(
    "cancel-job",
    core=True,
    toolset="jobs",
    level="operator",
    idempotent=True,
    transaction="manual",
    description=("Cancel an unfinished job and its unfinished children."),
)
async def cancel_job(ctx: AbilityContext, inp: CancelJobIn) -> EndJobOut:
    return await end_job(
        ctx,
        inp.job_id,
        inp.reason,
        st.CANCELLED,
        cascade_reason="parent_cancelled",
        verb="cancelled",
        allowed="pending, waiting or processing",
    )


# --- retry-job --------------------------------------------------------------------------------


class RetryJobIn(Input):
    job_id: int = Field(ge=1, description="Failed job")


class RetryJobOut(Output):
    job_id: int = Field(description="Job id (the same job is reopened)")
    previous_status: str = Field(description="Display status before the retry")
    status: Literal["pending"] = Field(description="pending")
    resume_step: str | None = Field(description="flow_step_id the job resumes at")
    parent_reopened: int | None = Field(description="Batch parent reopened to processing, or null")
    message: str = Field(description="Human-readable result")


async def _resnapshot(ctx: AbilityContext, job: Job) -> None:
    """engine.md §11.5 step 1: a job that failed before it had a plan takes a fresh snapshot of its flow."""
    flow = await ctx.session.get(Flow, job.flow_key) if job.flow_key is not None else None
    pipeline = await ctx.session.get(Pipeline, flow.pipeline_id) if flow is not None else None
    if flow is None or pipeline is None:
        raise AbilityError("no_first_step", "Flow execution failed - no first step found.", job_id=job.job_id)
    plan = resolve_plan(flow.flow_config)
    data = ed(job)
    snap = flow_snapshot(
        flow,
        pipeline,
        job=dict(
            data.get("job") or {"job_id": job.job_id, "flow_id": flow.flow_id, "pipeline_id": pipeline.pipeline_id}
        ),
        dry_run=bool(data.get("dry_run_mode")),
    )
    job.engine_data = {**{k: v for k, v in data.items() if k not in SNAPSHOT_KEYS}, **snap}
    job.current_step_id = plan.first["flow_step_id"]
    job.handler_slug = first_handler(plan)


@ability(
    "retry-job",
    core=True,
    toolset="jobs",
    level="operator",
    open_world=True,
    transaction="manual",
    description=("Retry a failed job from the step that failed."),
)
async def retry_job(ctx: AbilityContext, inp: RetryJobIn) -> RetryJobOut:
    now = utcnow()
    async with ctx.transaction() as session:
        job, _ = await load_job(ctx, inp.job_id, "operator", mutating=True)
        previous = st.display(job.status, job.status_reason)
        if job.status != st.FAILED:
            raise AbilityError(
                "invalid_job_status",
                f"Job {job.job_id} has status '{previous}'; only failed jobs can be retried.",
                job_id=job.job_id,
                status=previous,
            )
        data = ed(job)
        if data.get("batch"):
            raise AbilityError(
                "invalid_job_status",
                f"Job {job.job_id} is a batch parent; retry its failed children (get-jobs with parent_job_id "
                f"{job.job_id} and status failed) instead.",
                job_id=job.job_id,
                status=previous,
            )
        snap = await ctx.settings()
        if job.current_step_id is None:
            await _resnapshot(ctx, job)
            data = ed(job)
        if job.flow_key is not None and not data.get("dry_run_mode"):
            conflicts = await claims.reclaim(
                session,
                job_id=job.job_id,
                flow_key=job.flow_key,
                packets=[p for p in (job.packets or []) if isinstance(p, dict)],
                now=now,
                claim_ttl=snap.int("claim_ttl_seconds"),
            )
            if conflicts:
                raise AbilityError(
                    "retry_item_conflict",
                    f"Job {job.job_id} cannot be retried: {len(conflicts)} of its items are now processed or "
                    "claimed by another job; run the flow again instead.",
                    identifiers=conflicts,
                )
        parent_reopened = None
        if job.parent_job_id is not None:
            parent = await session.get(Job, job.parent_job_id)
            if parent is not None and parent.status == st.FAILED:
                parent_reopened = parent.job_id
        await session.flush()
        changes = await reopen_for_retry(session, job, now=now)
        await ctx.audit(
            f"job {job.job_id} retried at step {job.current_step_id}",
            target=("job", job.job_id),
            changes=[f"status: {previous} -> pending"]
            + ([f"parent {parent_reopened}: failed -> processing"] if parent_reopened else []),
            agent_id=job.agent_id,
            job_id=job.job_id,
            flow_id=job.flow_key,
            pipeline_id=job.pipeline_key,
        )
        resume = job.current_step_id
    await publish_changes(ctx, changes, wake=True)
    return RetryJobOut(
        job_id=inp.job_id,
        previous_status=previous,
        status="pending",
        resume_step=resume,
        parent_reopened=parent_reopened,
        message=f"Job {inp.job_id} is pending again and resumes at step {resume}.",
    )
