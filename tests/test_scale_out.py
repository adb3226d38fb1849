"""Scale-out on PostgreSQL (docs/engine.md, Guarantees): several ``datamachine-mcp worker`` processes on one database.

* 2,000 runs of a one-step flow, first on two worker processes, then on four (two more join while
  the queue drains): every job runs exactly once and all four processes take part.
* A 10,000-item feed (``http_json`` from a local server), two ways:
  - five runs, one after the other, take the next 100 items each (max_items) and fan out to 500
    child jobs in all, run by four processes: each item reaches exactly one child, once;
  - 20 runs of the flow race for the same items at the same time (50 each): no item goes to two runs.
  The full fan-out of one run into 10,000 child jobs does not fit this test's time budget on two
  cores (measured: the fetch-and-fan-out commit alone takes minutes, and each child's completion
  re-reads the parent's 10,000 packets); the variants above exercise the same claim, transfer and
  settlement paths on the full-size feed.
* Claiming takes exactly the number of jobs asked for, whatever plan PostgreSQL picks.
* LISTEN/NOTIFY: a dropped listening connection is re-opened, and NOTIFY still wakes the worker.

Only on PostgreSQL: skipped when DATAMACHINE_TEST_PG_URL is unset (whatever --backend says).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.engine.host import EngineHost
from datamachine_mcp.engine.jobs import create_flow_job
from datamachine_mcp.engine.plan import resolve_plan
from datamachine_mcp.engine.store import JobStore
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime
from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.models import Flow, Job, LogEntry, Pipeline, ProcessedItem, Setting
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import PG_URL_ENV, _wipe_postgres, call, connect
from tests.fake_servers import FakeResponse, FakeServer, serve
from tests.test_scheduler import until
from tests.test_worker_process import Workers, wait_exit

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

JOBS = 2000
ITEMS = 10_000
FANOUT_RUNS, FANOUT_PER = 5, 100  # runs that fan out (one after the other), children each
RACE_RUNS, RACE_PER = 20, 50  # concurrent runs racing for items, items each
ECHO = {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {"n": 1}}}


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[Runtime]:
    url = os.environ.get(PG_URL_ENV)
    if not url:
        pytest.skip(f"scale-out needs PostgreSQL: set {PG_URL_ENV}")
    await _wipe_postgres(url)
    rt = await open_runtime(ProcessConfig(db=url, data_dir=tmp_path, toolsets=None))
    try:
        yield rt
    finally:
        await rt.db.dispose()


@pytest.fixture
def workers(pg: Runtime, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(pg, tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def feed() -> Iterator[FakeServer]:
    with serve() as fake:
        fake.script("/items", FakeResponse(200, [{"id": f"item-{i:05d}", "title": f"Item {i}"} for i in range(ITEMS)]))
        yield fake


async def scalar(rt: Runtime, sql: str, **params: Any) -> Any:
    async with rt.db.read() as s:
        return (await s.execute(text(sql), params)).scalar()


async def statuses(rt: Runtime) -> dict[str, int]:
    async with rt.db.read() as s:
        rows = await s.execute(select(Job.status, func.count()).group_by(Job.status))
        return {status: n for status, n in rows.all()}


async def drained(rt: Runtime, total: int) -> bool:
    return (await statuses(rt)).get("completed", 0) >= total


async def all_final(rt: Runtime) -> bool:
    counts = await statuses(rt)
    return bool(counts) and not any(counts.get(s) for s in ("pending", "processing", "waiting"))


async def stop(workers: Workers) -> None:
    for proc in workers.procs:
        proc.send_signal(signal.SIGTERM)
    for proc in workers.procs:
        assert await wait_exit(proc, 30) == 0, workers.log(proc)


async def bulk_runs(rt: Runtime, flow_id: int, count: int, first: int = 0) -> None:
    """``count`` manual runs of the flow, created by the engine's own job creation (as run-flow does)."""
    async with rt.db.write() as s:
        flow = await s.get(Flow, flow_id)
        pipeline = await s.get(Pipeline, flow.pipeline_id)
        plan = resolve_plan(flow.flow_config)
        for i in range(first, first + count):
            await create_flow_job(
                s,
                flow=flow,
                pipeline=pipeline,
                plan=plan,
                trigger="manual",
                initial_data={},
                dry_run=False,
                idempotency_key=f"scale:{flow_id}:{i}",
                request={"i": i},
                max_attempts=3,
                now=utcnow(),
            )


