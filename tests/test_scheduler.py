"""The scheduler (docs/engine.md, Scheduling): firing on the grid, cron across DST, pause/resume, downtime,
one-time runs, overlap, backpressure and inactive agents; one lease and one job per slot.

The scheduler is driven by a fake clock (``Scheduler(services, now=clock)``) and ``tick()`` is called
by the test; only the one-time test that needs a job to finish runs a real EngineHost.
"""

from __future__ import annotations

import asyncio
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from sqlalchemy import select, update

from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.engine.accounting import Changes
from datamachine_mcp.engine.host import EngineHost
from datamachine_mcp.engine.scheduler import LEASE_KEY, Scheduler
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime
from datamachine_mcp.storage.models import Flow, Job, Setting
from datamachine_mcp.storage.timeutil import iso, parse_datetime, utcnow
from tests.conftest import call, log_rows

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

ECHO = {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {"hello": "world"}}}
BERLIN = ZoneInfo("Europe/Berlin")


class Clock:
    """A settable clock for ``Scheduler(now=...)``."""

    def __init__(self, start: datetime) -> None:
        self.t = start

    def __call__(self) -> datetime:
        return self.t

    def set(self, t: datetime) -> None:
        self.t = t


def stagger(flow_id: int, seconds: int) -> int:
    """The stagger (docs/engine.md, Next run and stagger), written out independently of the implementation."""
    return zlib.crc32(f"datamachine_stagger_{flow_id}".encode()) % min(seconds, 3600)


def key(flow_id: int, slot: datetime) -> str:
    return f"schedule:{flow_id}:{int(slot.timestamp())}"


async def new_flow(client: Any, name: str = "Scheduled", **extra: Any) -> int:
    out = await call(client, "create-pipeline", {"pipeline_name": name, "workflow": {"steps": [ECHO]}, **extra})
    return out["flow_id"]


async def set_schedule(client: Any, flow_id: int, schedule: dict[str, Any]) -> dict[str, Any]:
    return (await call(client, "update-flow", {"flow_id": flow_id, "scheduling_config": schedule}))["flow_data"]


async def schedule_as_of(runtime: Any, flow_id: int, schedule: dict[str, Any], now: datetime) -> datetime | None:
    """Store a schedule exactly as update-flow would have at ``now`` (for dates the real clock is not at)."""
    config, next_run, _ = sched.apply(None, sched.normalize(schedule), flow_id=flow_id, now=now)
    async with runtime.db.write() as s:
        await s.execute(
            update(Flow).where(Flow.flow_id == flow_id).values(scheduling_config=config, next_run_at=next_run)
        )
    return next_run


async def flow_out(client: Any, flow_id: int) -> dict[str, Any]:
    return (await call(client, "get-flows", {"flow_id": flow_id}))["flows"][0]


async def jobs_of(runtime: Any, flow_id: int) -> list[Job]:
    async with runtime.db.read() as s:
        return list((await s.execute(select(Job).where(Job.flow_key == flow_id).order_by(Job.job_id))).scalars())


async def keys_of(runtime: Any, flow_id: int) -> list[str | None]:
    return [j.idempotency_key for j in await jobs_of(runtime, flow_id)]


async def fire(scheduler: Scheduler, clock: Clock, at: datetime) -> dict[str, int]:
    clock.set(at)
    return await scheduler.tick()


async def until(predicate: Any, seconds: float = 10, step: float = 0.05) -> None:
    """Poll an async predicate until it is true (fails the test after ``seconds``)."""
    with anyio.fail_after(seconds):
        while True:
            if await predicate():
                return
            await anyio.sleep(step)


NOTHING = {"fired": 0, "skipped": 0, "deferred": 0, "lost": 0}


def counts(**kw: int) -> dict[str, int]:
    return {**NOTHING, **kw}


# --- the grid, the lease, one job per slot ------------------------------------------------------


