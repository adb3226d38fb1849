"""The scheduler: fires due flows (docs/engine.md, The scheduler loop; Overlap and backpressure).

Only one scheduler acts at a time per database: a lease row (internal settings key
``scheduler_lease``) is taken and renewed under a row lock, so several processes can run the loop
safely. Each due flow is handled in its own transaction with a compare-and-set on ``next_run_at``, and
fired jobs carry the key ``schedule:{flow_id}:{slot}``, so a slot can never fire twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.accounting import Changes, finish
from datamachine_mcp.engine.jobs import create_flow_job, empty_first_queue, flow_job_columns, pending_job
from datamachine_mcp.engine.plan import PlanError, resolve_plan
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.db import is_transient_conflict
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import Agent, Flow, Job, Pipeline, Setting
from datamachine_mcp.storage.timeutil import iso, parse_datetime, utcnow

log = logging.getLogger("datamachine.scheduler")

LEASE_KEY = "scheduler_lease"
BATCH = 100
ONE_TIME_DEFER_SECONDS = 60


class Scheduler:
    def __init__(self, services: EngineServices, *, now: Callable[[], datetime] = utcnow) -> None:
        self.services = services
        self.now = now
        self.holder = services.worker_id
        self.last_tick_at: datetime | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            interval = 5
            try:
                snap = await self.services.snapshot()
                interval = snap.int("scheduler_tick_seconds")
                await self.tick()
            except Exception as exc:
                if is_transient_conflict(exc):
                    log.warning("scheduler tick met a concurrent change; trying again next tick")
                else:
                    log.exception("scheduler tick failed; trying again next tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)
        await self.release()

    def stop(self) -> None:
        self._stop.set()

    # --- the lease ------------------------------------------------------------------------------

    async def acquire(self, ttl_seconds: int) -> bool:
        """Take or renew the scheduler lease; False while another live process holds it."""
        now = self.now()
        db = self.services.db
        async with db.write() as session:
            row = (
                await session.execute(db.for_update(select(Setting).where(Setting.key == LEASE_KEY)))
            ).scalar_one_or_none()
            value = {"owner": self.holder, "expires_at": iso(now + timedelta(seconds=ttl_seconds))}
            if row is None:
                try:
                    async with session.begin_nested():
                        session.add(Setting(key=LEASE_KEY, value=value, is_secret=False, updated_at=now))
                except IntegrityError:
                    return False  # another process created the lease row at the same moment (PostgreSQL)
                return True
            current = row.value or {}
            expires = current.get("expires_at")
            if current.get("owner") != self.holder and expires and parse_datetime(expires) > now:
                return False
            row.value = value
            row.updated_at = now
            return True

    async def release(self) -> None:
        db = self.services.db
        with contextlib.suppress(Exception):
            async with db.write() as session:
                row = (
                    await session.execute(db.for_update(select(Setting).where(Setting.key == LEASE_KEY)))
                ).scalar_one_or_none()
                if row is not None and (row.value or {}).get("owner") == self.holder:
                    row.value = {"owner": None, "expires_at": None}
                    row.updated_at = self.now()

    # --- one tick -------------------------------------------------------------------------------

    async def tick(self) -> dict[str, int]:
        """Fire every due flow once (if this process holds the lease). Returns counts by outcome."""
        snap = await self.services.snapshot()
        tick_seconds = snap.int("scheduler_tick_seconds")
        counts = {"fired": 0, "skipped": 0, "deferred": 0, "lost": 0}
        if not await self.acquire(max(30, tick_seconds * 4)):
            return counts
        self.last_tick_at = self.now()
        now = self.now()
        async with self.services.db.read() as session:
            due = (
                await session.execute(
                    select(Flow.flow_id, Flow.next_run_at)
                    .where(Flow.next_run_at.is_not(None), Flow.next_run_at <= now)
                    .order_by(Flow.next_run_at, Flow.flow_id)
                    .limit(BATCH)
                )
            ).all()
        changes = Changes()
        for flow_id, slot in due:
            assert slot is not None  # the query selects flows with a next_run_at
            outcome = await self._handle(flow_id, slot, snap, changes)
            counts[outcome] += 1
        if changes.jobs or changes.flows:
            await self.services.announce(changes.jobs, changes.flows)
        if counts["fired"]:
            self.services.wake()
        return counts

    async def _handle(self, flow_id: int, slot: datetime, snap: Any, changes: Changes) -> str:
        db = self.services.db
        now = self.now()
        threshold = str(snap["log_level"])
        async with db.write() as session:
            flow = (
                await session.execute(db.for_update(select(Flow).where(Flow.flow_id == flow_id)))
            ).scalar_one_or_none()
            if flow is None or flow.next_run_at is None or flow.next_run_at != slot:
                return "lost"  # another scheduler handled it, or the schedule changed
            schedule = dict(flow.scheduling_config or {})
            reason, defer_to = await self._decide(session, flow, schedule, snap, now)
            if reason is None:
                await self._fire(session, flow, slot, snap, now, changes)
                next_run = sched.upcoming(schedule, flow_id=flow.flow_id, now=now, after_slot=slot)
                outcome = "fired"
            elif defer_to is not None:
                next_run = defer_to
                outcome = "deferred"
            else:
                next_run = sched.upcoming(schedule, flow_id=flow.flow_id, now=now, after_slot=slot)
                outcome = "skipped"
            if reason is not None:
                schedule["last_skip"] = {"reason": reason, "at": iso(now)}
                await write_log(
                    session,
                    "info",
                    f"Scheduled run of flow {flow.flow_id} {outcome}: {reason}",
                    {"flow_id": flow.flow_id, "pipeline_id": flow.pipeline_id, "reason": reason, "slot": iso(slot)},
                    agent_id=flow.agent_id,
                    user_id=flow.user_id or None,
                    threshold=threshold,
                )
            schedule = sched.with_next_run(schedule, next_run)
            await session.execute(
                update(Flow)
                .where(Flow.flow_id == flow.flow_id, Flow.next_run_at == slot)
                .values(next_run_at=next_run, scheduling_config=schedule, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            changes.flows.add((flow.flow_id, flow.pipeline_id))
            return outcome

    async def _decide(
        self, session: Any, flow: Flow, schedule: dict[str, Any], snap: Any, now: datetime
    ) -> tuple[str | None, datetime | None]:
        """docs/engine.md, Overlap and backpressure, in order. Returns (skip or defer reason, deferral time)."""
        if flow.agent_id is not None:
            status = (await session.execute(select(Agent.status).where(Agent.agent_id == flow.agent_id))).scalar()
            if status == "inactive":
                return "agent_inactive", None
        if not schedule.get("allow_overlap"):
            running = (
                await session.execute(
                    select(Job.job_id).where(Job.flow_key == flow.flow_id, Job.status.in_(st.RUNNING)).limit(1)
                )
            ).scalar()
            if running is not None:
                if schedule.get("interval") == "one_time":
                    return "overlap", now + timedelta(seconds=ONE_TIME_DEFER_SECONDS)
                return "overlap", None
        limit = snap.int("max_active_jobs")
        if limit > 0:
            active = (
                await session.execute(select(func.count()).select_from(Job).where(Job.status.in_(st.RUNNING)))
            ).scalar() or 0
            if active >= limit:
                return "queue_backpressure", now + timedelta(seconds=60 + zlib.crc32(str(flow.flow_id).encode()) % 30)
        try:
            plan = resolve_plan(flow.flow_config)
        except PlanError:
            return None, None  # fired anyway: an invalid plan becomes a failed job, visible in the flow's health
        if empty_first_queue(plan, flow.flow_config or {}):
            return "empty_drain_queue", None
        return None, None

    async def _fire(self, session: Any, flow: Flow, slot: datetime, snap: Any, now: datetime, changes: Changes) -> None:
        pipeline = await session.get(Pipeline, flow.pipeline_id)
        key = f"schedule:{flow.flow_id}:{int(slot.timestamp())}"
        threshold = str(snap["log_level"])
        try:
            plan = resolve_plan(flow.flow_config)
        except PlanError as err:
            await create_failed_run(
                self.services,
                session,
                flow,
                pipeline,
                trigger="schedule",
                key=key,
                err=err,
                now=now,
                threshold=threshold,
                changes=changes,
            )
            return
        created = await create_flow_job(
            session,
            flow=flow,
            pipeline=pipeline,
            plan=plan,
            trigger="schedule",
            initial_data={},
            dry_run=False,
            idempotency_key=key,
            request={"flow_id": flow.flow_id, "slot": iso(slot)},
            max_attempts=snap.int("retry_max_attempts"),
            now=now,
            threshold=threshold,
        )
        changes.jobs.add(created.job.job_id)


async def create_failed_run(
    services: EngineServices,
    session: Any,
    flow: Flow,
    pipeline: Pipeline,
    *,
    trigger: str,
    key: str | None,
    err: PlanError,
    now: datetime,
    threshold: str,
    changes: Changes,
) -> tuple[int, str]:
    """An automated run (schedule, webhook) of an invalid flow is created and failed at once, so flow health
    shows it (there is no caller to tell). Returns the job's id and status."""
    job = pending_job(
        trigger=trigger,
        now=now,
        idempotency_key=key,
        plan=None,
        engine_data={
            "flow": {"flow_id": flow.flow_id, "name": flow.flow_name},
            "pipeline": {"pipeline_id": pipeline.pipeline_id, "name": pipeline.pipeline_name},
            "dry_run_mode": False,
        },
        **flow_job_columns(flow, pipeline),
    )
    session.add(job)
    await session.flush()
    flow.last_run_at = now
    error = {"reason": err.code, "flow_step_id": None, "message": err.message, "class": None}
    async with services.store.bind(session) as tx:
        row = await tx.get_job(job.job_id)
        assert row is not None
        done = await finish(
            tx,
            row,
            st.FAILED,
            err.code,
            now=now,
            guard="status",
            allowed=(st.PENDING,),
            engine_updates={"error": error},
            threshold=threshold,
        )
    changes.merge(done)
    return job.job_id, st.FAILED
