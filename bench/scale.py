"""Worker scale-out on PostgreSQL: jobs/s with 1, 2 and 4 ``datamachine-mcp worker`` processes, and the
due→processing latency with LISTEN/NOTIFY (and, for comparison, with polling only).

    python bench/scale.py --db postgresql://dm:dm@127.0.0.1:5432/dm_bench [--jobs 1500] [--workers 1,2,4]

THE DATABASE IS WIPED (every datamachine table is truncated). Without ``--db`` the URL comes from
DATAMACHINE_BENCH_PG_URL or DATAMACHINE_TEST_PG_URL (a database the tests may wipe anyway).

Throughput: ``--jobs`` runs of a one-step flow (a ``system_task`` echo: no I/O, so the figure is the
engine's own cost per job: claim, load, step-start log, step commit, terminal accounting) are created
with ``run_at`` a few seconds ahead, so every worker process is up before the first is due; the rate is
jobs / (last ``completed_at`` − first ``started_at``), from the database's own timestamps. Each process
runs ``--concurrency`` jobs at once (default 4).

Latency: with the workers idle, single jobs are created one at a time (``run_at`` = now) from this
process, and ``started_at − run_at`` is the delay until a worker claimed it: woken by NOTIFY (the
``datamachine_jobs_notify`` trigger) or, with the trigger disabled for the comparison, by the 1 s poll.

CPU accounting: CPU seconds of the worker processes and of the PostgreSQL backends serving them during
the throughput phase (from /proc; backends of other databases are left out), and the whole machine's
busy time, explain what bounds the scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _jobs import pending_runs  # noqa: E402
from sqlalchemy import text  # noqa: E402

from datamachine_mcp.abilities.access import Principal  # noqa: E402
from datamachine_mcp.abilities.registry import load_all  # noqa: E402
from datamachine_mcp.abilities.runner import invoke  # noqa: E402
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime  # noqa: E402
from datamachine_mcp.storage.timeutil import utcnow  # noqa: E402

OWNER = Principal(user_id=1, is_admin=True, transport="stdio")
TABLES = (
    "datamachine_pipelines, datamachine_flows, datamachine_jobs, datamachine_processed_items, "
    "datamachine_chat_sessions, datamachine_agents, datamachine_agent_access, datamachine_logs, "
    "datamachine_agent_tokens, datamachine_settings"
)
ECHO = {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {"n": 1}}}
TICK = os.sysconf("SC_CLK_TCK")


# --- /proc accounting ------------------------------------------------------------------------------


def proc_cpu(pid: int | str) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every PostgreSQL process, by pid."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().startswith("postgres"):
                    out[int(entry)] = proc_cpu(entry)
            except OSError:
                pass
    return out


async def our_backends(rt) -> set[int]:
    """The server processes serving this database (the workers' pooled connections): other databases on
    the same server (e.g. tests running meanwhile) are not counted."""
    async with rt.db.read() as s:
        rows = await s.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        )
        return {int(r[0]) for r in rows.all()}


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / TICK, total / TICK


# --- setup ------------------------------------------------------------------------------------------


async def reset(rt) -> int:
    """Empty the database and create the echo flow; returns its flow id."""
    async with rt.db.write() as s:
        await s.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    rt.settings.invalidate()
    abilities = load_all()

    async def call(name: str, args: dict) -> dict:
        out = await invoke(rt, abilities[name], args, OWNER)
        assert out.ok and out.output is not None, out.error
        return out.output

    # info: the step-start debug rows are not stored (the default log level)
    await call("update-settings", {"settings": {"log_level": "info"}})
    made = await call("create-pipeline", {"pipeline_name": "Bench", "workflow": {"steps": [ECHO]}})
    return made["flow_id"]


async def create_jobs(rt, flow_id: int, count: int, run_at) -> None:
    async with rt.db.write() as s:
        for job in await pending_runs(s, flow_id, count, threshold="debug"):
            job.run_at = run_at


def start_workers(url: str, data_dir: Path, count: int, concurrency: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "datamachine_mcp.server.cli", "worker", "--db", url),
                *("--data-dir", str(data_dir), "--concurrency", str(concurrency)),
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def scalar(rt, sql: str, **params):
    async with rt.db.read() as s:
        return (await s.execute(text(sql), params)).scalar()


async def wait_idle_workers(rt, count: int, seconds: float = 60) -> None:
    """Until ``count`` worker processes have recorded liveness (their loops run)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        beats = await scalar(rt, "SELECT value FROM datamachine_settings WHERE key = 'worker_heartbeat'")
        if beats and len(beats) >= count:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("worker processes did not start")


# --- phases -----------------------------------------------------------------------------------------


async def throughput(rt, url: str, data_dir: Path, workers: int, jobs: int, concurrency: int) -> dict:
    flow_id = await reset(rt)
    lead = 6.0 + 1.5 * workers  # every process is up (imports, migration check) before the first job is due
    due = utcnow() + timedelta(seconds=lead)
    await create_jobs(rt, flow_id, jobs, due)
    procs = start_workers(url, data_dir, workers, concurrency)
    try:
        await wait_idle_workers(rt, workers)
        if utcnow() >= due:
            print(f"  (warning: the workers took longer than {lead:.0f} s to start; CPU figures miss the start)")
        pg0, busy0 = postgres_cpu(), machine_busy()
        w0 = [proc_cpu(p.pid) for p in procs]
        t0 = time.monotonic()
        while await scalar(rt, "SELECT count(*) FROM datamachine_jobs WHERE status = 'completed'") < jobs:
            if time.monotonic() - t0 > 1200:
                raise RuntimeError("jobs did not finish in 20 minutes")
            await asyncio.sleep(0.25)
        pg1, busy1 = postgres_cpu(), machine_busy()
        w1 = [proc_cpu(p.pid) for p in procs]
        window = time.monotonic() - t0
        backends = await our_backends(rt)
    finally:
        stop_workers(procs)
    first = await scalar(rt, "SELECT min(started_at) FROM datamachine_jobs")
    last = await scalar(rt, "SELECT max(completed_at) FROM datamachine_jobs")
    seconds = (last - first).total_seconds()
    not_once = await scalar(rt, "SELECT count(*) FROM datamachine_jobs WHERE attempts <> 1")
    return {
        "workers": workers,
        "seconds": seconds,
        "rate": jobs / seconds,
        "worker_cpu": sum(w1) - sum(w0),
        "pg_cpu": sum(pg1.get(pid, 0.0) - pg0.get(pid, 0.0) for pid in backends),
        "machine_busy": busy1[0] - busy0[0],
        "machine_total": busy1[1] - busy0[1],
        "window": window,
        "reclaimed": not_once,
    }


async def latency(rt, url: str, data_dir: Path, workers: int, samples: int, *, notify: bool) -> list[float]:
    flow_id = await reset(rt)
    async with rt.db.write() as s:
        state = "ENABLE" if notify else "DISABLE"
        await s.execute(text(f"ALTER TABLE datamachine_jobs {state} TRIGGER datamachine_jobs_notify"))
    procs = start_workers(url, data_dir, workers, 4)
    try:
        await wait_idle_workers(rt, workers)
        await asyncio.sleep(1.0)
        for _ in range(samples):
            await create_jobs(rt, flow_id, 1, utcnow())
            await asyncio.sleep(0.25 + (hash(time.monotonic()) % 100) / 1000)  # not in step with the poll
        deadline = time.monotonic() + 30
        while await scalar(rt, "SELECT count(*) FROM datamachine_jobs WHERE started_at IS NULL"):
            if time.monotonic() > deadline:
                raise RuntimeError("latency jobs were not claimed")
            await asyncio.sleep(0.1)
    finally:
        stop_workers(procs)
        async with rt.db.write() as s:
            await s.execute(text("ALTER TABLE datamachine_jobs ENABLE TRIGGER datamachine_jobs_notify"))
    async with rt.db.read() as s:
        rows = (await s.execute(text("SELECT started_at - run_at FROM datamachine_jobs"))).scalars().all()
    return sorted(r.total_seconds() * 1000 for r in rows)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def main(args: argparse.Namespace) -> None:
    url = args.db or os.environ.get("DATAMACHINE_BENCH_PG_URL") or os.environ.get("DATAMACHINE_TEST_PG_URL")
    if not url or not url.startswith(("postgresql://", "postgres://")):
        sys.exit("bench/scale.py needs a PostgreSQL URL (--db or DATAMACHINE_BENCH_PG_URL); it wipes that database")
    counts = [int(c) for c in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="dm-scale-") as tmp:
        data_dir = Path(tmp)
        rt = await open_runtime(ProcessConfig(db=url, data_dir=data_dir))
        try:
            cores = os.cpu_count() or 1
            print(f"PostgreSQL {rt.db.describe()}, {cores} CPU cores, load average {os.getloadavg()[0]:.2f}")
            print(f"throughput: {args.jobs} one-step echo jobs, concurrency {args.concurrency} per process")
            results = []
            for workers in counts:
                r = await throughput(rt, url, data_dir, workers, args.jobs, args.concurrency)
                results.append(r)
                util = r["machine_busy"] / r["machine_total"] * 100 if r["machine_total"] else 0
                ours = (r["worker_cpu"] + r["pg_cpu"]) / (r["window"] * cores) * 100
                print(
                    f"  {workers} worker process(es): {r['rate']:7.1f} jobs/s  ({r['seconds']:.1f} s)  "
                    f"CPU per job: workers {r['worker_cpu'] / args.jobs * 1000:.1f} ms + PostgreSQL "
                    f"{r['pg_cpu'] / args.jobs * 1000:.1f} ms; machine busy {util:.0f}% "
                    f"(this benchmark {ours:.0f}%); jobs claimed more than once: {r['reclaimed']}"
                )
            base = results[0]["rate"]
            for r in results[1:]:
                print(f"  scaling {r['workers']} vs {results[0]['workers']}: {r['rate'] / base:.2f}x")
            # What bounds the figures: one worker process is one Python thread (one core at most), and
            # all processes plus PostgreSQL share the machine's cores.
            for r in results:
                per_job = (r["worker_cpu"] + r["pg_cpu"]) / args.jobs
                per_proc = r["worker_cpu"] / args.jobs
                print(
                    f"  bound with {r['workers']}: machine ceiling {cores / per_job:.0f} jobs/s "
                    f"({cores} cores / {per_job * 1000:.1f} ms CPU per job), one-process ceiling "
                    f"{r['workers'] / per_proc:.0f} jobs/s ({r['workers']} x 1 core / {per_proc * 1000:.1f} ms)"
                )
            for notify in (True, False):
                lat = await latency(rt, url, data_dir, 2, args.samples, notify=notify)
                label = "LISTEN/NOTIFY" if notify else "polling only (trigger disabled)"
                print(
                    f"due→processing with {label}, 2 idle workers, {len(lat)} jobs: "
                    f"p50 {pct(lat, 50):.0f} ms, p95 {pct(lat, 95):.0f} ms, max {lat[-1]:.0f} ms"
                )
        finally:
            await rt.db.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="PostgreSQL URL (THE DATABASE IS WIPED)")
    parser.add_argument("--jobs", type=int, default=1500, help="jobs per throughput run (default 1500)")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts (default 1,2,4)")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs per process at once (default 4)")
    parser.add_argument("--samples", type=int, default=60, help="jobs for the latency measurement (default 60)")
    asyncio.run(main(parser.parse_args()))