async def test_every_5_minutes_fires_on_the_staggered_grid_once_per_slot(runtime, owner):
    fid = await new_flow(owner)
    before = utcnow().replace(microsecond=0)
    data = await set_schedule(owner, fid, {"interval": "every_5_minutes", "allow_overlap": True})
    after = utcnow()
    first = parse_datetime(data["scheduling_config"]["first_run"])
    offset = timedelta(seconds=stagger(fid, 300))
    assert before + offset <= first <= after + offset
    assert data["next_run"] == iso(first)

    clock = Clock(first - timedelta(seconds=1))
    scheduler = Scheduler(runtime.engine, now=clock)
    assert await scheduler.tick() == NOTHING  # not due yet
    assert await fire(scheduler, clock, first) == counts(fired=1)
    assert await scheduler.tick() == NOTHING  # same slot, same instant: nothing more
    jobs = await jobs_of(runtime, fid)
    assert [(j.idempotency_key, j.run_trigger, j.status) for j in jobs] == [(key(fid, first), "schedule", "pending")]
    assert jobs[0].created_at == first and jobs[0].run_at == first
    flow = await flow_out(owner, fid)
    assert flow["next_run"] == iso(first + timedelta(minutes=5)) == flow["scheduling_config"]["next_run"]
    assert flow["last_run"] == iso(first)

    assert await fire(scheduler, clock, first + timedelta(seconds=299)) == NOTHING
    assert await fire(scheduler, clock, first + timedelta(seconds=300)) == counts(fired=1)
    # a late tick fires the slot it observed (the key names the slot, not the tick) and keeps the grid
    assert await fire(scheduler, clock, first + timedelta(seconds=607)) == counts(fired=1)
    assert await scheduler.tick() == NOTHING
    assert await keys_of(runtime, fid) == [key(fid, first + timedelta(minutes=m)) for m in (0, 5, 10)]
    assert (await flow_out(owner, fid))["next_run"] == iso(first + timedelta(minutes=15))
    assert (await flow_out(owner, fid))["scheduling_config"]["first_run"] == iso(first)  # the anchor never moves


async def test_two_schedulers_one_lease_and_one_job_per_slot(runtime, owner):
    fid = await new_flow(owner)
    data = await set_schedule(owner, fid, {"interval": "every_5_minutes", "allow_overlap": True})
    first = parse_datetime(data["next_run"])
    # a second process on the same database (its own connections and worker id)
    other = await open_runtime(ProcessConfig(db=runtime.db.url, data_dir=runtime.data_dir, toolsets=None))
    try:
        clock = Clock(first)
        a = Scheduler(runtime.engine, now=clock)
        b = Scheduler(other.engine, now=clock)
        assert a.holder != b.holder

        assert await a.tick() == counts(fired=1)
        assert await b.tick() == NOTHING  # a holds the lease
        assert b.last_tick_at is None
        slot = first + timedelta(minutes=5)
        assert await fire(a, clock, slot) == counts(fired=1)
        assert await b.tick() == NOTHING
        # a stops ticking (its process died): once its lease expired, b takes over
        slot = first + timedelta(minutes=10)
        assert await fire(b, clock, slot) == counts(fired=1)
        assert await a.tick() == NOTHING  # now b holds it
        async with runtime.db.read() as s:
            lease = (await s.execute(select(Setting.value).where(Setting.key == LEASE_KEY))).scalar()
        assert lease == {"owner": b.holder, "expires_at": iso(slot + timedelta(seconds=30))}
        # a graceful stop releases the lease at once
        await b.release()
        clock.set(slot + timedelta(seconds=1))
        assert await a.tick() == NOTHING and a.last_tick_at == clock()
        assert await keys_of(runtime, fid) == [key(fid, first + timedelta(minutes=m)) for m in (0, 5, 10)]

        # A race past the lease: both handle the same due slot at once. The row lock and the
        # compare-and-set on next_run_at let exactly one fire; the other sees the slot taken.
        slot = first + timedelta(minutes=15)
        clock.set(slot)
        snap = await runtime.engine.snapshot()
        outcomes = await asyncio.gather(
            a._handle(fid, slot, snap, Changes()),
            b._handle(fid, slot, snap, Changes()),
        )
        assert sorted(outcomes) == ["fired", "lost"]
        assert len(await jobs_of(runtime, fid)) == 4

        # Even if a scheduler acted on a stale slot (the CAS somehow passed), the idempotency key
        # schedule:{flow_id}:{slot} returns the job already created for it.
        async with runtime.db.write() as s:
            await s.execute(update(Flow).where(Flow.flow_id == fid).values(next_run_at=slot))
        assert await a.tick() == counts(fired=1)
        keys = await keys_of(runtime, fid)
        assert keys == [key(fid, first + timedelta(minutes=m)) for m in (0, 5, 10, 15)]
        assert (await flow_out(owner, fid))["next_run"] == iso(slot + timedelta(minutes=5))
    finally:
        await other.db.dispose()


