"""The worker: claims due jobs under a lease, runs their steps, commits each step (engine.md §5).

Each claimed job runs as an asyncio task beside a heartbeat task that renews the lease; a heartbeat
that finds the lease gone (cancel-job, fail-job, recovery, deletion) cancels the step, and the worker
commits nothing more for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.claiming import claim_due
from datamachine_mcp.engine.claims import push_expiry
from datamachine_mcp.engine.commit import commit_step, fail_plan_result, result_from_exception
from datamachine_mcp.engine.maintenance import recover
from datamachine_mcp.engine.notify import post_wait_notification
from datamachine_mcp.engine.plan import PlanError, plan_of, step_config
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.steps import LeaseLost, StepResult, StepRun, executor
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.logs import level_allows, write_log
from datamachine_mcp.storage.models import Job, Setting
from datamachine_mcp.storage.timeutil import iso, utcnow

log = logging.getLogger("datamachine.worker")

DEFAULT_CONCURRENCY = 4
POLL_SECONDS = 1.0
LIVENESS_KEY = "worker_heartbeat"
LIVENESS_SECONDS = 15


class Worker:
    def __init__(
        self,
        services: EngineServices,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.services = services
        self.concurrency = max(1, concurrency)
        self.poll_seconds = poll_seconds
        self._running: dict[int, asyncio.Task[None]] = {}
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._beat_at: datetime | None = None
        self._stopping = asyncio.Event()
        self.last_loop_at: datetime | None = None
        self.jobs_started = 0

    @property
    def worker_id(self) -> str:
        return self.services.worker_id

    def now(self) -> datetime:
        return utcnow()

    async def run(self) -> None:
        """Claim and run jobs until ``stop()``."""
        log.info("worker %s started (concurrency %s)", self.worker_id, self.concurrency)
        try:
            while not self._stopping.is_set():
                self.last_loop_at = self.now()
                await self._record_liveness()
                free = self.concurrency - len(self._running)
                claimed: list[int] = []
                if free > 0:
                    try:
                        snap = await self.services.snapshot()
                        claimed = await claim_due(
                            self.services.db,
                            self.worker_id,
                            free,
                            now=self.now(),
                            lease_ttl=snap.int("lease_ttl_seconds"),
                        )
                    except Exception:
                        log.exception("claiming jobs failed; retrying after the poll interval")
                    if len(claimed) > free:  # never expected: hand back what exceeds the free slots
                        for job_id in claimed[free:]:
                            with contextlib.suppress(Exception):
                                await self.release(job_id)
                        claimed = claimed[:free]
                for job_id in claimed:
                    self.jobs_started += 1
                    task = asyncio.create_task(self._run_job(job_id), name=f"job-{job_id}")
                    self._running[job_id] = task
                    task.add_done_callback(functools.partial(self._done, job_id))
                if claimed and len(self._running) < self.concurrency:
                    continue  # there may be more due work
                jitter = self.poll_seconds * random.uniform(0.9, 1.1)
                await self.services.wait_for_wake(jitter)
        finally:
            await self._shutdown()

    async def _record_liveness(self) -> None:
        """Leave a timestamp for system-health-check, at most every 15 s (internal settings key)."""
        now = self.now()
        if self._beat_at is not None and (now - self._beat_at).total_seconds() < LIVENESS_SECONDS:
            return
        self._beat_at = now
        try:
            async with self.services.db.write() as session:
                query = self.services.db.for_update(select(Setting).where(Setting.key == LIVENESS_KEY))
                row = (await session.execute(query)).scalar_one_or_none()
                if row is None:
                    try:
                        async with session.begin_nested():
                            first = {self.worker_id: iso(now)}
                            session.add(Setting(key=LIVENESS_KEY, value=first, is_secret=False, updated_at=now))
                        return
                    except IntegrityError:  # another process created the row at the same moment (PostgreSQL)
                        row = (await session.execute(query)).scalar_one()
                beats = {
                    w: at
                    for w, at in dict(row.value or {}).items()
                    if isinstance(at, str) and at >= iso(now - timedelta(hours=1))
                }
                beats[self.worker_id] = iso(now)
                row.value = beats
                row.updated_at = now
        except Exception:
            log.debug("could not record worker liveness", exc_info=True)

    def _done(self, job_id: int, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self.services.wake()

    def stop(self) -> None:
        self._stopping.set()
        self.services.wake()

    async def _shutdown(self, grace: float = 5.0) -> None:
        """Stop claiming; cancel running steps and hand their jobs back (engine.md §5.1 step 3)."""
        tasks = list(self._running.items())
        for _, task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait([t for _, t in tasks], timeout=grace)
        for job_id, _ in tasks:
            with contextlib.suppress(Exception):
                await self.release(job_id)

    async def release(self, job_id: int) -> None:
        now = self.now()
        async with self.services.db.write() as session:
            await session.execute(
                update(Job)
                .where(Job.job_id == job_id, Job.status == st.PROCESSING, Job.lease_owner == self.worker_id)
                .values(
                    status=st.PENDING,
                    run_at=now,
                    attempts=Job.attempts - 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        log.info("released job %s on shutdown", job_id)

    # --- running one job ---------------------------------------------------------------------

    async def _run_job(self, job_id: int) -> None:
        try:
            job = await self._run_step(job_id)
            while job is not None:
                job = await self._run_step(job_id, job)
        except LeaseLost:
            await self._lease_lost(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: unexpected worker error; handing the job to lease recovery now", job_id)
            await self._recover_now(job_id)

    async def _recover_now(self, job_id: int) -> None:
        """After an unexpected error (e.g. a step commit that failed on a transient database error),
        expire this worker's own lease and run lease recovery (engine.md §11.4) for the job at once:
        requeued with the transport backoff, or failed after max_attempts, instead of sitting in
        ``processing`` for a whole lease TTL."""
        now = self.now()
        try:
            async with self.services.db.write() as session:
                voided = await session.execute(
                    update(Job)
                    .where(Job.job_id == job_id, Job.status == st.PROCESSING, Job.lease_owner == self.worker_id)
                    .values(lease_expires_at=now - timedelta(seconds=1))
                    .execution_options(synchronize_session=False)
                )
            if rowcount(voided):
                await recover(self.services, job_id=job_id, now=now)
        except Exception:
            log.exception("job %s: immediate recovery failed; the lease will expire and recovery takes over", job_id)

    async def _lease_lost(self, job_id: int) -> None:
        log.warning("job %s: lease lost; step abandoned", job_id)
        with contextlib.suppress(Exception):
            async with self.services.db.write() as session:
                await write_log(
                    session,
                    "warning",
                    f"Job {job_id}: lease lost, step abandoned",
                    {"job_id": job_id, "lease_owner": self.worker_id},
                )

    async def _run_step(self, job_id: int, job: Job | None = None) -> Job | None:
        """Run the job's current step and commit it; returns the job to continue inline with, if any.

        ``job`` is the row as the previous step's commit left it (inline continuation), which saves
        reading it again.
        """
        services = self.services
        snap = await services.snapshot()
        if job is None:
            async with services.db.read() as session:
                job = await session.get(Job, job_id)
        if job is None or job.status != st.PROCESSING or job.lease_owner != self.worker_id:
            return None
        data = job.engine_data or {}
        started = self.now()
        try:
            plan = plan_of(data)
        except PlanError as err:
            await self._commit_plain(job, snap, fail_plan_result(err.code, err.message), started)
            return None
        fsid = job.current_step_id or plan.first["flow_step_id"]
        step = step_config(data, fsid)
        if step is None or plan.get(fsid) is None:
            await self._commit_plain(
                job,
                snap,
                fail_plan_result("step_config_missing", f"Step {fsid} is not in the job's snapshot."),
                started,
            )
            return None
        run = StepRun(
            services=services,
            job=job,
            flow_step_id=fsid,
            step=step,
            plan=plan,
            settings=snap,
            worker_id=self.worker_id,
            now=self.now,
        )
        threshold = str(snap["log_level"])
        if level_allows("debug", threshold):  # no transaction for a row the threshold would drop
            async with services.db.write() as session:
                await write_log(
                    session,
                    "debug",
                    f"Step {fsid} started",
                    {
                        "job_id": job_id,
                        "flow_id": job.flow_key,
                        "pipeline_id": job.pipeline_key,
                        "flow_step_id": fsid,
                        "step_type": run.step_type,
                        "attempt": job.attempts,
                        "worker_id": self.worker_id,
                    },
                    agent_id=job.agent_id,
                    user_id=job.user_id or None,
                    threshold=str(snap["log_level"]),
                )
        result = await self._execute(run)
        now = self.now()
        async with services.db.write() as session:
            committed = await commit_step(session, run, result, started_at=started, now=now)
        await services.announce(committed.changes.jobs, committed.changes.flows)
        if committed.created_children:
            services.wake()
        if committed.notify:
            task = asyncio.create_task(post_wait_notification(services, snap, job, fsid, committed.notify))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)
        return committed.job if committed.continue_inline else None

    async def _commit_plain(self, job: Job, snap: object, result: StepResult, started: datetime) -> None:
        """Commit a failure found before the step could run (plan or step config problems)."""
        from datamachine_mcp.engine.plan import Plan

        fsid = job.current_step_id or ""
        run = StepRun(
            services=self.services,
            job=job,
            flow_step_id=fsid,
            step={"step_type": "unknown"},
            plan=Plan(()),
            settings=snap,  # type: ignore[arg-type]
            worker_id=self.worker_id,
            now=self.now,
        )
        async with self.services.db.write() as session:
            committed = await commit_step(session, run, result, started_at=started, now=self.now())
        await self.services.announce(committed.changes.jobs, committed.changes.flows)

    async def _execute(self, run: StepRun) -> StepResult:
        """Run the step with a timeout and a heartbeat; map exceptions to failed results."""
        timeout = run.settings.int("step_timeout_seconds")
        lost = asyncio.Event()
        step_task = asyncio.create_task(asyncio.wait_for(executor(run.step_type)(run), timeout))
        beat = asyncio.create_task(self._heartbeat(run, step_task, lost))
        try:
            return await step_task
        except asyncio.CancelledError:
            if lost.is_set():
                raise LeaseLost(run.job.job_id) from None
            raise
        except LeaseLost:
            raise
        except Exception as exc:  # a step's failure is data, not a crash
            return result_from_exception(exc)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beat

    async def _heartbeat(self, run: StepRun, step_task: asyncio.Task[StepResult], lost: asyncio.Event) -> None:
        ttl = run.settings.int("lease_ttl_seconds")
        claim_ttl = run.settings.int("claim_ttl_seconds")
        while True:
            await asyncio.sleep(ttl / 4)
            now = self.now()
            async with self.services.db.write() as session:
                result = await session.execute(
                    update(Job)
                    .where(Job.job_id == run.job.job_id, Job.status == st.PROCESSING, Job.lease_owner == self.worker_id)
                    # updated_at is left alone: it marks real changes, which notifications follow.
                    .values(lease_expires_at=now + timedelta(seconds=ttl))
                    .execution_options(synchronize_session=False)
                )
                if rowcount(result):
                    await push_expiry(session, run.job.job_id, now + timedelta(seconds=claim_ttl))
            if not rowcount(result):
                lost.set()
                step_task.cancel()
                return
