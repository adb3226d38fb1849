"""The in-process engine while its SQLite database has no engine work: its loops (and SQLAlchemy) wait
for work found by a light probe, it keeps a worker heartbeat, and work of every kind starts them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from sqlalchemy import text, update

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.engine import retention
from datamachine_mcp.engine.idle import LazyEngineHost
from datamachine_mcp.engine.maintenance import housekeeping
from datamachine_mcp.storage.models import Flow, Setting
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import call
from tests.jobs_support import echo_step, make_flow, run, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
async def lazy(runtime: Runtime) -> AsyncIterator[LazyEngineHost]:
    """The idle engine of a database whose daily retention already ran (so nothing is due yet)."""
    assert await retention.claim_due(runtime.engine, utcnow())
    host = LazyEngineHost(runtime.engine, concurrency=2, poll_seconds=0.1)
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


async def _completed(client, flow_id: int) -> bool:
    jobs = (await call(client, "get-jobs", {"flow_id": flow_id}))["jobs"]
    return bool(jobs) and jobs[0]["status"] == "completed"


async def test_an_idle_engine_keeps_its_heartbeat_and_runs_a_job_created_here(runtime, owner, lazy):
    flow = await make_flow(owner, [echo_step(said="hi")])
    await anyio.sleep(0.5)  # several polls
    assert lazy.host is None  # a flow without a schedule is no engine work
    health = await call(owner, "system-health-check", {"types": ["worker"]})
    assert health["results"]["worker"]["message"] == "1 worker(s) active in the last 60 s"
    await run(owner, flow["flow_id"])
    await wait_until(lambda: _completed(owner, flow["flow_id"]), 10)
    assert lazy.host is not None


async def test_a_schedule_coming_due_starts_the_idle_engine(runtime, owner, lazy):
    await call(owner, "update-settings", {"settings": {"scheduler_tick_seconds": 1}})
    flow = await make_flow(owner, [echo_step(said="tick")])
    due = int(datetime.now(UTC).timestamp()) + 2
    await call(
        owner,
        "update-flow",
        {"flow_id": flow["flow_id"], "scheduling_config": {"interval": "one_time", "timestamp": due}},
    )
    assert lazy.host is None
    await wait_until(lambda: _completed(owner, flow["flow_id"]), 20)


async def test_the_probe_finds_what_the_loops_would_act_on(runtime, owner):
    probe = LazyEngineHost(runtime.engine, concurrency=1)
    assert probe.probe() == "retention is due"  # never ran
    assert await retention.claim_due(runtime.engine, utcnow())
    assert probe.probe() is None
    async with runtime.db.write() as session:  # the last run is a day old
        stale = utcnow() - timedelta(hours=25)
        await session.execute(update(Setting).where(Setting.key == retention.LAST_RUN_KEY).values(updated_at=stale))
    assert probe.probe() == "retention is due"
    assert await retention.claim_due(runtime.engine, utcnow())

    flow = await make_flow(owner, [echo_step(said="x")])
    schedule = {"flow_id": flow["flow_id"], "scheduling_config": {"interval": "daily"}}
    await call(owner, "update-flow", schedule)
    assert probe.probe() is None  # next run tomorrow
    async with runtime.db.write() as session:  # a recurring flow that lost its next run
        await session.execute(update(Flow).where(Flow.flow_id == flow["flow_id"]).values(next_run_at=None))
    assert probe.probe() == "a recurring flow without a next run"
    snap = await runtime.engine.snapshot()
    assert (await housekeeping(runtime.engine, snap, utcnow()))["next_runs_restored"] == 1
    assert probe.probe() is None

    await run(owner, flow["flow_id"])  # no engine runs here: the job stays pending
    assert probe.probe() == "unfinished jobs"
    async with runtime.db.write() as session:
        await session.execute(text("UPDATE datamachine_jobs SET status = 'completed'"))
    assert probe.probe() is None
    async with runtime.db.write() as session:  # the flow is due
        await session.execute(update(Flow).values(next_run_at=utcnow() - timedelta(seconds=1)))
    assert probe.probe() == "a due flow"