async def test_concurrent_first_lease_takers_get_exactly_one_lease(runtime):
    """Several processes starting at once on an empty database: one creates the lease row, the others
    are refused cleanly (no error from the concurrent insert)."""
    others = [
        await open_runtime(ProcessConfig(db=runtime.db.url, data_dir=runtime.data_dir, toolsets=None)) for _ in range(3)
    ]
    try:
        schedulers = [Scheduler(rt.engine) for rt in (runtime, *others)]
        results = await asyncio.gather(*(s.acquire(30) for s in schedulers))
        assert sorted(results) == [False, False, False, True]
        async with runtime.db.read() as s:
            lease = (await s.execute(select(Setting.value).where(Setting.key == LEASE_KEY))).scalar()
        assert lease["owner"] == schedulers[results.index(True)].holder
    finally:
        for rt in others:
            await rt.db.dispose()


async def test_manual_and_paused_flows_are_never_selected(runtime, owner):
    manual = await new_flow(owner, "Manual")
    paused = await new_flow(owner, "Paused")
    await set_schedule(owner, paused, {"interval": "hourly", "enabled": False})
    clock = Clock(utcnow() + timedelta(days=40))
    assert await Scheduler(runtime.engine, now=clock).tick() == NOTHING
    assert await jobs_of(runtime, manual) == [] and await jobs_of(runtime, paused) == []


# --- cron and DST --------------------------------------------------------------------------------


async def run_cron(runtime, owner, fid: int, start: datetime, fires: int) -> list[datetime]:
    """Tick exactly at each next_run, ``fires`` times; returns the fired slots (job creation times)."""
    clock = Clock(start)
    scheduler = Scheduler(runtime.engine, now=clock)
    for _ in range(fires):
        nxt = parse_datetime((await flow_out(owner, fid))["next_run"])
        assert await fire(scheduler, clock, nxt - timedelta(seconds=1)) == NOTHING
        assert await fire(scheduler, clock, nxt) == counts(fired=1)
    jobs = await jobs_of(runtime, fid)
    assert [j.idempotency_key for j in jobs] == [key(fid, j.created_at) for j in jobs]
    return [j.created_at for j in jobs]


async def test_cron_fires_at_local_nine_on_both_sides_of_each_dst_change(runtime, owner):
    fid = await new_flow(owner)
    cron = {"interval": "cron", "cron_expression": "0 9 * * *", "timezone": "Europe/Berlin", "allow_overlap": True}

    # spring forward on Sunday 2026-03-29: CET (UTC+1) → CEST (UTC+2)
    start = datetime(2026, 3, 26, 12, 0, tzinfo=UTC)
    assert await schedule_as_of(runtime, fid, cron, start) == datetime(2026, 3, 27, 8, 0, tzinfo=UTC)
    slots = await run_cron(runtime, owner, fid, start, 4)
    assert [s.astimezone(BERLIN).strftime("%m-%d %H:%M %Z") for s in slots] == [
        "03-27 09:00 CET",
        "03-28 09:00 CET",
        "03-29 09:00 CEST",
        "03-30 09:00 CEST",
    ]
    assert [s.hour for s in slots] == [8, 8, 7, 7]  # in UTC
    assert (await flow_out(owner, fid))["next_run"] == "2026-03-31T07:00:00Z"

    # fall back on Sunday 2026-10-25: CEST → CET
    start = datetime(2026, 10, 22, 12, 0, tzinfo=UTC)
    await schedule_as_of(runtime, fid, {**cron, "cron_expression": "0 9 * * *"}, start)
    slots = (await run_cron(runtime, owner, fid, start, 4))[4:]
    assert [s.astimezone(BERLIN).strftime("%m-%d %H:%M %Z") for s in slots] == [
        "10-23 09:00 CEST",
        "10-24 09:00 CEST",
        "10-25 09:00 CET",
        "10-26 09:00 CET",
    ]
    assert [s.hour for s in slots] == [7, 7, 8, 8]