async def test_2000_jobs_on_two_then_four_workers_run_exactly_once(pg, workers):
    async with connect(pg) as owner:
        await call(owner, "update-settings", {"settings": {"log_level": "debug"}})
        made = await call(owner, "create-pipeline", {"pipeline_name": "Echo", "workflow": {"steps": [ECHO]}})
    third = JOBS // 3
    await bulk_runs(pg, made["flow_id"], third)
    started = time.monotonic()
    for _ in range(2):
        workers.start(concurrency=4)

    async def a_third_done() -> bool:
        return (await statuses(pg)).get("completed", 0) >= third

    await until(a_third_done, 150, 0.2)
    for _ in range(2):
        workers.start(concurrency=4)

    async def four_live() -> bool:  # the late two are up (their loops have recorded liveness)
        async with pg.db.read() as s:
            beats = (await s.execute(select(Setting.value).where(Setting.key == "worker_heartbeat"))).scalar()
        live = {w.split(":")[1] for w in beats or {}}
        return {str(p.pid) for p in workers.procs} <= live

    await until(four_live, 60, 0.1)
    # The rest arrives while four processes run: all of them take part, and none takes a job twice.
    await bulk_runs(pg, made["flow_id"], JOBS - third, first=third)

    async def done() -> bool:
        return await drained(pg, JOBS)

    await until(done, 240, 0.2)
    elapsed = time.monotonic() - started
    await stop(workers)
    print(f"\n{JOBS} jobs on 2→4 worker processes in {elapsed:.1f}s ({JOBS / elapsed:.0f} jobs/s)")

    assert await statuses(pg) == {"completed": JOBS}
    async with pg.db.read() as s:
        jobs = (await s.execute(select(Job.job_id, Job.attempts))).all()
        started_logs = (
            await s.execute(select(LogEntry.job_id, LogEntry.context).where(LogEntry.message.like("Step % started")))
        ).all()
        final_logs = (
            await s.execute(select(LogEntry.job_id).where(LogEntry.message.like("Job % completed")))
        ).scalars()
        final_counts = Counter(final_logs)
        lost = (
            await s.execute(
                select(func.count())
                .select_from(LogEntry)
                .where(LogEntry.message.like("%lease lost%") | LogEntry.message.like("%expired; requeued%"))
            )
        ).scalar()
    # every job was claimed once, its step started once, and it finished once
    assert {a for _, a in jobs} == {1}
    per_job = Counter(job_id for job_id, _ in started_logs)
    assert len(per_job) == JOBS and set(per_job.values()) == {1}
    assert len(final_counts) == JOBS and set(final_counts.values()) == {1}
    assert lost == 0
    # all four processes ran jobs, and the two that joined late took part
    by_worker = Counter(ctx["worker_id"] for _, ctx in started_logs)
    pids = [str(p.pid) for p in workers.procs]
    assert sorted(w.split(":")[1] for w in by_worker) == sorted(pids)
    assert all(by_worker[w] > 0 for w in by_worker)


async def feed_flow(feed: FakeServer, max_items: int, *, then_echo: bool) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {
            "step_type": "fetch",
            "handler_slugs": ["http_json"],
            "handler_configs": {"http_json": {"url": feed.url("/items"), "max_items": max_items}},
        }
    ]
    if then_echo:
        steps.append(ECHO)
    return {"pipeline_name": "Feed", "workflow": {"steps": steps}}


async def processed_rows(rt: Runtime, fsid: str) -> list[tuple[str, str, int | None]]:
    async with rt.db.read() as s:
        rows = await s.execute(
            select(ProcessedItem.item_identifier, ProcessedItem.status, ProcessedItem.job_id).where(
                ProcessedItem.flow_step_id == fsid
            )
        )
        return [tuple(r) for r in rows.all()]


