"""Recovery of stuck work (engine.md §11.4, §11.6, §13.1, §9.3, §10.3, §5.5).

``recover`` is what recover-stuck-jobs and the ``recover_stuck_jobs`` system task run; ``tick`` is one
pass of the maintenance loop (recover everything, then housekeeping).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update

from datamachine_mcp.engine import claims as claim_ops
from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.lifecycle import (
    Changes,
    cas,
    child_counts,
    complete_parent,
    ed,
    finish,
    log_context,
    log_owner,
    parent_outcome,
    reload,
)
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import Flow, Job, ProcessedItem
from datamachine_mcp.storage.settings import Snapshot
from datamachine_mcp.storage.timeutil import iso, utcnow

log = logging.getLogger("datamachine.maintenance")


CLAIM_SWEEP = 5000


def _scope(query: Any, flow_id: int | None, job_id: int | None, where: Any) -> Any:
    if flow_id is not None:
        query = query.where(Job.flow_key == flow_id)
    if job_id is not None:
        query = query.where(Job.job_id == job_id)
    if where is not None:
        query = query.where(where)
    return query


async def recover(
    services: EngineServices,
    *,
    dry_run: bool = False,
    flow_id: int | None = None,
    job_id: int | None = None,
    older_than_minutes: int | None = None,
    limit: int = 100,
    where: Any = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Lease recovery, wait timeouts and orphaned batch parents, filtered (maintenance steps 1-3)."""
    now = now or utcnow()
    snap = await services.snapshot()
    threshold = str(snap["log_level"])
    out: dict[str, Any] = {
        "requeued": 0,
        "failed": 0,
        "timed_out_waits": 0,
        "parents_completed": 0,
        "leases_voided": 0,
        "limit_reached": False,
        "dry_run": dry_run,
        "jobs": [],
    }
    changes = Changes()
    budget = limit

    def note(job: Job, new: str, action: str, counter: str) -> None:
        out["jobs"].append({"job_id": job.job_id, "previous_status": job.status, "new_status": new, "action": action})
        out[counter] += 1

    def candidates(*conditions: Any, limit: int) -> Any:
        """Jobs in ``conditions`` and the call's filters, by id, locked: the passes of several
        processes each act on different jobs and never wait on one another."""
        query = _scope(select(Job).where(*conditions), flow_id, job_id, where).order_by(Job.job_id).limit(limit)
        return services.db.for_update(query, skip_locked=True)

    if older_than_minutes:
        cutoff = now - timedelta(minutes=older_than_minutes)
        async with services.db.write() as session:
            query = _scope(
                select(Job.job_id).where(
                    Job.status == st.PROCESSING, Job.lease_owner.is_not(None), Job.updated_at < cutoff
                ),
                flow_id,
                job_id,
                where,
            ).limit(budget)
            ids = [r[0] for r in (await session.execute(query)).all()]
            if ids and not dry_run:
                # The holder's next heartbeat finds its lease gone and abandons the step.
                await session.execute(
                    update(Job)
                    .where(Job.job_id.in_(ids), Job.status == st.PROCESSING)
                    .values(lease_owner=None, lease_expires_at=now - timedelta(seconds=1))
                    .execution_options(synchronize_session=False)
                )
            out["leases_voided"] = len(ids)
    # 1. expired leases
    async with services.db.write() as session:
        expired = candidates(
            Job.status == st.PROCESSING, Job.lease_expires_at.is_not(None), Job.lease_expires_at < now, limit=budget
        )
        for job in list((await session.execute(expired)).scalars()):
            budget -= 1
            if job.attempts < job.max_attempts:
                note(job, st.PENDING, "requeued", "requeued")
                if dry_run:
                    continue
                delay = min(
                    snap.int("retry_max_delay_seconds"),
                    snap.int("retry_transport_base_seconds") * 2 ** max(0, job.attempts - 1),
                )
                run_at = now + timedelta(seconds=delay)
                data = ed(job)
                retry = dict(data.get("retry") or {})
                history = list(retry.get("history") or [])
                history.append(
                    {
                        "flow_step_id": job.current_step_id,
                        "attempt": job.attempts,
                        "class": "lease_expired",
                        "delay_seconds": delay,
                        "at": iso(now),
                        "error": "lease_expired",
                    }
                )
                retry.update(
                    total_retries=int(retry.get("total_retries", 0)) + 1,
                    last_class="lease_expired",
                    next_retry_at=iso(run_at),
                    history=history[-10:],
                )
                data["retry"] = retry
                if await cas(
                    session,
                    job.job_id,
                    (st.PROCESSING,),
                    job.lease_owner,
                    status=st.PENDING,
                    run_at=run_at,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                    engine_data=data,
                ):
                    await claim_ops.push_expiry(
                        session, job.job_id, run_at + timedelta(seconds=snap.int("claim_ttl_seconds"))
                    )
                    await write_log(
                        session,
                        "warning",
                        f"Job {job.job_id}: lease of {job.lease_owner} expired; requeued",
                        log_context(job, lease_owner=job.lease_owner, delay_seconds=delay),
                        threshold=threshold,
                        **log_owner(job),
                    )
                    changes.jobs.add(job.job_id)
            else:
                note(job, st.display(st.FAILED, "lease_expired"), "failed", "failed")
                if dry_run:
                    continue
                data = ed(job)
                data["error"] = {
                    "reason": "lease_expired",
                    "flow_step_id": job.current_step_id,
                    "message": f"The worker's lease expired after {job.attempts} attempts.",
                    "class": "lease_expired",
                }
                done = await finish(
                    session,
                    job.job_id,
                    st.FAILED,
                    "lease_expired",
                    now=now,
                    allowed_from=(st.PROCESSING,),
                    lease_owner=job.lease_owner,
                    engine_updates={"error": data["error"]},
                    threshold=threshold,
                )
                if done is not None:
                    changes.merge(done)
            if budget <= 0:
                break
    # 2. wait timeouts
    if budget > 0:
        async with services.db.write() as session:
            waits = candidates(
                Job.status == st.WAITING, Job.wait_expires_at.is_not(None), Job.wait_expires_at < now, limit=budget
            )
            for job in list((await session.execute(waits)).scalars()):
                budget -= 1
                reason = "approval_timeout" if job.wait_kind == "approval" else "webhook_gate_timeout"
                note(job, st.display(st.FAILED, reason), "wait_timed_out", "timed_out_waits")
                if dry_run:
                    continue
                data = ed(job)
                key = "approval" if job.wait_kind == "approval" else "webhook_gate"
                updates = {}
                if isinstance(data.get(key), dict):
                    updates[key] = {**data[key], "status": "expired"}
                done = await finish(
                    session,
                    job.job_id,
                    st.FAILED,
                    reason,
                    now=now,
                    allowed_from=(st.WAITING,),
                    engine_updates=updates,
                    threshold=threshold,
                )
                if done is not None:
                    changes.merge(done)
                    await write_log(
                        session,
                        "warning",
                        f"Job {job.job_id}: wait timed out ({reason})",
                        log_context(job, wait_kind=job.wait_kind),
                        threshold=threshold,
                        **log_owner(job),
                    )
                if budget <= 0:
                    break
    # 3. batch parents whose children are all final
    if budget > 0:
        async with services.db.write() as session:
            parents = candidates(
                Job.status == st.PROCESSING, Job.lease_owner.is_(None), Job.lease_expires_at.is_(None), limit=budget * 4
            )
            for job in list((await session.execute(parents)).scalars()):
                if not (job.engine_data or {}).get("batch"):
                    continue
                active = (
                    await session.execute(
                        select(Job.job_id).where(Job.parent_job_id == job.job_id, Job.status.in_(st.ACTIVE)).limit(1)
                    )
                ).scalar()
                if active is not None:
                    continue
                budget -= 1
                final, final_reason, _ = parent_outcome(await child_counts(session, job.job_id))
                note(job, st.display(final, final_reason), "parent_completed", "parents_completed")
                if not dry_run:
                    changes.merge(await complete_parent(session, job.job_id, now=now, threshold=threshold))
                if budget <= 0:
                    break
    out["limit_reached"] = budget <= 0
    if not dry_run:
        await services.announce(changes.jobs, changes.flows)
        if out["requeued"]:
            services.wake()
    total = out["requeued"] + out["failed"] + out["timed_out_waits"] + out["parents_completed"]
    out["message"] = (
        f"{'Would recover' if dry_run else 'Recovered'} {total} job(s): {out['requeued']} requeued, {out['failed']} failed, "
        f"{out['timed_out_waits']} waits timed out, {out['parents_completed']} batch parents completed."
    )
    return out


