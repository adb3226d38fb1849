"""Engine throughput and pickup latency: trivial 2-step jobs on SQLite with one in-process worker.

    python bench/engine.py [--jobs 1000] [--concurrency 4] [--rate R] [--latency-jobs 200] [--profile]

The job is the no-network pair ``system_task echo → system_task echo`` (a flow made with
create-pipeline in workflow mode), so only the engine is measured: claiming, the two steps, the two
step commits (the first continues inline), terminal accounting and the log rows they write.

1. **Throughput**: ``--jobs`` pending jobs are created up front (the way run-flow creates them), then
   one ``EngineHost`` (worker concurrency ``--concurrency``, plus the scheduler and maintenance loops)
   drains them. Prints jobs/s (goal ≥ 1,000).
2. **Latency**: jobs are created one at a time at ``--rate`` per second (default: half the measured
   throughput, so the worker is not saturated; each job in its own transaction followed by the
   in-process wake-up run-flow sends). Prints p50/p95/max of due→processing (``started_at −
   run_at``, goal p95 ≤ 250 ms) and of creation→completion.

The CPU time of the process is printed too: on a machine shared with other work the wall-clock rate
understates what one core does, and "jobs per CPU-second" is the rate with a core to itself.

``--profile`` runs phase 1 under cProfile and prints the most expensive functions.
``--count-statements`` counts the SQL statements of phase 1 on every SQLite connection of the process
(worker, scheduler and maintenance loops; transaction control included) and prints them per job.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _jobs import pending_runs  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from datamachine_mcp.abilities.access import Principal  # noqa: E402
from datamachine_mcp.abilities.registry import load_all  # noqa: E402
from datamachine_mcp.abilities.runner import invoke  # noqa: E402
from datamachine_mcp.engine import status as st  # noqa: E402
from datamachine_mcp.engine.host import EngineHost  # noqa: E402
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime  # noqa: E402
from datamachine_mcp.storage.models import Job  # noqa: E402

OWNER = Principal(user_id=1, is_admin=True, transport="stdio")
ECHO = {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {"n": 1}}}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


async def make_flow(runtime) -> int:
    abilities = load_all()
    out = await invoke(
        runtime,
        abilities["create-pipeline"],
        {"pipeline_name": "bench", "workflow": {"steps": [ECHO, ECHO]}},
        OWNER,
    )
    assert out.ok and out.output is not None, out.error
    return int(out.output["flow_id"])


async def create_jobs(runtime, flow_id: int, n: int) -> list[int]:
    """``n`` pending jobs in one transaction, as run-flow creates each one."""
    async with runtime.db.write() as session:
        ids = [job.job_id for job in await pending_runs(session, flow_id, n)]
    return ids


async def finished(runtime, since_id: int) -> int:
    async with runtime.db.read() as session:
        return int(
            (
                await session.execute(
                    select(func.count()).where(Job.job_id > since_id, Job.status.in_(tuple(st.FINAL)))
                )
            ).scalar()
            or 0
        )


async def wait_all(runtime, since_id: int, total: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while await finished(runtime, since_id) < total:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {await finished(runtime, since_id)} of {total} jobs final")
        await asyncio.sleep(0.2)


STATEMENTS: collections.Counter[str] = collections.Counter()
COUNTING = False


def count_statements() -> None:
    """Trace every SQLite connection opened from now on; statements are counted while COUNTING."""
    connect = sqlite3.connect

    def traced(*args, **kwargs):
        conn = connect(*args, **kwargs)

        def trace(sql: str) -> None:
            if COUNTING:
                words = sql.split()
                kind = " ".join(words[:2]) if words[0].upper() in ("BEGIN", "UPDATE", "DELETE") else words[0]
                if words[0].upper() == "INSERT":
                    kind = " ".join(words[:3])
                if words[0].upper() == "SELECT" and "FROM" in sql.upper():
                    kind = "SELECT " + sql.upper().split("FROM", 1)[1].split()[0].lower()
                STATEMENTS[kind] += 1

        conn.set_trace_callback(trace)
        return conn

    sqlite3.connect = traced


async def throughput(runtime, flow_id: int, jobs: int, concurrency: int, profile: bool) -> float:
    global COUNTING
    before = await max_id(runtime)
    await create_jobs(runtime, flow_id, jobs)
    COUNTING = True
    host = EngineHost(runtime.engine, concurrency=concurrency)
    profiler = cProfile.Profile(time.process_time) if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    await host.start()
    await wait_all(runtime, before, jobs, limit=600)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler:
        profiler.disable()
    await host.stop()
    COUNTING = False
    if STATEMENTS:
        total = sum(STATEMENTS.values())
        print(f"statements: {total / jobs:.2f} per job (all connections, phase 1):")
        for kind, n in STATEMENTS.most_common():
            print(f"    {n / jobs:6.2f}  {kind}")
    async with runtime.db.read() as session:
        statuses = (
            await session.execute(select(Job.status, func.count()).where(Job.job_id > before).group_by(Job.status))
        ).all()
    rate = jobs / elapsed
    print(
        f"throughput: {jobs} jobs in {elapsed:.2f} s = {rate:,.0f} jobs/s  (goal >= 1,000)  statuses {dict(statuses)}"
    )
    print(
        f"            CPU of this process {cpu:.2f} s = {cpu / jobs * 1000:.2f} ms per job; "
        f"{jobs / cpu:,.0f} jobs per CPU-second (the rate with a core to itself)"
    )
    if profiler:
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
        stats.print_stats(25)
        print("--- cProfile (CPU time), phase 1, by own time ---")
        print("\n".join(stream.getvalue().splitlines()[:45]))
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(
            r"engine|storage|sqlalchemy/orm/session", 30
        )
        print("--- cProfile (CPU time), phase 1, by cumulative time (engine/storage) ---")
        print("\n".join(stream.getvalue().splitlines()[:50]))
    return rate


async def max_id(runtime) -> int:
    async with runtime.db.read() as session:
        return int((await session.execute(select(func.max(Job.job_id)))).scalar() or 0)


async def latency(runtime, flow_id: int, n: int, rate: float, concurrency: int) -> None:
    before = await max_id(runtime)
    host = EngineHost(runtime.engine, concurrency=concurrency)
    await host.start()
    await asyncio.sleep(0.5)  # let the loops settle
    interval = 1.0 / rate
    t_next = time.perf_counter()
    for _ in range(n):
        await create_jobs(runtime, flow_id, 1)
        runtime.engine.wake()  # what run-flow does after its commit
        t_next += interval
        await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
    await wait_all(runtime, before, n, limit=120)
    await host.stop()
    async with runtime.db.read() as session:
        rows = (
            await session.execute(
                select(Job.run_at, Job.started_at, Job.created_at, Job.completed_at).where(Job.job_id > before)
            )
        ).all()
    pickup = [(s - r).total_seconds() * 1000 for r, s, _, _ in rows]
    total = [(d - c).total_seconds() * 1000 for _, _, c, d in rows]
    print(
        f"latency at {rate:g} jobs/s ({n} jobs): due->processing p50 {statistics.median(pickup):.1f} ms, "
        f"p95 {pct(pickup, 95):.1f} ms, max {max(pickup):.1f} ms  (goal p95 <= 250 ms)"
    )
    print(
        f"                     creation->completed p50 {statistics.median(total):.1f} ms, "
        f"p95 {pct(total, 95):.1f} ms, max {max(total):.1f} ms"
    )


async def main(args: argparse.Namespace) -> None:
    if args.count_statements:
        count_statements()
    tmp = Path(tempfile.mkdtemp(prefix="dm-bench-engine-"))
    try:
        runtime = await open_runtime(ProcessConfig(db=str(tmp / "bench.db"), data_dir=tmp))
        try:
            flow_id = await make_flow(runtime)
            print(
                f"SQLite {tmp / 'bench.db'}; job = system_task echo -> system_task echo; one in-process "
                f"EngineHost, worker concurrency {args.concurrency}"
            )
            rate = await throughput(runtime, flow_id, args.jobs, args.concurrency, args.profile)
            await latency(runtime, flow_id, args.latency_jobs, args.rate or max(1.0, round(rate / 2)), args.concurrency)
        finally:
            await runtime.db.dispose()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs drained in the throughput phase")
    parser.add_argument("--concurrency", type=int, default=4, help="worker concurrency")
    parser.add_argument(
        "--rate",
        type=float,
        default=0,
        help="arrival rate of the latency phase in jobs/s (default: half the throughput)",
    )
    parser.add_argument("--latency-jobs", type=int, default=200, help="jobs created in the latency phase")
    parser.add_argument("--profile", action="store_true", help="profile the throughput phase")
    parser.add_argument("--count-statements", action="store_true", help="count SQL statements per job")
    asyncio.run(main(parser.parse_args()))
