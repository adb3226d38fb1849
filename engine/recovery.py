"""Recovering stuck work, in named parts (docs: lease expiry, wait timeouts, orphaned batch parents).

``recover`` runs the parts in order with one budget of jobs; recover-stuck-jobs, the
``recover_stuck_jobs`` system task and the maintenance loop call it. Each part selects its candidates
locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so passes in several processes act on different jobs
and never wait on each other, and changes each job with a guarded write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.accounting import (
    Changes,
    complete_parent,
    finish,
    log_context,
    log_owner,
    may_hold_claims,
    parent_outcome,
)
from datamachine_mcp.engine.retry import RetryPolicy
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.store import JobRow, StoreTx
from datamachine_mcp.storage.models import Job
from datamachine_mcp.storage.settings_schema import Snapshot
from datamachine_mcp.storage.timeutil import utcnow


@dataclass
class Scope:
    """Which jobs a recovery pass may touch: a flow, a job, an extra SQL condition (the caller's rights)."""

    flow_id: int | None = None
    job_id: int | None = None
    where: Any = None

    def apply(self, query: Any) -> Any:
        if self.flow_id is not None:
            query = query.where(Job.flow_key == self.flow_id)
        if self.job_id is not None:
            query = query.where(Job.job_id == self.job_id)
        if self.where is not None:
            query = query.where(self.where)
        return query


@dataclass
class Report:
    dry_run: bool
    requeued: int = 0
    failed: int = 0
    timed_out_waits: int = 0
    parents_completed: int = 0
    leases_voided: int = 0
    jobs: list[dict[str, Any]] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)

    def note(self, job: JobRow, new: str, action: str, counter: str) -> None:
        self.jobs.append({"job_id": job.job_id, "previous_status": job.status, "new_status": new, "action": action})
        setattr(self, counter, getattr(self, counter) + 1)

    @property
    def total(self) -> int:
        return self.requeued + self.failed + self.timed_out_waits + self.parents_completed