async def test_cron_skips_a_nonexistent_local_time_and_fires_a_repeated_one_once(runtime, owner):
    fid = await new_flow(owner)
    cron = {"interval": "cron", "cron_expression": "30 2 * * *", "timezone": "Europe/Berlin", "allow_overlap": True}
    start = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)
    await schedule_as_of(runtime, fid, cron, start)
    slots = await run_cron(runtime, owner, fid, start, 2)
    # 02:30 does not exist on 2026-03-29 (clocks jump from 02:00 to 03:00): that day has no run
    assert [iso(s) for s in slots] == ["2026-03-28T01:30:00Z", "2026-03-30T00:30:00Z"]

    start = datetime(2026, 10, 24, 12, 0, tzinfo=UTC)
    await schedule_as_of(runtime, fid, cron, start)
    slots = (await run_cron(runtime, owner, fid, start, 2))[2:]
    # 02:30 happens twice on 2026-10-25 (02:30 CEST, then 02:30 CET): it fires once, the first time
    assert [iso(s) for s in slots] == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]


def test_next_cron_wall_clock_rules():
    """Cron matching on the pure function: strictly after, in the zone, gaps skipped, folds once."""
    berlin = "Europe/Berlin"

    def walk(expression: str, start: datetime, n: int) -> list[str]:
        out, t = [], start
        for _ in range(n):
            t = sched.next_cron(expression, berlin, t)
            out.append(iso(t))
        return out

    # hourly across the fall-back: local 02:00 exists twice and fires once
    assert walk("0 * * * *", datetime(2026, 10, 24, 23, 30, tzinfo=UTC), 3) == [
        "2026-10-25T00:00:00Z",  # 02:00 CEST
        "2026-10-25T02:00:00Z",  # 03:00 CET (02:00 CET was the repeat)
        "2026-10-25T03:00:00Z",
    ]
    # hourly across the spring-forward: local 02:00 does not exist
    assert walk("0 * * * *", datetime(2026, 3, 28, 23, 30, tzinfo=UTC), 2) == [
        "2026-03-29T00:00:00Z",  # 01:00 CET
        "2026-03-29T01:00:00Z",  # 03:00 CEST
    ]
    # starting inside the repeated hour (its second pass) never goes back to it
    assert sched.next_cron("45 2 * * *", berlin, datetime(2026, 10, 25, 1, 10, tzinfo=UTC)) == datetime(
        2026, 10, 26, 1, 45, tzinfo=UTC
    )
    # strictly after: a start exactly on a match returns the next one
    assert sched.next_cron("0 9 * * *", "UTC", datetime(2026, 5, 1, 9, 0, tzinfo=UTC)) == datetime(
        2026, 5, 2, 9, 0, tzinfo=UTC
    )


# --- pause, resume, downtime -------------------------------------------------------------------


async def test_paused_flow_does_not_fire_and_resumes_on_its_grid(runtime, owner):
    fid = await new_flow(owner)
    # the hourly schedule was set three hours ago
    set_at = utcnow().replace(microsecond=0) - timedelta(hours=3)
    first = await schedule_as_of(runtime, fid, {"interval": "hourly", "allow_overlap": True}, set_at)
    assert first == set_at + timedelta(seconds=stagger(fid, 3600))
    clock = Clock(first)
    scheduler = Scheduler(runtime.engine, now=clock)
    assert await scheduler.tick() == counts(fired=1)

    out = await call(owner, "pause-flow", {"flow_id": fid})
    assert out["flows"] == [{"flow_id": fid, "status": "paused"}]
    flow = await flow_out(owner, fid)
    assert flow["next_run"] is None and flow["enabled"] is False
    for hours in (1, 2, 5):
        assert await fire(scheduler, clock, first + timedelta(hours=hours)) == NOTHING
    assert len(await jobs_of(runtime, fid)) == 1

    before = utcnow()
    out = await call(owner, "resume-flow", {"flow_id": fid})
    after = utcnow()
    resumed = parse_datetime(out["flows"][0]["next_run"])
    # the first slot of the original grid after now: no new stagger, no catch-up of paused slots
    assert (resumed - first).total_seconds() % 3600 == 0
    assert before < resumed <= after + timedelta(hours=1)
    assert resumed - timedelta(hours=1) <= after
    flow = await flow_out(owner, fid)
    assert flow["enabled"] is True and flow["scheduling_config"]["first_run"] == iso(first)
    assert "enabled" not in flow["scheduling_config"]

    clock.set(utcnow())
    assert await scheduler.tick() == NOTHING
    assert await fire(scheduler, clock, resumed) == counts(fired=1)
    assert await keys_of(runtime, fid) == [key(fid, first), key(fid, resumed)]


