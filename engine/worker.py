"""The worker: claims due jobs under a lease, runs their steps, commits each step.

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

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.accounting import may_hold_claims
from datamachine_mcp.engine.commit import Committed, commit_step, fail_plan_result, needs_session, result_from_exception
from datamachine_mcp.engine.idle import LIVENESS_KEY, LIVENESS_SECONDS, merge_beats
from datamachine_mcp.engine.notify import post_wait_notification
from datamachine_mcp.engine.plan import Plan, PlanError, plan_of, step_config
from datamachine_mcp.engine.recovery import recover
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.steps import LeaseLost, StepResult, StepRun, executor
from datamachine_mcp.engine.store import GuardMissed, JobRow, StoreTx
from datamachine_mcp.engine.store.group import GroupCommitter
from datamachine_mcp.engine.store.rows import restore, snapshot
from datamachine_mcp.storage.models import Setting
from datamachine_mcp.storage.settings_schema import Snapshot
from datamachine_mcp.storage.timeutil import iso, utcnow

log = logging.getLogger("datamachine.worker")

DEFAULT_CONCURRENCY = 4
POLL_SECONDS = 1.0


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
        self._group = GroupCommitter(services.store)

    @property
    def worker_id(self) -> str:
        return self.services.worker_id

    def now(self) -> datetime:
        return utcnow()

    async def run(self) -> None:
        """Claim and run jobs until ``stop()``."""
        # DEBUG: the process that owns the worker announces it (the worker CLI names the database too)
        log.debug("worker %s started (concurrency %s)", self.worker_id, self.concurrency)
        try:
            while not self._stopping.is_set():
                self.last_loop_at = self.now()
                await self._record_liveness()
                free = self.concurrency - len(self._running)
                claimed: list[JobRow] = []
                if free > 0:
                    try:
                        claimed = await self.claim(free)
                    except Exception:
                        log.exception("claiming jobs failed; retrying after the poll interval")
                    if len(claimed) > free:  # never expected: hand back what exceeds the free slots
                        for job in claimed[free:]:
                            with contextlib.suppress(Exception):
                                await self.release(job.job_id)
                        claimed = claimed[:free]
                for job in claimed:
                    self.jobs_started += 1
                    task = asyncio.create_task(self._run_job(job), name=f"job-{job.job_id}")
                    self._running[job.job_id] = task
                    task.add_done_callback(functools.partial(self._done, job.job_id))
                if claimed and len(self._running) < self.concurrency:
                    continue  # there may be more due work
                jitter = self.poll_seconds * random.uniform(0.9, 1.1)
                await self.services.wait_for_wake(jitter)
        finally:
            await self._shutdown()

    async def claim(self, limit: int) -> list[JobRow]:
        """Claim up to ``limit`` due jobs under a lease: full rows, so nothing is read again to start them."""
        snap = await self.services.snapshot()
        now = self.now()
        expires = now + timedelta(seconds=snap.int("lease_ttl_seconds"))
        # One statement, atomic by itself: on PostgreSQL no BEGIN/COMMIT round trips.
        async with self.services.store.autocommit() as tx:
            return await tx.claim(self.worker_id, limit, now=now, lease_expires_at=expires)

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
                row.value = merge_beats(row.value, self.worker_id, now)
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
        """Stop claiming; cancel running steps and hand their jobs back (pending again, attempt not counted)."""
        tasks = list(self._running.items())
        for _, task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait([t for _, t in tasks], timeout=grace)
        for job_id, _ in tasks:
            with contextlib.suppress(Exception):
                await self.release(job_id)

    async def release(self, job_id: int) -> None:
        async with self.services.store.transaction() as tx:
            await tx.release(job_id, self.worker_id, now=self.now())
        log.info("released job %s on shutdown", job_id)

    # --- running one job ---------------------------------------------------------------------

    async def _run_job(self, job: JobRow) -> None:
        plans: dict[int, Plan] = {}  # the snapshot's plan, resolved once per job
        try:
            while await self._run_step(job, plans):
                pass
        except LeaseLost:
            await self._lease_lost(job.job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: unexpected worker error; handing the job to lease recovery now", job.job_id)
            await self._recover_now(job.job_id)

    async def _recover_now(self, job_id: int) -> None:
        """After an unexpected error (e.g. a step commit that failed on a transient database error), expire
        this worker's own lease and run lease recovery for the job at once: requeued with the transport
        backoff, or failed after max_attempts, instead of sitting in ``processing`` for a whole lease TTL."""
        now = self.now()
        try:
            async with self.services.store.transaction() as tx:
                voided = await tx.void_lease(job_id, self.worker_id, expired_at=now - timedelta(seconds=1))
            if voided:
                await recover(self.services, job_id=job_id, now=now)
        except Exception:
            log.exception("job %s: immediate recovery failed; the lease will expire and recovery takes over", job_id)

    async def _lease_lost(self, job_id: int) -> None:
        log.warning("job %s: lease lost; step abandoned", job_id)
        with contextlib.suppress(Exception):
            async with self.services.store.transaction() as tx:
                tx.log(
                    "warning",
                    f"Job {job_id}: lease lost, step abandoned",
                    {"job_id": job_id, "lease_owner": self.worker_id},
                )

    async def _run_step(self, job: JobRow, plans: dict[int, Plan] | None = None) -> bool:
        """Run the job's current step and commit it; True when the job continues inline with its next step.

        ``job`` is the row as claimed, kept current by each commit, so it is never read again.
        """
        plans = {} if plans is None else plans
        services = self.services
        snap = await services.snapshot()
        if job.status != st.PROCESSING or job.lease_owner != self.worker_id:
            return False
        data = job.engine_data or {}
        started = self.now()
        try:
            plan = plans.get(job.job_id) or plans.setdefault(job.job_id, plan_of(data))
        except PlanError as err:
            await self._commit_plain(job, snap, fail_plan_result(err.code, err.message), started)
            return False
        fsid = job.current_step_id or plan.first["flow_step_id"]
        step = step_config(data, fsid)
        if step is None or plan.get(fsid) is None:
            missing = fail_plan_result("step_config_missing", f"Step {fsid} is not in the job's snapshot.")
            await self._commit_plain(job, snap, missing, started)
            return False
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
        result = await self._execute(run)
        committed = await self._commit(run, result, started, snap, step_started=True)
        if committed.notify:
            task = asyncio.create_task(post_wait_notification(services, snap, job, fsid, committed.notify))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)
        return committed.continue_inline

    async def _commit(
        self, run: StepRun, result: StepResult, started: datetime, snap: Snapshot, *, step_started: bool = False
    ) -> Committed:
        """The step commit in one transaction (with the ORM session when item claims move); then announce."""
        store = self.services.store
        threshold = str(snap["log_level"])
        try:
            if needs_session(run, result):  # item claims move: with the ORM, alone
                async with self.services.db.write() as session, store.bind(session) as tx:
                    self._step_started_log(tx, run, started, threshold, step_started)
                    committed = await commit_step(tx, run, result, started_at=started, now=self.now())
            else:
                before = snapshot(run.job)
                attempts: list[bool] = []

                async def work(tx: StoreTx) -> Committed:
                    if attempts:  # run again alone after a failed group: start from the row as it was
                        restore(run.job, before)
                    attempts.append(True)
                    self._step_started_log(tx, run, started, threshold, step_started)
                    return await commit_step(tx, run, result, started_at=started, now=self.now())

                data = run.job.engine_data or {}
                isolate = may_hold_claims(run.job) or bool(data.get("queue_backups"))
                committed = await self._group.submit(work, isolate=isolate)
        except GuardMissed:
            raise LeaseLost(run.job.job_id) from None
        await self.services.announce(committed.changes.jobs, committed.changes.flows)
        if committed.created_children:
            self.services.wake()
        return committed

    def _step_started_log(
        self, tx: StoreTx, run: StepRun, started: datetime, threshold: str, step_started: bool
    ) -> None:
        if not step_started:
            return
        job = run.job
        context = {
            "job_id": job.job_id,
            "flow_id": job.flow_key,
            "pipeline_id": job.pipeline_key,
            "flow_step_id": run.flow_step_id,
            "step_type": run.step_type,
            "attempt": job.attempts,
            "worker_id": self.worker_id,
        }
        owner = {"agent_id": job.agent_id, "user_id": job.user_id or None}
        tx.log("debug", f"Step {run.flow_step_id} started", context, threshold=threshold, at=started, **owner)

    async def _commit_plain(self, job: JobRow, snap: Snapshot, result: StepResult, started: datetime) -> None:
        """Commit a failure found before the step could run (plan or step config problems)."""
        run = StepRun(
            services=self.services,
            job=job,
            flow_step_id=job.current_step_id or "",
            step={"step_type": "unknown"},
            plan=Plan(()),
            settings=snap,
            worker_id=self.worker_id,
            now=self.now,
        )
        await self._commit(run, result, started, snap)

    async def _execute(self, run: StepRun) -> StepResult:
        """Run the step with a timeout and a heartbeat; map exceptions to failed results.

        The heartbeat starts only once the step has run for a quarter of the lease (a timer until then), so
        the many short steps cost no heartbeat task at all."""
        timeout = run.settings.int("step_timeout_seconds")
        lost = asyncio.Event()
        step_task = asyncio.create_task(self._timed(run, timeout))
        beats: list[asyncio.Task[None]] = []

        def start_heartbeat() -> None:
            beats.append(asyncio.create_task(self._heartbeat(run, step_task, lost)))

        timer = asyncio.get_running_loop().call_later(run.settings.int("lease_ttl_seconds") / 4, start_heartbeat)
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
            timer.cancel()
            for beat in beats:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await beat

    @staticmethod
    async def _timed(run: StepRun, seconds: float) -> StepResult:
        async with asyncio.timeout(seconds):
            return await executor(run.step_type)(run)

    async def _heartbeat(self, run: StepRun, step_task: asyncio.Task[StepResult], lost: asyncio.Event) -> None:
        """Renew the lease (and the job's claims) every quarter lease; a renewal that finds the lease gone
        cancels the step. Started a quarter lease into the step, so it renews at once."""
        ttl = run.settings.int("lease_ttl_seconds")
        claim_ttl = run.settings.int("claim_ttl_seconds")
        claims = may_hold_claims(run.job)
        store = self.services.store
        first = True
        while True:
            if not first:
                await asyncio.sleep(ttl / 4)
            first = False
            now = self.now()
            async with store.transaction() if claims else store.autocommit() as tx:
                alive = await tx.heartbeat(run.job.job_id, self.worker_id, now + timedelta(seconds=ttl))
                if alive and claims:
                    await tx.push_claims(run.job.job_id, now + timedelta(seconds=claim_ttl))
            if not alive:
                lost.set()
                step_task.cancel()
                return
