"""Our engine beside peer job queues, with the same trivial 2-step job (each step persisted).

    pip install -e '.[bench]'   # huey, procrastinate (+ psycopg): bench-only, never runtime dependencies
    python bench/peers.py --pg postgresql://dm:dm@127.0.0.1:5432/dm_bench [--jobs 2000] [--rounds 3]

Contestants, each in a fresh process and a fresh database, jobs created up front, timed from worker start
to the last completion:

* ``ours-sqlite`` / ``ours-pg``: a flow ``system_task echo → system_task echo`` run by one ``EngineHost``
  (worker concurrency ``--concurrency``), as ``datamachine-mcp`` runs it;
* ``raw-sqlite``: plain ``sqlite3`` doing the minimal durable writes of our own schema per job (the claim,
  two step commits with engine_data, the terminal log row, one commit per step): the floor of our model;
* ``huey-sqlite``: huey's SqliteHuey, a two-task pipeline, one consumer worker;
* ``procrastinate-pg``: procrastinate, step 1 defers step 2, one worker at ``--concurrency``.

Rounds alternate the contestants; medians of ``--rounds`` are printed as jobs/s with every ratio.
The PostgreSQL databases ``<db>_ours`` and ``<db>_proc`` are dropped and created again for each trial.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTESTANTS = ("ours-sqlite", "raw-sqlite", "huey-sqlite", "ours-pg", "procrastinate-pg")
ECHO = {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {"n": 1}}}


# --- our engine ------------------------------------------------------------------------------------


async def _our_jobs(url: str, data_dir: Path, jobs: int):
    """A runtime on ``url`` with a 2-step echo flow and ``jobs`` pending runs of it, as run-flow makes them."""
    from _jobs import pending_runs

    from datamachine_mcp.abilities.access import Principal
    from datamachine_mcp.abilities.registry import load_all
    from datamachine_mcp.abilities.runner import invoke
    from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime

    runtime = await open_runtime(ProcessConfig(db=url, data_dir=data_dir))
    owner = Principal(user_id=1, is_admin=True, transport="stdio")
    made = await invoke(
        runtime, load_all()["create-pipeline"], {"pipeline_name": "peers", "workflow": {"steps": [ECHO, ECHO]}}, owner
    )
    assert made.ok and made.output is not None, made.error
    flow_id = int(made.output["flow_id"])
    async with runtime.db.write() as session:
        await pending_runs(session, flow_id, jobs)
    return runtime


async def ours(url: str, data_dir: Path, jobs: int, concurrency: int) -> float:
    from sqlalchemy import func, select

    from datamachine_mcp.engine import status as st
    from datamachine_mcp.engine.host import EngineHost
    from datamachine_mcp.storage.models import Job
    from datamachine_mcp.storage.timeutil import utcnow

    runtime = await _our_jobs(url, data_dir, jobs)
    try:
        host = EngineHost(runtime.engine, concurrency=concurrency)
        start = utcnow()
        await host.start()
        while True:
            async with runtime.db.read() as session:
                done = (await session.execute(select(func.count()).where(Job.status.in_(st.FINAL)))).scalar()
                last = (await session.execute(select(func.max(Job.completed_at)))).scalar()
            if done >= jobs:
                break
            await asyncio.sleep(0.05)
        await host.stop()
        async with runtime.db.read() as session:
            ok = (await session.execute(select(func.count()).where(Job.status == st.COMPLETED))).scalar()
        assert ok == jobs, f"{ok} of {jobs} completed"
        return jobs / (last - start).total_seconds()
    finally:
        await runtime.db.dispose()


# --- raw sqlite3 with our schema ---------------------------------------------------------------------


def raw_sqlite(path: Path, jobs: int, concurrency: int) -> float:
    """The durable writes our schema needs per job, with nothing else: claim a batch, commit step 1
    (engine_data, packets, next step), commit step 2 (final status, engine_data, log row)."""
    from datamachine_mcp.engine.store.rows import sqlite_ts
    from datamachine_mcp.storage.timeutil import iso, utcnow

    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    start = time.perf_counter()
    finished = 0
    while finished < jobs:
        now = utcnow()
        db.execute("BEGIN IMMEDIATE")
        claimed = db.execute(
            "UPDATE datamachine_jobs SET status = 'processing', lease_owner = 'raw', lease_expires_at = ?, "
            "started_at = COALESCE(started_at, ?), attempts = attempts + 1, updated_at = ? WHERE job_id IN "
            "(SELECT job_id FROM datamachine_jobs WHERE status = 'pending' AND run_at <= ? "
            "ORDER BY run_at, job_id LIMIT ?) RETURNING job_id, engine_data, flow_key, pipeline_key",
            (sqlite_ts(now + timedelta(seconds=120)), sqlite_ts(now), sqlite_ts(now), sqlite_ts(now), concurrency),
        ).fetchall()
        db.execute("COMMIT")
        for job_id, raw, flow_key, pipeline_key in claimed:
            data = json.loads(raw)
            steps = sorted(data["flow_config"].values(), key=lambda s: s["execution_order"])
            packets: list = []
            for index, step in enumerate(steps):
                params = step.get("flow_step_settings", {}).get("params")
                t = utcnow()
                packets = [{"type": "system_task_result", "timestamp": iso(t), "data": {"result": params}}]
                data.setdefault("step_results", {})[step["flow_step_id"]] = {"status": "succeeded", "at": iso(t)}
                db.execute("BEGIN IMMEDIATE")
                if index + 1 < len(steps):
                    db.execute(
                        "UPDATE datamachine_jobs SET current_step_id = ?, packets = ?, attempts = 1, engine_data = ?, "
                        "updated_at = ? WHERE job_id = ? AND status = 'processing' AND lease_owner = 'raw'",
                        (steps[index + 1]["flow_step_id"], json.dumps(packets), json.dumps(data), sqlite_ts(t), job_id),
                    )
                else:
                    db.execute(
                        "UPDATE datamachine_jobs SET status = 'completed', completed_at = ?, lease_owner = NULL, "
                        "lease_expires_at = NULL, packets = ?, engine_data = ?, updated_at = ? "
                        "WHERE job_id = ? AND status = 'processing' AND lease_owner = 'raw'",
                        (sqlite_ts(t), json.dumps(packets), json.dumps(data), sqlite_ts(t), job_id),
                    )
                    db.execute(
                        "INSERT INTO datamachine_logs (level, message, context, created_at, job_id, flow_id, "
                        "pipeline_id) VALUES ('info', ?, ?, ?, ?, ?, ?)",
                        (
                            f"Job {job_id} completed",
                            json.dumps({"job_id": job_id, "status": "completed"}),
                            sqlite_ts(t),
                            job_id,
                            flow_key,
                            pipeline_key,
                        ),
                    )
                db.execute("COMMIT")
            finished += 1
    elapsed = time.perf_counter() - start
    done = db.execute("SELECT COUNT(*) FROM datamachine_jobs WHERE status = 'completed'").fetchone()[0]
    assert done == jobs, done
    db.close()
    return jobs / elapsed


# --- huey ------------------------------------------------------------------------------------------------


def huey_sqlite(path: Path, jobs: int) -> float:
    os.environ["PEERS_HUEY_DB"] = str(path)
    sys.path.insert(0, str(ROOT / "bench"))
    from _huey_tasks import huey, step1, step2

    groups = [huey.enqueue(step1.s(i).then(step2)) for i in range(jobs)]
    consumer = subprocess.Popen(
        [sys.executable, "-m", "huey.bin.huey_consumer", "_huey_tasks.huey", "-w", "1", "-k", "thread", "-d", "0.01"],
        cwd=str(ROOT / "bench"),
        env={**os.environ, "PYTHONPATH": str(ROOT / "bench")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Poll gently (huey's SQLite storage is not in WAL mode: a busy reader slows its writer down);
        # the timing comes from the tasks' own timestamps, not from this loop.
        deadline = time.monotonic() + 600
        while huey.pending_count() and time.monotonic() < deadline:
            time.sleep(0.25)
        times = [list(g)[-1].get(blocking=True, timeout=600) for g in groups]
    finally:
        consumer.terminate()
        consumer.wait(10)
    first = min(t[0] for t in times)
    last = max(t[1] for t in times)
    return jobs / (last - first)


# --- procrastinate ---------------------------------------------------------------------------------------


async def procrastinate_pg(url: str, jobs: int, concurrency: int) -> float:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    finished: list[float] = []

    @app.task(name="step2")
    async def step2(n: int) -> None:
        finished.append(time.time())

    @app.task(name="step1")
    async def step1(n: int) -> None:
        await step2.defer_async(n=n)

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        await step1.batch_defer_async(*[cast(Any, {"n": i}) for i in range(jobs)])
        start = time.time()
        worker = asyncio.create_task(app.run_worker_async(concurrency=concurrency, install_signal_handlers=False))
        while len(finished) < jobs:
            await asyncio.sleep(0.05)
            if worker.done():
                worker.result()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    return jobs / (max(finished) - start)


# --- driver -----------------------------------------------------------------------------------------------


def _db_url(base: str, suffix: str) -> str:
    head, name = base.rsplit("/", 1)
    return f"{head}/{name}{suffix}"


async def _fresh_pg(url: str) -> None:
    import asyncpg

    head, name = url.rsplit("/", 1)
    conn = await asyncpg.connect(f"{head}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def one(name: str, args: argparse.Namespace) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="dm-peers-"))
    try:
        if name == "ours-sqlite":
            return asyncio.run(ours(str(tmp / "ours.db"), tmp, args.jobs, args.concurrency))
        if name == "raw-sqlite":
            runtime = asyncio.run(_our_jobs(str(tmp / "raw.db"), tmp, args.jobs))
            asyncio.run(runtime.db.dispose())
            return raw_sqlite(tmp / "raw.db", args.jobs, args.concurrency)
        if name == "huey-sqlite":
            return huey_sqlite(tmp / "huey.db", args.jobs)
        if name == "ours-pg":
            url = _db_url(args.pg, "_ours")
            asyncio.run(_fresh_pg(url))
            return asyncio.run(ours(url, tmp, args.jobs, args.concurrency))
        if name == "procrastinate-pg":
            url = _db_url(args.pg, "_proc")
            asyncio.run(_fresh_pg(url))
            return asyncio.run(procrastinate_pg(url, args.jobs, args.concurrency))
        raise SystemExit(f"unknown contestant {name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="worker concurrency (ours, procrastinate)")
    parser.add_argument("--pg", default=os.environ.get("DATAMACHINE_BENCH_PG_URL"), help="PostgreSQL URL base")
    parser.add_argument("--only", default=",".join(CONTESTANTS), help="comma-separated contestants")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one trial, print jobs/s
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"rate": one(args.one, args)}))
        return
    names = [n for n in args.only.split(",") if n]
    if any(n.endswith("-pg") for n in names) and not args.pg:
        raise SystemExit("PostgreSQL contestants need --pg postgresql://user:pass@host:port/dbname")
    rates: dict[str, list[float]] = {n: [] for n in names}
    for round_no in range(1, args.rounds + 1):
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--jobs", str(args.jobs)]
            cmd += ["--concurrency", str(args.concurrency)] + (["--pg", args.pg] if args.pg else [])
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            rate = json.loads(out.stdout.strip().splitlines()[-1])["rate"]
            rates[name].append(rate)
            print(f"round {round_no}: {name:17s} {rate:8,.0f} jobs/s", flush=True)
    medians = {n: statistics.median(v) for n, v in rates.items()}
    print(f"\n{args.jobs} jobs of 2 persisted steps; worker concurrency {args.concurrency}; medians of {args.rounds}")
    for name, rate in medians.items():
        print(f"  {name:17s} {rate:8,.0f} jobs/s")
    print("\nratios (row / column):")
    print(" " * 19 + "".join(f"{n:>18s}" for n in names))
    for a in names:
        print(f"  {a:17s}" + "".join(f"{medians[a] / medians[b]:18.2f}" for b in names))
    goals = [("ours-sqlite", "raw-sqlite", 0.5), ("ours-pg", "procrastinate-pg", 2.0)]
    for a, b, goal in goals:
        if a in medians and b in medians:
            print(f"goal {a} / {b} >= {goal}: {medians[a] / medians[b]:.2f}")


if __name__ == "__main__":
    main()