async def test_after_three_hours_of_downtime_an_hourly_flow_catches_up_once(runtime, owner):
    fid = await new_flow(owner)
    first = parse_datetime((await set_schedule(owner, fid, {"interval": "hourly"}))["next_run"])
    clock = Clock(first)
    scheduler = Scheduler(runtime.engine, now=clock)
    assert await scheduler.tick() == counts(fired=1)
    await finish_jobs(runtime, fid)

    # down from just after the first run until 3 h 10 min later: the slots +1 h, +2 h, +3 h were missed
    assert await fire(scheduler, clock, first + timedelta(hours=3, minutes=10)) == counts(fired=1)
    assert await scheduler.tick() == NOTHING
    jobs = await jobs_of(runtime, fid)
    assert [j.idempotency_key for j in jobs] == [key(fid, first), key(fid, first + timedelta(hours=1))]
    assert jobs[1].created_at == clock()
    # next_run is the first future slot on the grid
    assert (await flow_out(owner, fid))["next_run"] == iso(first + timedelta(hours=4))
    assert await fire(scheduler, clock, first + timedelta(hours=4) - timedelta(seconds=1)) == NOTHING


async def finish_jobs(runtime: Any, flow_id: int) -> None:
    """Mark the flow's active jobs completed (stands in for a worker where only the schedule matters)."""
    async with runtime.db.write() as s:
        await s.execute(
            update(Job)
            .where(Job.flow_key == flow_id, Job.status.in_(("pending", "processing")))
            .values(status="completed", completed_at=utcnow(), lease_owner=None, lease_expires_at=None)
        )


# --- one-time schedules ------------------------------------------------------------------------


async def test_one_time_fires_once_and_reverts_to_manual_when_its_job_is_final(runtime, owner):
    fid = await new_flow(owner)
    past = int(utcnow().timestamp()) - 30  # within the minute a one-time run may lie in the past
    out = await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": past})
    assert out["schedule_type"] == "one_time"
    clock = Clock(utcnow())
    scheduler = Scheduler(runtime.engine, now=clock)
    assert await scheduler.tick() == counts(fired=1)  # a past timestamp fires at the next tick
    slot = datetime.fromtimestamp(past, UTC)
    [job] = await jobs_of(runtime, fid)
    assert job.idempotency_key == key(fid, slot) and job.run_trigger == "schedule"
    # fired: no next run, but the schedule stays one_time until the job is final
    flow = await flow_out(owner, fid)
    assert flow["next_run"] is None
    assert flow["scheduling_config"] == {"interval": "one_time", "timestamp": past}
    clock.set(clock() + timedelta(days=1))
    assert await scheduler.tick() == NOTHING

    await call(owner, "cancel-job", {"job_id": job.job_id})
    flow = await flow_out(owner, fid)
    assert flow["scheduling_config"] == {"interval": "manual"} and flow["next_run"] is None
    assert len(await jobs_of(runtime, fid)) == 1


