"""The engine's front door: everything a tool call does to jobs goes through here.

Run a flow, run a workflow (or system task), end a job (fail / cancel, with its descendants), retry it,
resume or decide a job waiting at a gate, wait for a job, recover stuck work. Each mutating call runs
inside the caller's ORM transaction (``session``) so the caller's audit row commits with it; the
returned ``Changes`` are announced with ``announce`` after that commit. Abilities never write a job's
status or lease themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine import claims
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.accounting import Changes, cancel_descendants, finish
from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.engine.jobs import Created, create_direct_job, create_flow_job, empty_first_queue, flow_snapshot
from datamachine_mcp.engine.plan import (
    SNAPSHOT_KEYS,
    Plan,
    PlanError,
    check_initial_data,
    direct_configs,
    first_handler,
    resolve_plan,
    step_config,
)
from datamachine_mcp.engine.recovery import recover
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.store import JobRow
from datamachine_mcp.engine.wait import WaitResult, position_of, wait_for_job
from datamachine_mcp.engine.waits import AlreadyResolved, Decided, resolve_approval, resume_waiting
from datamachine_mcp.storage.models import Flow, Pipeline
from datamachine_mcp.storage.timeutil import iso

__all__ = [
    "AlreadyResolved",
    "Changes",
    "Created",
    "Decided",
    "JobError",
    "PlanError",
    "WaitResult",
    "announce",
    "check_initial_data",
    "end_job",
    "position_of",
    "recover",
    "resolve_approval",
    "resume_waiting",
    "retry_job",
    "run_flow",
    "run_workflow",
    "step_config",
    "wait_for_job",
]


class JobError(CodedError):
    """A job cannot make the requested move (its status, items or plan forbid it); nothing changed."""


async def announce(services: EngineServices | None, changes: Changes, *, wake: bool = False) -> None:
    """After commit: wake local waiters, notify subscribers of changed jobs and flows, and (``wake``) start
    claimable work without waiting for the next poll."""
    if services is None:
        return
    await services.announce(changes.jobs, changes.flows)
    if wake:
        services.wake()


# --- creating runs -----------------------------------------------------------------------------------


@dataclass
class RunStart:
    """A flow run: the created (or replayed) job, or ``skipped`` with nothing created."""

    first_step: str
    created: Created | None = None
    skipped_reason: str | None = None


async def run_flow(
    session: AsyncSession,
    *,
    flow: Flow,
    pipeline: Pipeline,
    initial_data: dict[str, Any],
    dry_run: bool,
    idempotency_key: str | None,
    max_attempts: int,
    now: datetime,
    affinity: str | None = None,
    origin_session_id: str | None = None,
    threshold: str = "debug",
    trigger: str = "manual",
    request: dict[str, Any] | None = None,
) -> RunStart:
    """A pending run of ``flow`` (or a replay of the key's job). Raises PlanError and writes nothing when
    ``initial_data`` or the flow's plan is invalid; an empty drain queue creates nothing."""
    check_initial_data(initial_data)
    plan = resolve_plan(flow.flow_config)
    first = plan.first["flow_step_id"]
    if empty_first_queue(plan, flow.flow_config or {}):
        return RunStart(first, skipped_reason="empty_drain_queue")
    created = await create_flow_job(
        session,
        flow=flow,
        pipeline=pipeline,
        plan=plan,
        trigger=trigger,
        initial_data=initial_data,
        dry_run=dry_run,
        idempotency_key=idempotency_key,
        request=request or {"flow_id": flow.flow_id, "initial_data": initial_data, "dry_run": dry_run},
        max_attempts=max_attempts,
        now=now,
        affinity=affinity,
        origin_session_id=origin_session_id,
        threshold=threshold,
    )
    return RunStart(first, created=created)


async def run_workflow(
    session: AsyncSession,
    *,
    steps: list[dict[str, Any]],
    now: datetime,
    **job: Any,
) -> tuple[Plan, Created]:
    """A direct (ephemeral) workflow job, or with ``standalone=True`` a system job, from ``steps``.
    ``job`` carries create_direct_job's remaining arguments (owner, label, source, run_at, key, …)."""
    flow_config, pipeline_config = direct_configs(steps, now_iso=iso(now) or "")
    plan = resolve_plan(flow_config)
    created = await create_direct_job(
        session, plan=plan, flow_config=flow_config, pipeline_config=pipeline_config, now=now, **job
    )
    return plan, created


# --- ending, retrying --------------------------------------------------------------------------------


@dataclass
class Ended:
    previous: str
    changed: bool
    new_status: str
    children_cancelled: int = 0
    changes: Changes = field(default_factory=Changes)
    job: JobRow | None = None


async def end_job(
    services: EngineServices,
    session: AsyncSession,
    job_id: int,
    to_status: str,
    reason: str,
    *,
    now: datetime,
    threshold: str,
    error: dict[str, Any] | None = None,
) -> Ended:
    """fail-job / cancel-job: an active job becomes ``to_status`` with terminal accounting, its active
    descendants ``cancelled - parent_<verb>``. Already ``to_status``: unchanged. Other final: JobError."""
    async with services.store.bind(session) as tx:
        job = await tx.get_job(job_id, lock=True)
        if job is None:
            raise JobError("job_not_found", f"Job {job_id} not found.", job_id=job_id)
        previous = st.display(job.status, job.status_reason)
        if job.status == to_status:
            return Ended(previous, False, previous, job=job)
        if job.status in st.FINAL:
            raise JobError(
                "invalid_job_status",
                f"Job {job_id} has status '{previous}'; only pending, processing or waiting jobs can be ended.",
                job_id=job_id,
                status=previous,
            )
        # The write clears lease_owner, so a worker running the step finds its lease gone at the next
        # heartbeat (or commit) and abandons the step.
        changes = await finish(
            tx,
            job,
            to_status,
            reason,
            now=now,
            guard="status",
            allowed=st.ACTIVE,
            threshold=threshold,
            engine_updates={"error": error} if error else None,
            gate_status="cancelled",
        )
        cascade = "parent_failed" if to_status == st.FAILED else "parent_cancelled"
        cancelled, more = await cancel_descendants(tx, job_id, cascade, now=now, threshold=threshold)
        changes.merge(more)
    return Ended(previous, True, st.display(to_status, job.status_reason), cancelled, changes, job)


@dataclass
class Retried:
    previous: str
    resume_step: str | None
    parent_reopened: int | None
    changes: Changes
    job: JobRow


async def retry_job(
    services: EngineServices, session: AsyncSession, job_id: int, *, now: datetime, claim_ttl: int
) -> Retried:
    """retry-job: a failed job goes back to pending at the step that failed, with that step's input; its
    items are claimed again; failed batch parents above it reopen to processing."""
    async with services.store.bind(session) as tx:
        job = await tx.get_job(job_id, lock=True)
        if job is None:
            raise JobError("job_not_found", f"Job {job_id} not found.", job_id=job_id)
        previous = st.display(job.status, job.status_reason)
        if job.status != st.FAILED:
            raise JobError(
                "invalid_job_status",
                f"Job {job.job_id} has status '{previous}'; only failed jobs can be retried.",
                job_id=job.job_id,
                status=previous,
            )
        data = dict(job.engine_data or {})
        if data.get("batch"):
            raise JobError(
                "invalid_job_status",
                f"Job {job.job_id} is a batch parent; retry its failed children (get-jobs with parent_job_id "
                f"{job.job_id} and status failed) instead.",
                job_id=job.job_id,
                status=previous,
            )
        if job.current_step_id is None:
            data = await _resnapshot(session, job, data)
        if job.flow_key is not None and not data.get("dry_run_mode"):
            conflicts = await claims.reclaim(
                session,
                job_id=job.job_id,
                flow_key=job.flow_key,
                packets=[p for p in (job.packets or []) if isinstance(p, dict)],
                now=now,
                claim_ttl=claim_ttl,
            )
            if conflicts:
                raise JobError(
                    "retry_item_conflict",
                    f"Job {job.job_id} cannot be retried: {len(conflicts)} of its items are now processed or "
                    "claimed by another job; run the flow again instead.",
                    identifiers=conflicts,
                )
            await session.flush()
        retry = dict(data.get("retry") or {})
        retry["manual_retries"] = int(retry.get("manual_retries", 0)) + 1
        data["retry"] = retry
        data.pop("error", None)
        data.pop("run_metrics", None)
        job.engine_data, job.status, job.run_at, job.attempts = data, st.PENDING, now, 0
        await tx.reopen(job, now=now, allowed=(st.FAILED,))
        changes = Changes(jobs={job.job_id})
        reopened = None
        parent_id = job.parent_job_id
        while parent_id is not None:
            parent = await tx.get_job(parent_id, lock=True)
            if parent is None or parent.status != st.FAILED:
                break
            pdata = dict(parent.engine_data or {})
            pdata.pop("batch_results", None)
            parent.engine_data, parent.status = pdata, st.PROCESSING
            await tx.reopen(parent, now=now, allowed=(st.FAILED,))
            changes.jobs.add(parent_id)
            reopened = reopened or parent_id
            parent_id = parent.parent_job_id
    return Retried(previous, job.current_step_id, reopened, changes, job)


async def _resnapshot(session: AsyncSession, job: JobRow, data: dict[str, Any]) -> dict[str, Any]:
    """A job that failed before it had a plan takes a fresh snapshot of its flow (still invalid: error)."""
    flow = await session.get(Flow, job.flow_key) if job.flow_key is not None else None
    pipeline = await session.get(Pipeline, flow.pipeline_id) if flow is not None else None
    if flow is None or pipeline is None:
        raise JobError("no_first_step", "Flow execution failed - no first step found.", job_id=job.job_id)
    plan = resolve_plan(flow.flow_config)
    snap = flow_snapshot(
        flow,
        pipeline,
        job=dict(
            data.get("job") or {"job_id": job.job_id, "flow_id": flow.flow_id, "pipeline_id": pipeline.pipeline_id}
        ),
        dry_run=bool(data.get("dry_run_mode")),
    )
    job.current_step_id = plan.first["flow_step_id"]
    job.handler_slug = first_handler(plan)
    return {**{k: v for k, v in data.items() if k not in SNAPSHOT_KEYS}, **snap}