async def housekeeping(services: EngineServices, snap: Snapshot, now: datetime) -> dict[str, int]:
    """Maintenance steps 4-6: delete inactive claims, re-derive lost next runs, clear stale affinity."""
    counts = {"inactive_claims": 0, "affinity_cleared": 0, "next_runs_restored": 0}
    async with services.db.write() as session:
        inactive = (
            select(ProcessedItem.id)
            .where(ProcessedItem.status == claim_ops.CLAIMED, ~claim_ops.active_claim_condition(now))
            .limit(CLAIM_SWEEP)
        )  # bounded per pass (one IN list); the next pass takes the rest
        ids = [r[0] for r in (await session.execute(services.db.for_update(inactive, skip_locked=True))).all()]
        if ids:
            await session.execute(delete(ProcessedItem).where(ProcessedItem.id.in_(ids)))
        counts["inactive_claims"] = len(ids)
        stale = now - timedelta(seconds=snap.int("lease_ttl_seconds"))
        result = await session.execute(
            update(Job)
            .where(Job.status == st.PENDING, Job.affinity.is_not(None), Job.run_at < stale)
            .values(affinity=None)
            .execution_options(synchronize_session=False)
        )
        counts["affinity_cleared"] = rowcount(result)
        # Interval and cron flows always have a next run while enabled; one_time's NULL means "fired".
        recurring = Flow.scheduling_config["interval"].as_string().not_in(("manual", "one_time"))
        rows = (await session.execute(select(Flow).where(Flow.next_run_at.is_(None), recurring).limit(500))).scalars()
        for flow in list(rows):
            upcoming = sched.upcoming(flow.scheduling_config or {}, flow_id=flow.flow_id, now=now)
            if upcoming is None:
                continue
            flow.next_run_at = upcoming
            flow.scheduling_config = sched.with_next_run(dict(flow.scheduling_config or {}), upcoming)
            counts["next_runs_restored"] += 1
            await write_log(
                session,
                "warning",
                f"Flow {flow.flow_id} had no next run; restored to {iso(upcoming)}",
                {"flow_id": flow.flow_id, "pipeline_id": flow.pipeline_id},
                agent_id=flow.agent_id,
            )
    return counts


