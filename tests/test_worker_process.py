"""``datamachine-mcp worker`` as real processes (docs/engine.md, Workers, claims and leases; Lease expiry).

* SIGTERM in the middle of a step: the job is handed back (``pending``, no lease, the attempt not
  counted) and the process exits 0 within a bounded time; another worker then finishes the job.
* ``kill -9`` of the worker running a job: the other worker's maintenance loop recovers the job once
  its lease expired, and runs it to completion; the item is processed exactly once.

The slow step is an ``http_json`` fetch from a local server that delays its first answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from datamachine_mcp.storage.models import Job, ProcessedItem
from tests.conftest import call, log_rows
from tests.fake_servers import FakeResponse, FakeServer, serve
from tests.test_scheduler import until

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

ROOT = Path(__file__).resolve().parent.parent
EXIT_BOUND_SECONDS = 15  # STOP_GRACE_SECONDS (10) plus process teardown
ITEMS = [{"id": "item-1", "title": "One", "body": "first"}]


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with serve() as fake:
        yield fake


class Workers:
    """Worker processes started by a test; all are stopped (and reaped) at the end."""

    def __init__(self, runtime: Any, tmp_path: Path) -> None:
        self.db = str(runtime.db.path) if runtime.db.path is not None else runtime.db.url
        self.data_dir = runtime.data_dir
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, concurrency: int = 2, *, log_level: str | None = "info") -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        level = ("--log-level", log_level) if log_level else ()
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "datamachine_mcp.server.cli", "worker", "--db", self.db),
                *("--data-dir", str(self.data_dir), "--concurrency", str(concurrency), *level),
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"worker-{self.procs.index(proc)}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(runtime, tmp_path) -> Iterator[Workers]:
    group = Workers(runtime, tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


async def wait_exit(proc: subprocess.Popen[bytes], seconds: float) -> int:
    with anyio.fail_after(seconds):
        while proc.poll() is None:  # noqa: ASYNC110 - a child process has no awaitable exit here
            await anyio.sleep(0.05)
    return proc.returncode


async def slow_flow(owner: Any, server: FakeServer, delay: float) -> tuple[dict[str, Any], str]:
    """fetch (http_json, the first answer delayed by ``delay`` s, then immediate) → echo."""
    url = server.script("/feed", FakeResponse(200, ITEMS, delay=delay), FakeResponse(200, ITEMS))
    steps = [
        {
            "step_type": "fetch",
            "handler_slugs": ["http_json"],
            "handler_configs": {"http_json": {"url": url, "max_items": 1}},
        },
        {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {"done": True}}},
    ]
    made = await call(owner, "create-pipeline", {"pipeline_name": "Slow", "workflow": {"steps": steps}})
    return made, url


async def job_row(runtime: Any, job_id: int) -> Job:
    async with runtime.db.read() as s:
        job = await s.get(Job, job_id)
    assert job is not None
    return job


async def wait_request(server: FakeServer, count: int, seconds: float = 60) -> None:
    async def arrived() -> bool:
        return len(server.to("/feed")) >= count

    await until(arrived, seconds, 0.05)


async def wait_status(runtime: Any, job_id: int, status: str, seconds: float = 60) -> Job:
    async def reached() -> bool:
        return (await job_row(runtime, job_id)).status == status

    await until(reached, seconds, 0.1)
    return await job_row(runtime, job_id)


async def items(runtime: Any) -> list[tuple[str, str]]:
    from sqlalchemy import select

    async with runtime.db.read() as s:
        rows = await s.execute(select(ProcessedItem.item_identifier, ProcessedItem.status))
        return [tuple(r) for r in rows.all()]


async def test_the_worker_announces_start_and_stop_at_info_by_default(runtime, workers):
    proc = workers.start(log_level=None)

    async def started() -> bool:
        return "running on" in workers.log(proc)

    await until(started, seconds=30)
    proc.send_signal(signal.SIGTERM)
    assert await wait_exit(proc, 30) == 0
    text = workers.log(proc)
    assert "INFO datamachine.worker: worker " in text and "INFO datamachine.worker: stopping" in text
    assert "WARNING" not in text
    starts = [line for line in text.splitlines() if "(concurrency" in line]
    where = " running on sqlite:" if runtime.db.dialect == "sqlite" else "/" + runtime.db.url.rsplit("/", 1)[1]
    assert len(starts) == 1 and where in starts[0], starts  # one start-up line, naming the database


async def test_sigterm_mid_step_hands_the_job_back_and_exits_zero(runtime, owner, server, workers):
    made, _ = await slow_flow(owner, server, delay=60)
    job_id = (await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"]}))["job_id"]
    first = workers.start()
    await wait_request(server, 1)  # the step is running (the server holds the answer)
    job = await job_row(runtime, job_id)
    assert job.status == "processing" and job.attempts == 1
    assert job.lease_owner is not None and job.lease_owner.split(":")[1] == str(first.pid)

    started = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert await wait_exit(first, EXIT_BOUND_SECONDS + 30) == 0, workers.log(first)
    elapsed = time.monotonic() - started
    assert elapsed < EXIT_BOUND_SECONDS, f"worker took {elapsed:.1f}s to stop"
    job = await job_row(runtime, job_id)
    # handed back: no orphaned lease, and the interrupted attempt does not count
    assert (job.status, job.lease_owner, job.lease_expires_at, job.attempts) == ("pending", None, None, 0)
    assert job.current_step_id == made["flow_step_ids"][0]
    assert await items(runtime) == []  # the interrupted fetch claimed nothing
    assert "released job" in workers.log(first)

    # another worker picks it up at once (no lease to wait for) and finishes it
    second = workers.start()
    job = await wait_status(runtime, job_id, "completed")
    assert job.attempts == 1 and job.lease_owner is None
    assert job.packets[0]["data"]["result"] == {"done": True}
    assert await items(runtime) == [("item-1", "processed")]
    # an idle worker stops promptly too
    started = time.monotonic()
    second.send_signal(signal.SIGTERM)
    assert await wait_exit(second, EXIT_BOUND_SECONDS + 30) == 0
    assert time.monotonic() - started < EXIT_BOUND_SECONDS


async def test_kill_9_the_other_worker_recovers_the_job_after_its_lease_expires(runtime, owner, server, workers):
    await call(
        owner,
        "update-settings",
        {
            "settings": {
                "lease_ttl_seconds": 15,
                "maintenance_interval_seconds": 5,
                "retry_transport_base_seconds": 1,
            }
        },
    )
    made, _ = await slow_flow(owner, server, delay=120)
    procs = [workers.start(), workers.start()]
    job_id = (await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"]}))["job_id"]
    await wait_request(server, 1)
    job = await job_row(runtime, job_id)
    holder = job.lease_owner
    assert job.status == "processing" and holder is not None
    victim = next(p for p in procs if str(p.pid) == holder.split(":")[1])
    survivor = next(p for p in procs if p is not victim)

    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    assert await wait_exit(victim, 10) == -signal.SIGKILL
    # the lease (15 s, renewed every 3.75 s) expires; the survivor's maintenance (every 5 s) requeues
    # the job with a 1 s backoff and the survivor runs it again; the second fetch answers at once
    job = await wait_status(runtime, job_id, "completed", 90)
    recovered_in = time.monotonic() - killed_at
    assert recovered_in < 60, recovered_in
    assert survivor.poll() is None, workers.log(survivor)
    retry = job.engine_data["retry"]
    assert retry["total_retries"] == 1
    history = retry["history"]
    assert [(h["class"], h["attempt"]) for h in history] == [("lease_expired", 1)]
    warnings = [r for r in await log_rows(runtime) if "expired; requeued" in r["message"]]
    assert [r["context"]["lease_owner"] for r in warnings] == [holder]
    assert len(server.to("/feed")) == 2
    # the item was claimed by the dead attempt and is processed exactly once
    assert await items(runtime) == [("item-1", "processed")]
    assert job.packets[0]["data"]["result"] == {"done": True}


async def test_a_failed_step_commit_is_recovered_at_once_not_after_the_lease(runtime, owner, monkeypatch):
    """An unexpected error in the step commit (here: injected once) hands the job to lease recovery
    immediately; it is retried after the transport backoff instead of a whole lease TTL (120 s)."""
    import datamachine_mcp.engine.worker as worker_module
    from datamachine_mcp.engine.host import EngineHost

    await call(owner, "update-settings", {"settings": {"retry_transport_base_seconds": 1}})
    real_commit = worker_module.commit_step
    failures = []

    async def flaky_commit(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(True)
            raise RuntimeError("could not serialize access (injected)")
        return await real_commit(*args, **kwargs)

    monkeypatch.setattr(worker_module, "commit_step", flaky_commit)
    steps = [{"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {"x": 1}}}]
    made = await call(owner, "create-pipeline", {"pipeline_name": "Flaky", "workflow": {"steps": steps}})
    host = EngineHost(runtime.engine, concurrency=1, poll_seconds=0.1)
    await host.start()
    try:
        job_id = (await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"]}))["job_id"]
        job = await wait_status(runtime, job_id, "completed", 15)
    finally:
        await host.stop(grace=5)
    assert failures == [True]
    assert [(h["class"], h["attempt"], h["delay_seconds"]) for h in job.engine_data["retry"]["history"]] == [
        ("lease_expired", 1, 1)
    ]
    assert job.packets[0]["data"]["result"] == {"x": 1}


async def test_workers_starting_together_all_record_their_liveness(runtime, owner):
    """Four processes' first liveness records race to create the row: every one is recorded
    (system-health-check sees four workers at once, not one now and the rest 15 s later)."""
    import asyncio

    from datamachine_mcp.engine.worker import Worker
    from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime

    others = [
        await open_runtime(ProcessConfig(db=runtime.db.url, data_dir=runtime.data_dir, toolsets=None)) for _ in range(3)
    ]
    try:
        workers = [Worker(rt.engine) for rt in (runtime, *others)]
        await asyncio.gather(*(w._record_liveness() for w in workers))
    finally:
        for rt in others:
            await rt.db.dispose()
    out = await call(owner, "system-health-check", {"types": ["worker"]})
    result = out["results"]["worker"]
    assert result["message"] == "4 worker(s) active in the last 60 s"
    assert sorted(result["details"]["workers"]) == sorted(w.worker_id for w in workers)