async def test_one_time_run_by_the_engine_host_reverts_to_manual(runtime, owner):
    await call(owner, "update-settings", {"settings": {"scheduler_tick_seconds": 1}})
    fid = await new_flow(owner)
    when = int(utcnow().timestamp()) + 1
    await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": when})
    host = EngineHost(runtime.engine, concurrency=2, poll_seconds=0.2)
    await host.start()
    try:

        async def reverted() -> bool:
            return (await flow_out(owner, fid))["scheduling_config"] == {"interval": "manual"}

        await until(reverted, 20)
    finally:
        await host.stop(grace=5)
    [job] = await jobs_of(runtime, fid)
    assert (job.status, job.run_trigger, job.idempotency_key) == (
        "completed",
        "schedule",
        key(fid, datetime.fromtimestamp(when, UTC)),
    )
    assert job.packets[0]["data"]["result"] == {"hello": "world"}
    flow = await flow_out(owner, fid)
    assert flow["next_run"] is None and flow["last_run_status"] == "completed"


# --- overlap, backpressure, inactive agents ------------------------------------------------------


async def test_overlap_skips_the_slot_while_a_run_is_pending_or_processing(runtime, owner):
    fid = await new_flow(owner)
    first = parse_datetime((await set_schedule(owner, fid, {"interval": "hourly"}))["next_run"])
    hour = timedelta(hours=1)
    clock = Clock(first)
    scheduler = Scheduler(runtime.engine, now=clock)
    assert await scheduler.tick() == counts(fired=1)
    [job] = await jobs_of(runtime, fid)

    # pending run → the next slot is skipped, the grid advances, last_skip says why
    assert await fire(scheduler, clock, first + hour) == counts(skipped=1)
    flow = await flow_out(owner, fid)
    assert flow["scheduling_config"]["last_skip"] == {"reason": "overlap", "at": iso(first + hour)}
    assert flow["next_run"] == iso(first + 2 * hour)
    skips = [r for r in await log_rows(runtime) if (r["context"] or {}).get("reason") == "overlap"]
    assert len(skips) == 1 and skips[0]["level"] == "info"
    assert skips[0]["context"] == {
        "flow_id": fid,
        "pipeline_id": flow["pipeline_id"],
        "reason": "overlap",
        "slot": iso(first + hour),
    }

    # processing run → skipped too
    async with runtime.engine.store.transaction() as tx:
        taken = await tx.claim(
            "elsewhere:1:abcdef01", 5, now=clock(), lease_expires_at=clock() + timedelta(seconds=120)
        )
    assert [r.job_id for r in taken] == [job.job_id]
    assert await fire(scheduler, clock, first + 2 * hour) == counts(skipped=1)
    # a parked (waiting) run does not block the schedule
    async with runtime.db.write() as s:
        await s.execute(
            update(Job)
            .where(Job.job_id == job.job_id)
            .values(status="waiting", lease_owner=None, lease_expires_at=None)
        )
    assert await fire(scheduler, clock, first + 3 * hour) == counts(fired=1)
    assert len(await jobs_of(runtime, fid)) == 2
    # last_skip is kept as the record of the most recent skip
    assert (await flow_out(owner, fid))["scheduling_config"]["last_skip"]["reason"] == "overlap"

    # allow_overlap (set at the fake clock's time): a due slot fires although a run is pending
    nxt = await schedule_as_of(runtime, fid, {"interval": "hourly", "allow_overlap": True}, clock())
    assert await fire(scheduler, clock, nxt) == counts(fired=1)
    assert [j.status for j in await jobs_of(runtime, fid)] == ["waiting", "pending", "pending"]


async def test_overlap_defers_a_one_time_slot_instead_of_losing_it(runtime, owner):
    fid = await new_flow(owner)
    manual = await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": fid})
    past = int(utcnow().timestamp()) - 5
    await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": past})
    clock = Clock(utcnow())
    scheduler = Scheduler(runtime.engine, now=clock)
    assert await scheduler.tick() == counts(deferred=1)
    flow = await flow_out(owner, fid)
    assert flow["next_run"] == iso(clock() + timedelta(seconds=60))
    assert flow["scheduling_config"]["last_skip"] == {"reason": "overlap", "at": iso(clock())}
    assert flow["scheduling_config"]["interval"] == "one_time"
    assert len(await jobs_of(runtime, fid)) == 1

    await call(owner, "cancel-job", {"job_id": manual["job_id"]})
    # a manual run's end does not revert a one-time schedule
    assert (await flow_out(owner, fid))["scheduling_config"]["interval"] == "one_time"
    assert await fire(scheduler, clock, clock() + timedelta(seconds=60)) == counts(fired=1)
    assert [j.run_trigger for j in await jobs_of(runtime, fid)] == ["manual", "schedule"]