async def tick(services: EngineServices) -> dict[str, Any]:
    """One maintenance pass over everything (the loop runs it every maintenance_interval_seconds)."""
    now = utcnow()
    snap = await services.snapshot()
    report = await recover(services, limit=1000, now=now)
    report.update(await housekeeping(services, snap, now))
    return report


async def reopen_for_retry(session: Any, job: Job, *, now: datetime) -> Changes:
    """retry-job's state change (engine.md §11.5 step 3-4): the job and failed batch parents upwards."""
    changes = Changes(jobs={job.job_id})
    data = ed(job)
    retry = dict(data.get("retry") or {})
    retry["manual_retries"] = int(retry.get("manual_retries", 0)) + 1
    data["retry"] = retry
    data.pop("error", None)
    data.pop("run_metrics", None)
    await session.execute(
        update(Job)
        .where(Job.job_id == job.job_id, Job.status == st.FAILED)
        .values(
            status=st.PENDING,
            status_reason=None,
            completed_at=None,
            lease_owner=None,
            lease_expires_at=None,
            run_at=now,
            attempts=0,
            updated_at=now,
            engine_data=data,
        )
        .execution_options(synchronize_session=False)
    )
    parent_id = job.parent_job_id
    while parent_id is not None:
        parent = await reload(session, parent_id)
        if parent is None or parent.status != st.FAILED:
            break
        pdata = ed(parent)
        pdata.pop("batch_results", None)
        await session.execute(
            update(Job)
            .where(Job.job_id == parent_id, Job.status == st.FAILED)
            .values(status=st.PROCESSING, status_reason=None, completed_at=None, updated_at=now, engine_data=pdata)
            .execution_options(synchronize_session=False)
        )
        changes.jobs.add(parent_id)
        parent_id = parent.parent_job_id
    return changes
