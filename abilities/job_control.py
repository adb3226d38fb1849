"""Jobs toolset, manual controls: fail, retry, cancel, delete and recover jobs (abilities.md §7, engine.md §11.5-§11.6).

Each mutation runs in one transaction with one audit row; after it commits the changed jobs and flows are
announced through the engine (local waiters, ``datamachine://jobs/{id}`` subscribers), and local workers are
woken when something became claimable.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import delete, func, select

from abilities.agent_common import agent_owner
from abilities.context import AbilityContext
from abilities.errors import AbilityError
from abilities.job_common import load_job
from abilities.jobs import JobRef, publish_changes, ref_condition, role_condition
from abilities.pipeline_common import load_flow, load_pipeline
from abilities.registry import ability
from abilities.schema import Input, Output
from engine import claims
from engine import status as st
from engine.lifecycle import Changes, cancel_descendants, ed, finish
from engine.maintenance import recover, reopen_for_retry
from engine.plan import SNAPSHOT_KEYS, PlanError, first_handler, resolve_plan, snapshot
from storage.models import Agent, Flow, Job, Pipeline, ProcessedItem
from storage.timeutil import utcnow

CHUNK = 500


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


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
    job_id: int = Field(ge=1, description="Job to fail")
    reason: str = Field("manual", min_length=1, max_length=500, description="Failure reason stored on the job")


@ability(
    "fail-job",
    toolset="jobs",
    level="operator",
    idempotent=True,
    transaction="manual",
    description=(
        "Mark a pending, processing or waiting job as failed with a reason. Releases its item claims and "
        "restores consumed queue prompts. Already-failed jobs succeed unchanged."
    ),
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
    job_id: int = Field(ge=1, description="Job to cancel")
    reason: str = Field("manual", min_length=1, max_length=500, description="Reason stored on the job")


@ability(
    "cancel-job",
    toolset="jobs",
    level="operator",
    idempotent=True,
    transaction="manual",
    description=(
        "Cancel a pending, waiting or processing job and its unfinished child jobs. Already-cancelled jobs "
        "succeed unchanged."
    ),
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
    job_id: int = Field(ge=1, description="Failed job to retry")


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
    try:
        plan = resolve_plan(flow.flow_config)
    except PlanError as err:
        raise AbilityError(err.code, err.message, **err.data) from None
    data = ed(job)
    snap = snapshot(
        job=dict(
            data.get("job") or {"job_id": job.job_id, "flow_id": flow.flow_id, "pipeline_id": pipeline.pipeline_id}
        ),
        flow={"flow_id": flow.flow_id, "name": flow.flow_name, "scheduling": dict(flow.scheduling_config or {})},
        pipeline={"pipeline_id": pipeline.pipeline_id, "name": pipeline.pipeline_name},
        flow_config=dict(flow.flow_config or {}),
        pipeline_config=dict(pipeline.pipeline_config or {}),
        dry_run=bool(data.get("dry_run_mode")),
    )
    job.engine_data = {**{k: v for k, v in data.items() if k not in SNAPSHOT_KEYS}, **snap}
    job.current_step_id = plan.first["flow_step_id"]
    job.handler_slug = first_handler(plan)


@ability(
    "retry-job",
    toolset="jobs",
    level="operator",
    open_world=True,
    transaction="manual",
    description=(
        "Retry a failed job: it goes back to pending and resumes at the step that failed, with that step's "
        "input. A failed child also reopens its batch parent."
    ),
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


# --- delete-jobs ------------------------------------------------------------------------------


class DeleteJobsIn(Input):
    type: Literal["all", "failed"] = Field(description="all = every final job; failed = base status failed")
    flow_id: JobRef | None = Field(None, description='Only this flow\'s jobs, or "direct" for ad-hoc workflow jobs')
    pipeline_id: JobRef | None = Field(
        None, description='Only this pipeline\'s jobs, or "direct" for ad-hoc workflow jobs'
    )
    agent_id: int | None = Field(None, ge=1, description="Only this agent's jobs")
    cleanup_processed: bool = Field(False, description="Also clear processed items recorded by the deleted jobs")


class DeleteJobsOut(Output):
    deleted_count: int = Field(description="Job rows deleted, batch children included")
    processed_items_cleaned: int = Field(description="processed_items rows of the deleted jobs removed")
    skipped_active: int = Field(description="Jobs matched but kept because they (or a child) are still active")
    message: str = Field(description="Human-readable result")


async def _descendants(session: Any, roots: list[int]) -> dict[int, list[int]]:
    """root id → every descendant id (batch children, nested)."""
    out: dict[int, list[int]] = {r: [] for r in roots}
    owner: dict[int, int] = {r: r for r in roots}
    frontier = list(roots)
    while frontier:
        found: list[tuple[int, int]] = []
        for chunk in _chunks(frontier):
            rows = await session.execute(select(Job.job_id, Job.parent_job_id).where(Job.parent_job_id.in_(chunk)))
            found.extend((r[0], r[1]) for r in rows.all())
        frontier = []
        for child, parent in found:
            root = owner[parent]
            owner[child] = root
            out[root].append(child)
            frontier.append(child)
    return out


@ability(
    "delete-jobs",
    toolset="jobs",
    level="admin",
    destructive=True,
    idempotent=True,
    transaction="manual",
    description=(
        "Delete finished jobs: all final jobs or only failed ones, optionally scoped to a flow, pipeline or "
        "agent. Active jobs are never deleted."
    ),
)
async def delete_jobs(ctx: AbilityContext, inp: DeleteJobsIn) -> DeleteJobsOut:
    async with ctx.transaction() as session:
        if inp.flow_id is None and inp.pipeline_id is None and inp.agent_id is None:
            ctx.access.require_global_admin(
                "delete-jobs without a flow_id, pipeline_id or agent_id filter (all agents' jobs)"
            )
        conds: list[Any] = [Job.parent_job_id.is_(None), await role_condition(ctx, "admin")]
        if isinstance(inp.flow_id, int):
            await load_flow(ctx, inp.flow_id, "admin", mutating=True)
        if inp.flow_id is not None:
            conds.append(ref_condition(Job.flow_id, Job.flow_key, inp.flow_id))
        if isinstance(inp.pipeline_id, int):
            await load_pipeline(ctx, inp.pipeline_id, "admin", mutating=True)
        if inp.pipeline_id is not None:
            conds.append(ref_condition(Job.pipeline_id, Job.pipeline_key, inp.pipeline_id))
        if inp.agent_id is not None:
            agent = await session.get(Agent, inp.agent_id)
            if agent is None:
                raise AbilityError("agent_not_found", f"Agent {inp.agent_id} not found.", agent_id=inp.agent_id)
            await ctx.access.authorize(
                agent_owner(agent), "admin", mutating=True, target={"type": "agent", "id": inp.agent_id}
            )
            conds.append(Job.agent_id == inp.agent_id)
        wanted = st.FINAL if inp.type == "all" else (st.FAILED,)
        roots = [r[0] for r in (await session.execute(select(Job.job_id).where(*conds, Job.status.in_(wanted)))).all()]
        skipped = 0
        if inp.type == "all":
            skipped = int(
                (
                    await session.execute(
                        select(func.count()).select_from(Job).where(*conds, Job.status.in_(st.ACTIVE))
                    )
                ).scalar()
                or 0
            )
        tree = await _descendants(session, roots)
        active_children: set[int] = set()
        all_children = [c for kids in tree.values() for c in kids]
        for chunk in _chunks(all_children):
            rows = await session.execute(select(Job.job_id).where(Job.job_id.in_(chunk), Job.status.in_(st.ACTIVE)))
            active_children.update(r[0] for r in rows.all())
        # A final parent can have an active child again after retry-job; the tree stays until it ends.
        kept = [r for r in roots if not any(c in active_children for c in tree[r])]
        skipped += len(roots) - len(kept)
        doomed = kept + [c for r in kept for c in tree[r]]
        cleaned = 0
        if inp.cleanup_processed:
            for chunk in _chunks(doomed):
                result = await session.execute(delete(ProcessedItem).where(ProcessedItem.job_id.in_(chunk)))
                cleaned += int(result.rowcount or 0)
        for chunk in _chunks(kept):
            # Children go with their parent (ON DELETE CASCADE); processed rows keep existing with job_id NULL.
            await session.execute(delete(Job).where(Job.job_id.in_(chunk)).execution_options(synchronize_session=False))
        if doomed:
            filters = [
                f"{name}={value}"
                for name, value in (
                    ("flow_id", inp.flow_id),
                    ("pipeline_id", inp.pipeline_id),
                    ("agent_id", inp.agent_id),
                )
                if value is not None
            ]
            await ctx.audit(
                f"deleted {len(doomed)} {inp.type if inp.type == 'failed' else 'final'} jobs",
                target=("jobs", inp.type),
                changes=[f"deleted: {len(doomed)} jobs ({len(kept)} top-level)"]
                + ([f"processed_items cleaned: {cleaned}"] if inp.cleanup_processed else [])
                + filters,
                agent_id=inp.agent_id,
                flow_id=inp.flow_id if isinstance(inp.flow_id, int) else None,
                pipeline_id=inp.pipeline_id if isinstance(inp.pipeline_id, int) else None,
                deleted_job_ids=doomed[:1000],
            )
    await publish_changes(ctx, Changes(jobs=set(doomed)))
    parts = [f"Deleted {len(doomed)} job(s)"]
    if inp.cleanup_processed:
        parts.append(f"cleaned {cleaned} processed item(s)")
    if skipped:
        parts.append(f"kept {skipped} active job(s)")
    return DeleteJobsOut(
        deleted_count=len(doomed),
        processed_items_cleaned=cleaned,
        skipped_active=skipped,
        message=", ".join(parts) + ".",
    )


# --- recover-stuck-jobs -----------------------------------------------------------------------


class RecoverIn(Input):
    dry_run: bool = Field(False, description="Report what would be recovered without changing anything")
    flow_id: int | None = Field(None, ge=1, description="Only this flow's jobs")
    job_id: int | None = Field(None, ge=1, description="Only this job")
    older_than_minutes: int | None = Field(
        None,
        ge=1,
        le=10080,
        description="Also void the leases of processing jobs whose current step started earlier than this",
    )
    limit: int = Field(100, ge=1, le=1000, description="Most jobs changed (or reported) per call")


class RecoveredJob(Output):
    job_id: int = Field(description="Job id")
    previous_status: str = Field(description="Status before recovery")
    new_status: str = Field(description="Status after recovery (display form)")
    action: str = Field(description="requeued, failed, wait_timed_out or parent_completed")


class RecoverOut(Output):
    requeued: int = Field(description="Processing jobs with an expired lease put back to pending")
    failed: int = Field(description="Processing jobs with an expired lease and no attempts left, failed")
    timed_out_waits: int = Field(description="Waiting jobs past their wait timeout, failed")
    parents_completed: int = Field(description="Batch parents whose children were all final, completed")
    leases_voided: int = Field(description="Leases voided because of older_than_minutes")
    limit_reached: bool = Field(description="More jobs may need recovery: call again")
    dry_run: bool = Field(description="Nothing was changed")
    jobs: list[RecoveredJob] = Field(description="The affected jobs")
    message: str = Field(description="Human-readable result")


@ability(
    "recover-stuck-jobs",
    toolset="jobs",
    level="operator",
    idempotent=True,
    transaction="manual",
    description=(
        "Recover stuck work now: requeue or fail processing jobs with expired leases, time out expired waits, "
        "and complete orphaned batch parents. Supports dry_run."
    ),
)
async def recover_stuck_jobs(ctx: AbilityContext, inp: RecoverIn) -> RecoverOut:
    engine = ctx.runtime.engine
    if engine is None:
        raise AbilityError("engine_unavailable", "This process has no engine attached; recovery is not possible.")
    async with ctx.reading():
        if inp.flow_id is None and inp.job_id is None:
            ctx.access.require_global_admin("recover-stuck-jobs without a flow_id or job_id filter (all agents)")
        if inp.job_id is not None:
            await load_job(ctx, inp.job_id, "operator", mutating=not inp.dry_run)
        if inp.flow_id is not None:
            await load_flow(ctx, inp.flow_id, "operator", mutating=not inp.dry_run)
        where = await role_condition(ctx, "operator")
    # recover() runs the maintenance steps in its own short transactions and announces what changed.
    report = await recover(
        engine,
        dry_run=inp.dry_run,
        flow_id=inp.flow_id,
        job_id=inp.job_id,
        older_than_minutes=inp.older_than_minutes,
        limit=inp.limit,
        where=where,
    )
    if not inp.dry_run and (report["jobs"] or report["leases_voided"]):
        async with ctx.transaction():
            await ctx.audit(
                report["message"],
                target=("job", inp.job_id) if inp.job_id else ("flow", inp.flow_id) if inp.flow_id else ("jobs", "all"),
                changes=[
                    f"job {j['job_id']}: {j['previous_status']} -> {j['new_status']}" for j in report["jobs"][:100]
                ]
                + ([f"leases voided: {report['leases_voided']}"] if report["leases_voided"] else []),
                job_id=inp.job_id,
                flow_id=inp.flow_id,
            )
    return RecoverOut.model_validate(report)