async def test_backpressure_defers_without_moving_the_grid(runtime, owner):
    await call(owner, "update-settings", {"settings": {"max_active_jobs": 2}})
    busy = await new_flow(owner, "Busy")
    fid = await new_flow(owner)
    first = parse_datetime((await set_schedule(owner, fid, {"interval": "hourly"}))["next_run"])
    for _ in range(2):
        await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": busy})
    clock = Clock(first)
    scheduler = Scheduler(runtime.engine, now=clock)
    defer = timedelta(seconds=60 + zlib.crc32(str(fid).encode()) % 30)

    assert await scheduler.tick() == counts(deferred=1)
    flow = await flow_out(owner, fid)
    assert flow["next_run"] == iso(first + defer)
    assert flow["scheduling_config"]["last_skip"] == {"reason": "queue_backpressure", "at": iso(first)}
    assert flow["scheduling_config"]["first_run"] == iso(first)
    assert await jobs_of(runtime, fid) == []
    # still at the limit when the deferral is due: deferred again
    assert await fire(scheduler, clock, first + defer) == counts(deferred=1)
    assert (await flow_out(owner, fid))["next_run"] == iso(first + 2 * defer)

    # capacity frees up: the deferred run fires and the next run is back on the grid
    await finish_jobs(runtime, busy)
    assert await fire(scheduler, clock, first + 2 * defer) == counts(fired=1)
    assert (await flow_out(owner, fid))["next_run"] == iso(first + timedelta(hours=1))
    # 0 disables backpressure
    await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": busy})
    await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": busy})
    await call(owner, "update-settings", {"settings": {"max_active_jobs": 0}})
    nxt = await schedule_as_of(runtime, fid, {"interval": "hourly", "allow_overlap": True}, clock())
    assert await fire(scheduler, clock, nxt) == counts(fired=1)


async def test_flows_of_an_inactive_agent_skip_and_advance(runtime, owner):
    agent_id = (await call(owner, "create-agent", {"agent_slug": "sleepy"}))["agent_id"]
    fid = await new_flow(owner, agent_id=agent_id)
    first = parse_datetime((await set_schedule(owner, fid, {"interval": "hourly"}))["next_run"])
    await call(owner, "update-agent", {"agent_id": agent_id, "status": "inactive"})
    clock = Clock(first)
    scheduler = Scheduler(runtime.engine, now=clock)
    assert await scheduler.tick() == counts(skipped=1)
    flow = await flow_out(owner, fid)
    assert flow["scheduling_config"]["last_skip"] == {"reason": "agent_inactive", "at": iso(first)}
    assert flow["next_run"] == iso(first + timedelta(hours=1))
    assert await jobs_of(runtime, fid) == []
    await call(owner, "update-agent", {"agent_id": agent_id, "status": "active"})
    assert await fire(scheduler, clock, first + timedelta(hours=1)) == counts(fired=1)


async def test_run_loop_ticks_and_releases_its_lease_on_stop(runtime, owner):
    await call(owner, "update-settings", {"settings": {"scheduler_tick_seconds": 1}})
    fid = await new_flow(owner)
    await set_schedule(owner, fid, {"interval": "every_5_minutes"})
    # due now
    async with runtime.db.write() as s:
        await s.execute(update(Flow).where(Flow.flow_id == fid).values(next_run_at=utcnow() - timedelta(seconds=1)))
    scheduler = Scheduler(runtime.engine)
    task = asyncio.create_task(scheduler.run())
    try:

        async def fired() -> bool:
            return bool(await jobs_of(runtime, fid))

        await until(fired)
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 10)
    async with runtime.db.read() as s:
        lease = (await s.execute(select(Setting.value).where(Setting.key == LEASE_KEY))).scalar()
    assert lease == {"owner": None, "expires_at": None}
