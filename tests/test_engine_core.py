"""The fast tier of the engine: the worker, the step commit and recovery driven directly on the job store,
without the worker loop, scheduler or maintenance tasks (each test runs in well under a second).

Jobs are created with the real tools; a ``Worker`` claims them and runs them step by step.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from datamachine_mcp.engine import front
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.recovery import recover
from datamachine_mcp.engine.retry import RetryPolicy
from datamachine_mcp.engine.steps import LeaseLost
from datamachine_mcp.engine.store import GuardMissed
from datamachine_mcp.engine.worker import Worker
from datamachine_mcp.storage.models import Flow, Job
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import call
from tests.jobs_support import approval_step, echo_step, make_flow

pytestmark = pytest.mark.anyio


async def two_step_jobs(owner, n: int = 1) -> tuple[int, list[int]]:
    made = await make_flow(owner, [echo_step(a=1), echo_step(b=2)], name="Core")
    ids = [(await call(owner, "run-flow", {"flow_id": made["flow_id"]}))["job_id"] for _ in range(n)]
    return made["flow_id"], ids


async def row(runtime, job_id: int) -> Job:
    async with runtime.db.read() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return job


@pytest.mark.backends
async def test_claim_returns_full_rows_and_never_twice(runtime, owner):
    _, ids = await two_step_jobs(owner, 3)
    one, other = Worker(runtime.engine), Worker(runtime.engine)
    other.services = runtime.engine
    first = await one.claim(2)
    assert [j.job_id for j in first] == ids[:2]
    assert all(j.status == st.PROCESSING and j.attempts == 1 and j.engine_data["flow_config"] for j in first)
    async with runtime.engine.store.transaction() as tx:
        rest = await tx.claim(
            "elsewhere:1:0000aaaa", 5, now=utcnow(), lease_expires_at=utcnow() + timedelta(seconds=60)
        )
    assert [j.job_id for j in rest] == ids[2:]


@pytest.mark.backends
async def test_a_two_step_job_is_two_job_writes(runtime, owner):
    """Inline continuation and completion each write the job row once; the worker never reads it again."""
    flow_id, (job_id,) = await two_step_jobs(owner)
    worker = Worker(runtime.engine)
    (job,) = await worker.claim(1)
    first_step = job.current_step_id
    assert await worker._run_step(job) is True  # step 1 committed, continue inline
    mid = await row(runtime, job_id)
    assert (mid.status, mid.attempts, mid.current_step_id) == (st.PROCESSING, 1, job.current_step_id)
    assert list(mid.engine_data["step_results"]) == [first_step] and first_step != job.current_step_id
    assert await worker._run_step(job) is False
    done = await row(runtime, job_id)
    assert (done.status, done.lease_owner, done.packets) == (st.COMPLETED, None, job.packets)
    assert done.engine_data["run_metrics"]["steps_run"] == 2 and done.engine_data == job.engine_data
    async with runtime.db.read() as session:
        flow = await session.get(Flow, flow_id)
    assert (flow.last_run_status, flow.consecutive_failures) == ("completed", 0)


async def test_statements_of_a_two_step_job(runtime, owner):
    """SQLite: the statements one 2-step job costs the worker (claim excluded: it serves a batch)."""
    flow_id, _ = await two_step_jobs(owner, 2)
    worker = Worker(runtime.engine)
    first, second = await worker.claim(2)
    store = runtime.engine.store
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)
    try:
        while await worker._run_step(first):
            pass
        first_job = list(seen)
        seen.clear()
        async with runtime.db.read() as session:
            before = (await session.get(Flow, flow_id)).updated_at
        while await worker._run_step(second):
            pass
    finally:
        store._conn.set_trace_callback(None)
    kinds = [" ".join(s.split()[:2]) if s.startswith(("UPDATE", "BEGIN")) else s.split()[0] for s in first_job]
    assert kinds == [
        "BEGIN IMMEDIATE",
        "UPDATE datamachine_jobs",  # step 1: next step, packets, engine_data, lease
        "COMMIT",
        "BEGIN IMMEDIATE",
        "UPDATE datamachine_jobs",  # step 2: final status, packets, engine_data
        "UPDATE datamachine_flows",  # flow health (matches nothing when it would change nothing)
        "INSERT",  # the one log row (info: job completed)
        "COMMIT",
    ], first_job
    assert not any("processed_items" in s for s in first_job + seen)  # no fetch step: no claim statements
    async with runtime.db.read() as session:
        assert (await session.get(Flow, flow_id)).updated_at == before  # a second success changed nothing


@pytest.mark.backends
async def test_a_lost_lease_commits_nothing(runtime, owner):
    _, (job_id,) = await two_step_jobs(owner)
    worker = Worker(runtime.engine)
    (job,) = await worker.claim(1)
    await call(owner, "cancel-job", {"job_id": job_id})
    before = await row(runtime, job_id)
    async with runtime.engine.store.transaction() as tx:
        with pytest.raises(GuardMissed):
            await tx.advance(job, worker.worker_id, now=utcnow(), lease_expires_at=utcnow())
    with pytest.raises(LeaseLost):  # the row in memory says processing for us; the commit finds out
        await worker._run_step(job)
    after = await row(runtime, job_id)
    assert (after.status, after.engine_data, after.updated_at) == (st.CANCELLED, before.engine_data, before.updated_at)


@pytest.mark.backends
async def test_recovery_requeues_then_fails_an_expired_lease(runtime, owner):
    _, (job_id,) = await two_step_jobs(owner)
    worker = Worker(runtime.engine)
    now = utcnow()
    for attempt in (1, 2, 3):
        async with runtime.engine.store.transaction() as tx:
            (job,) = await tx.claim(worker.worker_id, 1, now=now, lease_expires_at=now + timedelta(seconds=120))
            assert job.attempts == attempt
            assert await tx.void_lease(job_id, worker.worker_id, expired_at=now - timedelta(seconds=1))
        report = await recover(runtime.engine, job_id=job_id, now=now)
        current = await row(runtime, job_id)
        if attempt < 3:
            assert report["requeued"] == 1 and current.status == st.PENDING
            delay = RetryPolicy().delay("lease_expired", attempt)
            assert current.run_at == now + timedelta(seconds=delay)
            assert current.engine_data["retry"]["last_class"] == "lease_expired"
            async with runtime.db.write() as session:  # make it due again
                (await session.get(Job, job_id)).run_at = now
        else:
            assert report["failed"] == 1
            assert (current.status, current.status_reason) == (st.FAILED, "lease_expired")
    async with runtime.db.read() as session:
        assert (await session.execute(select(Job.status).where(Job.job_id == job_id))).scalar() == st.FAILED


def test_retry_policy():
    policy = RetryPolicy(base_seconds=60, transport_base_seconds=15, max_delay_seconds=3600)
    assert [policy.delay("upstream", a) for a in (1, 2, 3)] == [60, 120, 240]
    assert [policy.delay("transport", a) for a in (1, 2)] == [15, 30]
    assert policy.delay("rate_limit", 1, retry_after=300) == 300  # Retry-After is a floor
    assert policy.delay("rate_limit", 1, retry_after=10**9) == 86400  # clamped to a day
    assert policy.delay("upstream", 20) == 3600
    retry = policy.decide({"code": "http_timeout", "message": "slow"}, 1, 3)
    assert (retry.retry, retry.error_class, retry.delay) == (True, "transport", 15)
    assert not policy.decide({"code": "http_timeout", "message": "slow"}, 3, 3).retry
    assert not policy.decide({"code": "http_not_found", "message": "gone"}, 1, 3).retryable


@pytest.mark.backends
async def test_park_then_decide_through_the_front_door(runtime, owner):
    """A gate parks the job (no lease); the decision resumes it exactly once at the next step."""
    made = await make_flow(owner, [approval_step(), echo_step(c=3)], name="Gate")
    job_id = (await call(owner, "run-flow", {"flow_id": made["flow_id"]}))["job_id"]
    worker = Worker(runtime.engine)
    (job,) = await worker.claim(1)
    assert await worker._run_step(job) is False
    parked = await row(runtime, job_id)
    assert (parked.status, parked.lease_owner, parked.wait_kind) == (st.WAITING, None, "approval")
    action = parked.wait_ref
    async with runtime.db.write() as session:
        decided = await front.resolve_approval(
            runtime.engine,
            session,
            job_id,
            action,
            "accepted",
            note=None,
            user_id=1,
            agent_id=None,
            now=utcnow(),
            threshold="info",
            claim_ttl=3600,
        )
    assert decided.resumed and decided.job.status == st.PENDING
    async with runtime.db.write() as session:
        with pytest.raises(front.AlreadyResolved):
            await front.resolve_approval(
                runtime.engine,
                session,
                job_id,
                action,
                "rejected",
                note=None,
                user_id=1,
                agent_id=None,
                now=utcnow(),
                threshold="info",
                claim_ttl=3600,
            )
    (again,) = await worker.claim(1)
    assert again.current_step_id != parked.current_step_id and again.attempts == 1
    assert await worker._run_step(again) is False
    done = await row(runtime, job_id)
    assert done.status == st.COMPLETED and done.engine_data["approval"]["status"] == "accepted"