async def test_10000_item_feed_fans_out_to_child_jobs_on_four_workers(pg, workers, feed):
    """FANOUT_RUNS runs, one after the other, each fetch the 10,000-item feed and take the next 100 items
    (max_items), fanning out to one child job per item; four processes run the children. Each item
    reaches exactly one child and ends processed once; later runs skip what earlier runs took."""
    async with connect(pg) as owner:
        made = await call(owner, "create-pipeline", await feed_flow(feed, FANOUT_PER, then_echo=True))
    fsid = made["flow_step_ids"][0]
    started = time.monotonic()
    for _ in range(4):
        workers.start(concurrency=4)
    parents = []
    async with connect(pg) as owner:
        for _ in range(FANOUT_RUNS):
            parents.append((await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"]}))["job_id"])

            async def fanned_out(parent: int = parents[-1]) -> bool:
                return bool(
                    await scalar(pg, "SELECT count(*) FROM datamachine_jobs WHERE parent_job_id = :p", p=parent)
                )

            await until(fanned_out, 120, 0.1)

    async def done() -> bool:
        return await all_final(pg)

    await until(done, 240, 0.2)
    elapsed = time.monotonic() - started
    await stop(workers)
    total = FANOUT_RUNS * FANOUT_PER
    print(f"\n{ITEMS}-item feed: {FANOUT_RUNS} runs fanned out to {total} children on 4 processes in {elapsed:.1f}s")

    assert await statuses(pg) == {"completed": FANOUT_RUNS + total}
    assert len(feed.to("/items")) == FANOUT_RUNS
    async with pg.db.read() as s:
        results = (await s.execute(select(Job.engine_data["batch_results"]).where(Job.job_id.in_(parents)))).scalars()
        children = (
            await s.execute(
                select(Job.job_id, Job.parent_job_id, Job.engine_data, Job.attempts).where(
                    Job.parent_job_id.is_not(None)
                )
            )
        ).all()
    batch = {"completed": FANOUT_PER, "failed": 0, "skipped": 0, "cancelled": 0, "total": FANOUT_PER}
    assert list(results) == [batch] * FANOUT_RUNS
    # each child got one item and ran once; no item went to two children; runs took the items in order
    assert {a for *_, a in children} == {1}
    delivered = {data["item_identifier"]: job_id for job_id, _, data, _ in children}
    assert len(delivered) == len(children) == total
    by_run = {p: sorted(d["item_identifier"] for _, parent, d, _ in children if parent == p) for p in parents}
    assert [by_run[p] for p in parents] == [
        [f"item-{i:05d}" for i in range(k * FANOUT_PER, (k + 1) * FANOUT_PER)] for k in range(FANOUT_RUNS)
    ]
    # every taken item is processed once, by its child; the rest of the feed is untouched
    rows = await processed_rows(pg, fsid)
    assert len(rows) == total and {st for _, st, _ in rows} == {"processed"}
    assert {ident: job_id for ident, _, job_id in rows} == delivered


async def test_concurrent_runs_of_a_feed_never_share_an_item(pg, workers, feed):
    """RACE_RUNS runs of one flow fetch the 10,000-item feed at the same time on four processes, each
    taking RACE_PER items (max_items): they all pick the same first items, so the claims collide at
    commit and the losers back-fill from their reserves. Every run must commit at its first try, get
    RACE_PER items no other run got, and each item must end processed once."""
    async with connect(pg) as owner:
        # a failed step commit is retried after 1 s (not 15 s), so a defect shows as a retry, not a stall
        await call(owner, "update-settings", {"settings": {"retry_transport_base_seconds": 1}})
        made = await call(owner, "create-pipeline", await feed_flow(feed, RACE_PER, then_echo=False))
    fsid = made["flow_step_ids"][0]
    await bulk_runs(pg, made["flow_id"], RACE_RUNS)
    started = time.monotonic()
    for _ in range(4):
        workers.start(concurrency=4)

    async def done() -> bool:
        return await all_final(pg)

    await until(done, 240, 0.2)
    elapsed = time.monotonic() - started
    await stop(workers)
    print(f"\n{RACE_RUNS} concurrent runs x {RACE_PER} items of a {ITEMS}-item feed in {elapsed:.1f}s")

    assert await statuses(pg) == {"completed": RACE_RUNS}
    # each run fetched once and committed its step at the first try: the claim races between
    # concurrent commits are settled inside the commit, never by a retry
    logs = [workers.log(proc) for proc in workers.procs]
    errors = [line for log in logs for line in log.splitlines() if line.startswith("ERROR")]
    assert errors == [], "\n".join(log for log in logs if "ERROR" in log)
    assert len(feed.to("/items")) == RACE_RUNS
    async with pg.db.read() as s:
        jobs = (await s.execute(select(Job.job_id, Job.packets))).all()
    delivered = {p["metadata"]["item_identifier"]: job_id for job_id, packets in jobs for p in packets}
    per_job = Counter(job_id for job_id, packets in jobs for _ in packets)
    assert set(per_job.values()) == {RACE_PER} and len(per_job) == RACE_RUNS
    assert sum(per_job.values()) == RACE_RUNS * RACE_PER == len(delivered)  # no item went to two runs
    rows = await processed_rows(pg, fsid)
    assert len(rows) == RACE_RUNS * RACE_PER and {st for _, st, _ in rows} == {"processed"}
    assert {ident: job_id for ident, _, job_id in rows} == delivered


async def test_a_dropped_listen_connection_is_reopened(pg):
    host = EngineHost(pg.engine, concurrency=1, poll_seconds=30)
    await host.start()
    query = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE 'LISTEN%datamachine_jobs%' AND pid <> pg_backend_pid()"
    )
    try:

        async def listening() -> bool:
            return await scalar(pg, query) is not None

        await until(listening, 10, 0.1)
        first = await scalar(pg, query)
        await scalar(pg, "SELECT pg_terminate_backend(:pid)", pid=first)

        async def relistening() -> bool:
            pid = await scalar(pg, query)
            return pid is not None and pid != first

        await until(relistening, 20, 0.2)
        # a job created by another process wakes this worker through NOTIFY (its poll interval is 30 s)
        other = await open_runtime(ProcessConfig(db=pg.db.url, data_dir=pg.data_dir, toolsets=None))
        try:
            async with connect(other) as owner:
                made = await call(owner, "create-pipeline", {"pipeline_name": "E", "workflow": {"steps": [ECHO]}})
                job_id = (await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"]}))["job_id"]
        finally:
            await other.db.dispose()

        async def completed() -> bool:
            return await scalar(pg, "SELECT status FROM datamachine_jobs WHERE job_id = :j", j=job_id) == "completed"

        await until(completed, 10, 0.05)
    finally:
        await host.stop(grace=5)


async def test_a_claim_never_takes_more_than_asked_whatever_the_plan(pg):
    """Regression: ``IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`` claimed thousands of fan-out children
    in one statement when PostgreSQL chose a nested loop semi join (the subquery is re-run per row).
    Here that plan is forced; the claim must still take exactly n jobs."""
    async with connect(pg) as owner:
        made = await call(owner, "create-pipeline", {"pipeline_name": "Echo", "workflow": {"steps": [ECHO]}})
    await bulk_runs(pg, made["flow_id"], 60)
    db = Database(pg.db.url)

    async def worst_plan(conn: Any) -> None:
        for setting in ("enable_hashagg", "enable_hashjoin", "enable_mergejoin", "enable_material", "enable_sort"):
            await conn.execute(f"SET {setting} = off")

    store = JobStore(db, setup=worst_plan)

    async def claim_due(worker_id: str) -> list[int]:
        now = utcnow()
        async with store.transaction() as tx:
            rows = await tx.claim(worker_id, 4, now=now, lease_expires_at=now + timedelta(seconds=120))
        return [r.job_id for r in rows]

    try:
        first = await claim_due("w:1:aaaaaaaa")
        second = await claim_due("w:2:bbbbbbbb")
    finally:
        await db.dispose()
    assert len(first) == 4 and len(second) == 4 and not set(first) & set(second)
    assert first == sorted(first) and max(first) < min(second)  # run_at, then job_id order
    assert await statuses(pg) == {"processing": 8, "pending": 52}