class Recovery:
    def __init__(
        self, services: EngineServices, snap: Snapshot, scope: Scope, *, dry_run: bool, now: datetime, limit: int
    ) -> None:
        self.services, self.snap, self.scope, self.now = services, snap, scope, now
        self.threshold = str(snap["log_level"])
        self.budget = limit
        self.report = Report(dry_run=dry_run)

    async def _locked(self, session: Any, tx: StoreTx, *conditions: Any, limit: int) -> list[JobRow]:
        query = self.scope.apply(select(Job.job_id).where(*conditions)).order_by(Job.job_id).limit(limit)
        ids = [r[0] for r in (await session.execute(self.services.db.for_update(query, skip_locked=True))).all()]
        rows = [await tx.get_job(i) for i in ids]
        return [r for r in rows if r is not None]

    async def void_old_leases(self, older_than_minutes: int) -> None:
        """Leases of processing jobs whose current step started before the cutoff are voided; each holder
        abandons its step at its next heartbeat, and lease recovery takes the job."""
        cutoff = self.now - timedelta(minutes=older_than_minutes)
        async with self.services.db.write() as session, self.services.store.bind(session) as tx:
            query = self.scope.apply(
                select(Job.job_id).where(
                    Job.status == st.PROCESSING, Job.lease_owner.is_not(None), Job.updated_at < cutoff
                )
            ).limit(self.budget)
            ids = [r[0] for r in (await session.execute(query)).all()]
            if not self.report.dry_run:
                for job_id in ids:
                    await tx.void_old_lease(job_id, expired_at=self.now - timedelta(seconds=1))
            self.report.leases_voided = len(ids)

    async def expired_leases(self) -> None:
        """A job whose lease expired is requeued with the transport backoff, or failed without attempts left."""
        policy = RetryPolicy.from_settings(self.snap)
        async with self.services.db.write() as session, self.services.store.bind(session) as tx:
            expired = await self._locked(
                session,
                tx,
                Job.status == st.PROCESSING,
                Job.lease_expires_at.is_not(None),
                Job.lease_expires_at < self.now,
                limit=self.budget,
            )
            for job in expired:
                self.budget -= 1
                owner, lease = job.lease_owner, job.lease_expires_at
                if job.attempts < job.max_attempts:
                    self.report.note(job, st.PENDING, "requeued", "requeued")
                    if not self.report.dry_run:
                        await self._requeue(tx, job, policy)
                else:
                    self.report.note(job, st.display(st.FAILED, "lease_expired"), "failed", "failed")
                    if not self.report.dry_run:
                        error = {
                            "reason": "lease_expired",
                            "flow_step_id": job.current_step_id,
                            "message": f"The worker's lease expired after {job.attempts} attempts.",
                            "class": "lease_expired",
                        }
                        done = await finish(
                            tx,
                            job,
                            st.FAILED,
                            "lease_expired",
                            now=self.now,
                            threshold=self.threshold,
                            engine_updates={"error": error},
                            guard="expired",
                            worker_id=owner,
                            lease_expires_at=lease,
                        )
                        self.report.changes.merge(done)
                if self.budget <= 0:
                    break

    async def _requeue(self, tx: StoreTx, job: JobRow, policy: RetryPolicy) -> None:
        owner, lease = job.lease_owner, job.lease_expires_at
        delay = policy.delay("lease_expired", job.attempts)
        data = dict(job.engine_data or {})
        run_at = policy.record_retry(
            data,
            flow_step_id=job.current_step_id,
            attempt=job.attempts,
            error_class="lease_expired",
            delay=delay,
            now=self.now,
            code="lease_expired",
        )
        job.engine_data = data
        if may_hold_claims(job):
            await tx.push_claims(job.job_id, run_at + timedelta(seconds=self.snap.int("claim_ttl_seconds")))
        await tx.requeue(job, run_at=run_at, now=self.now, guard="expired", worker_id=owner, lease_expires_at=lease)
        tx.log(
            "warning",
            f"Job {job.job_id}: lease of {owner} expired; requeued",
            log_context(job, lease_owner=owner, delay_seconds=delay),
            threshold=self.threshold,
            **log_owner(job),
        )
        self.report.changes.jobs.add(job.job_id)

    async def wait_timeouts(self) -> None:
        """A parked job past its wait's expiry fails (``approval_timeout`` / ``webhook_gate_timeout``)."""
        async with self.services.db.write() as session, self.services.store.bind(session) as tx:
            waits = await self._locked(
                session,
                tx,
                Job.status == st.WAITING,
                Job.wait_expires_at.is_not(None),
                Job.wait_expires_at < self.now,
                limit=self.budget,
            )
            for job in waits:
                self.budget -= 1
                kind = job.wait_kind or "wait"
                reason = f"{kind}_timeout"
                self.report.note(job, st.display(st.FAILED, reason), "wait_timed_out", "timed_out_waits")
                if not self.report.dry_run:
                    done = await finish(
                        tx,
                        job,
                        st.FAILED,
                        reason,
                        now=self.now,
                        threshold=self.threshold,
                        gate_status="expired",
                        guard="wait",
                        wait_ref=job.wait_ref,
                    )
                    self.report.changes.merge(done)
                    tx.log(
                        "warning",
                        f"Job {job.job_id}: wait timed out ({reason})",
                        log_context(job, wait_kind=kind),
                        threshold=self.threshold,
                        **log_owner(job),
                    )
                if self.budget <= 0:
                    break

    async def orphaned_parents(self) -> None:
        """A batch parent whose children are all final completes (normally its last child does that)."""
        async with self.services.db.write() as session, self.services.store.bind(session) as tx:
            parents = await self._locked(
                session,
                tx,
                Job.status == st.PROCESSING,
                Job.lease_owner.is_(None),
                Job.lease_expires_at.is_(None),
                limit=self.budget * 4,
            )
            for job in parents:
                if not (job.engine_data or {}).get("batch"):
                    continue
                counts = await tx.child_counts(job.job_id)
                if any(counts.get(s, 0) for s in st.ACTIVE):
                    continue
                self.budget -= 1
                final, reason, _ = parent_outcome(counts)
                self.report.note(job, st.display(final, reason), "parent_completed", "parents_completed")
                if not self.report.dry_run:
                    self.report.changes.merge(
                        await complete_parent(tx, job.job_id, now=self.now, threshold=self.threshold)
                    )
                if self.budget <= 0:
                    break


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
    """Lease recovery, wait timeouts and orphaned batch parents, filtered, within ``limit`` jobs."""
    snap = await services.snapshot()
    pass_ = Recovery(services, snap, Scope(flow_id, job_id, where), dry_run=dry_run, now=now or utcnow(), limit=limit)
    if older_than_minutes:
        await pass_.void_old_leases(older_than_minutes)
    for part in (pass_.expired_leases, pass_.wait_timeouts, pass_.orphaned_parents):
        if pass_.budget <= 0:
            break
        await part()
    report = pass_.report
    if not dry_run:
        await services.announce(report.changes.jobs, report.changes.flows)
        if report.requeued:
            services.wake()
    verb = "Would recover" if dry_run else "Recovered"
    return {
        "requeued": report.requeued,
        "failed": report.failed,
        "timed_out_waits": report.timed_out_waits,
        "parents_completed": report.parents_completed,
        "leases_voided": report.leases_voided,
        "limit_reached": pass_.budget <= 0,
        "dry_run": dry_run,
        "jobs": report.jobs,
        "message": (
            f"{verb} {report.total} job(s): {report.requeued} requeued, {report.failed} failed, "
            f"{report.timed_out_waits} waits timed out, {report.parents_completed} batch parents completed."
        ),
    }
