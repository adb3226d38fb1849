"""Waiting for a job to become final (docs/architecture.md, Waiting for a job).

No transaction is held while waiting. Changes made in this process wake the waiter at once; changes
made by other processes are seen by polling at most once a second.

Progress goes out on every change of the job and at least every ``HEARTBEAT_SECONDS`` meanwhile
(clients such as Claude Code reset their timeout on progress). The value is the finished units
(steps, plus children after a fan-out) plus the elapsed share of the wait, below the next unit: it
rises strictly with every notification and reaches the total when the job is final.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import func, select

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.plan import PlanError, plan_of
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.models import Job

POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 3.5  # "at least every 5 s", with room for the 1 s poll and a slow read
Progress = Callable[[float, float | None, str | None], Awaitable[None]]


@dataclass
class WaitResult:
    job: Job | None
    final: bool
    timed_out: bool
    waited_seconds: float


@dataclass(frozen=True)
class Position:
    """Where a job is: finished and total units, and a message naming the step and the counts."""

    done: float
    total: float
    step: str  # "step 2/3: Publish"
    message: str
    # "retrying after http_503 (attempt 1/3, next at …)" while a failed step waits for its retry
    retrying: str | None = None


def retrying(job: Job) -> str | None:
    """The pending retry of the job's current step, in words; None when there is none."""
    data = job.engine_data or {}
    result = (data.get("step_results") or {}).get(job.current_step_id or "")
    history = (data.get("retry") or {}).get("history") or []
    if job.status != st.PENDING or not isinstance(result, dict) or result.get("status") != "failed" or not history:
        return None
    last = history[-1]
    when = (data.get("retry") or {}).get("next_retry_at")
    return f"retrying after {last.get('error')} (attempt {last.get('attempt')}/{job.max_attempts}, next at {when})"


async def position_of(services: EngineServices, job: Job) -> Position:
    """Steps of the plan, plus children after a fan-out."""
    data = job.engine_data or {}
    try:
        plan = plan_of(data)
        total_steps = len(plan.steps)
        labels = {
            s["flow_step_id"]: (data.get("pipeline_config") or {}).get(s.get("pipeline_step_id", ""), {}).get("label")
            for s in plan.steps
        }
        index = plan.index(job.current_step_id) if job.current_step_id and plan.get(job.current_step_id) else 0
    except (PlanError, KeyError):
        total_steps, labels, index = 1, {}, 0
    # a failed attempt awaiting its retry is not a finished step
    results = (data.get("step_results") or {}).values()
    done = float(sum(1 for r in results if isinstance(r, dict) and r.get("status") == "succeeded"))
    total = float(total_steps)
    children = ""
    if data.get("batch"):
        async with services.db.read() as session:
            rows = await session.execute(
                select(Job.status, func.count()).where(Job.parent_job_id == job.job_id).group_by(Job.status)
            )
            counts = dict(rows.all())
        finished = sum(n for status, n in counts.items() if status in st.FINAL)
        total += sum(counts.values())
        done += finished
        children = f"; items {finished}/{sum(counts.values())} done"
    if job.status in st.FINAL:
        done = total
    label = labels.get(job.current_step_id or "") or job.current_step_id or ""
    step = f"step {min(index + 1, total_steps)}/{total_steps}: {label}"
    retry = retrying(job)
    message = f"{st.display(job.status, job.status_reason)} — {step}{children}" + (f"; {retry}" if retry else "")
    return Position(min(done, total), total, step, message, retry)


async def wait_for_job(
    services: EngineServices,
    job_id: int,
    seconds: float,
    *,
    stop_on_waiting: bool = False,
    progress: Progress | None = None,
) -> WaitResult:
    start = time.monotonic()
    limit = max(0.0, seconds)
    deadline = start + limit
    sent = -1.0  # last progress value sent
    sent_at = start
    last_done = -1.0
    while True:
        waiter = services.job_waiter(job_id)
        try:
            async with services.db.read() as session:
                job = await session.get(Job, job_id)
            if job is None:
                return WaitResult(None, False, False, time.monotonic() - start)
            final = job.status in st.FINAL
            now = time.monotonic()
            if progress is not None:
                where = await position_of(services, job)
                if final or where.done > last_done or now - sent_at >= HEARTBEAT_SECONDS:
                    elapsed = now - start
                    # final: the total; else below the next unit, rising with the time waited
                    share = min(elapsed / (limit + 1.0), 0.999)
                    value = where.total if final else min(where.done, where.total - 1) + share
                    value = max(value, sent + 1e-3)
                    sent, sent_at, last_done = value, now, where.done
                    await progress(value, where.total, f"{where.message} ({elapsed:.0f} s)")
            if final or (stop_on_waiting and job.status == st.WAITING):
                return WaitResult(job, final, False, time.monotonic() - start)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return WaitResult(job, False, True, time.monotonic() - start)
            try:
                await asyncio.wait_for(waiter.wait(), min(remaining, POLL_SECONDS))
            except TimeoutError:
                pass
        finally:
            services.drop_waiter(job_id, waiter)
