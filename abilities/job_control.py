"""Jobs toolset, manual controls: fail, cancel and retry a job (docs/engine.md, Manual controls).

Each mutation runs in one transaction with one audit row; after it commits the changed jobs and flows are
announced through the engine (local waiters, ``datamachine://jobs/{id}`` subscribers), and local workers are
woken when something became claimable. Deleting and recovering jobs is in ``abilities.job_maintenance``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.job_common import load_job
from datamachine_mcp.abilities.jobs import engine_of
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.engine import front
from datamachine_mcp.engine import status as st
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
    """fail-job / cancel-job: CAS from an active status, terminal accounting, cascade."""
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
        error = None
        if to_status == st.FAILED:
            error = {
                "reason": reason,
                "flow_step_id": job.current_step_id,
                "message": f"Marked failed with fail-job by user {ctx.principal.user_id}: {reason}",
                "class": "manual",
                "handler": None,
                "http_status": None,
                "diagnostics": None,
            }
        ended = await front.end_job(
            engine_of(ctx), session, job_id, to_status, reason, now=now, threshold=threshold, error=error
        )
        if not ended.changed:  # only possible where another writer can interleave (PostgreSQL)
            raise AbilityError(
                "invalid_job_status",
                f"Job {job_id} changed to '{ended.previous}' meanwhile; read it again with get-jobs.",
                job_id=job_id,
                status=ended.previous,
            )
        changes, cancelled = ended.changes, ended.children_cancelled
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
    await front.announce(ctx.runtime.engine, changes)
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
        previous = st.display(job.status, job.status_reason)  # the front door refuses all but failed jobs
        snap = await ctx.settings()
        retried = await front.retry_job(
            engine_of(ctx), session, job.job_id, now=now, claim_ttl=snap.int("claim_ttl_seconds")
        )
        changes, parent_reopened = retried.changes, retried.parent_reopened
        await ctx.audit(
            f"job {job.job_id} retried at step {retried.resume_step}",
            target=("job", job.job_id),
            changes=[f"status: {previous} -> pending"]
            + ([f"parent {parent_reopened}: failed -> processing"] if parent_reopened else []),
            agent_id=job.agent_id,
            job_id=job.job_id,
            flow_id=job.flow_key,
            pipeline_id=job.pipeline_key,
        )
        resume = retried.resume_step
    await front.announce(ctx.runtime.engine, changes, wake=True)
    return RetryJobOut(
        job_id=inp.job_id,
        previous_status=previous,
        status="pending",
        resume_step=resume,
        parent_reopened=parent_reopened,
        message=f"Job {inp.job_id} is pending again and resumes at step {resume}.",
    )
