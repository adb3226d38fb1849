"""Creating jobs: flow runs, direct workflows and system tasks (docs/engine.md, Creating jobs).

Runs inside the caller's write transaction. Idempotency keys are namespaced by the caller
(docs/engine.md, Idempotency); a replay returns the existing job and creates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.plan import Plan, PlanError, fingerprint, first_handler, snapshot
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import Agent, Flow, Job, Pipeline
from datamachine_mcp.storage.timeutil import iso

EMPTY_QUEUE_MODES = ("drain", "loop")


@dataclass
class Created:
    job: Job
    replayed: bool


async def find_by_key(session: AsyncSession, key: str) -> Job | None:
    return (await session.execute(select(Job).where(Job.idempotency_key == key))).scalar_one_or_none()


def check_replay(existing: Job, request_fingerprint: str, *, conflict_code: str) -> Created:
    stored = ((existing.engine_data or {}).get("job") or {}).get("request_fingerprint")
    if stored != request_fingerprint:
        raise PlanError(
            conflict_code,
            f"This key was already used for a different request (job {existing.job_id}); use a new key.",
            existing_job_id=existing.job_id,
        )
    return Created(existing, replayed=True)


async def _replay(
    session: AsyncSession, idempotency_key: str | None, request_fingerprint: str, *, conflict_code: str
) -> Created | None:
    """The existing job of ``idempotency_key`` (a replay), or None when a new job is to be created."""
    if idempotency_key is None:
        return None
    existing = await find_by_key(session, idempotency_key)
    if existing is None:
        return None
    return check_replay(existing, request_fingerprint, conflict_code=conflict_code)


def pending_job(
    *,
    trigger: str,
    now: datetime,
    idempotency_key: str | None,
    plan: Plan | None,
    run_at: datetime | None = None,
    engine_data: dict[str, Any] | None = None,
    **columns: Any,
) -> Job:
    """A new pending Job row: the columns every creator sets alike, plus ``columns`` (owner, ids, label…).

    ``plan`` gives the first step and handler (None: a job created without a plan, failed at once).
    """
    return Job(
        status=st.PENDING,
        run_trigger=trigger,
        current_step_id=plan.first["flow_step_id"] if plan is not None else None,
        handler_slug=first_handler(plan) if plan is not None else None,
        packets=[],
        attempts=0,
        run_at=run_at or now,
        created_at=now,
        updated_at=now,
        idempotency_key=idempotency_key,
        engine_data={} if engine_data is None else engine_data,
        **columns,
    )


def flow_job_columns(flow: Flow, pipeline: Pipeline) -> dict[str, Any]:
    """Owner, ids and label of a job of ``flow`` (a pipeline run)."""
    return {
        "user_id": flow.user_id,
        "agent_id": flow.agent_id,
        "pipeline_id": str(pipeline.pipeline_id),
        "flow_id": str(flow.flow_id),
        "pipeline_key": pipeline.pipeline_id,
        "flow_key": flow.flow_id,
        "source": "pipeline",
        "label": flow.flow_name[:255],
    }


def job_block(
    job: Job, *, agent_slug: str | None, origin_session_id: str | None, request_fingerprint: str
) -> dict[str, Any]:
    """The ``job`` block of a new job's snapshot, from its flushed row (flow/pipeline ids as numbers)."""
    return {
        "job_id": job.job_id,
        "flow_id": job.flow_key if job.flow_key is not None else job.flow_id,
        "pipeline_id": job.pipeline_key if job.pipeline_key is not None else job.pipeline_id,
        "user_id": job.user_id,
        "agent_id": job.agent_id,
        "agent_slug": agent_slug,
        "parent_job_id": None,
        "created_at": iso(job.created_at),
        "trigger": job.run_trigger,
        "origin_session_id": origin_session_id,
        "request_fingerprint": request_fingerprint,
    }


def flow_snapshot(flow: Flow, pipeline: Pipeline, *, job: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """The snapshot keys of a run of ``flow`` (its flow, pipeline and both configs as they are now)."""
    return snapshot(
        job=job,
        flow={"flow_id": flow.flow_id, "name": flow.flow_name, "scheduling": dict(flow.scheduling_config or {})},
        pipeline={"pipeline_id": pipeline.pipeline_id, "name": pipeline.pipeline_name},
        flow_config=dict(flow.flow_config or {}),
        pipeline_config=dict(pipeline.pipeline_config or {}),
        dry_run=dry_run,
    )


def empty_first_queue(plan: Plan, live_flow_config: dict[str, Any]) -> bool:
    """The first step drains/loops an empty queue, so the run has nothing to do and no job is created."""
    first = plan.first
    live = live_flow_config.get(first["flow_step_id"]) or {}
    if live.get("queue_mode") not in EMPTY_QUEUE_MODES:
        return False
    slot = {"ai": "prompt_queue", "fetch": "config_patch_queue"}.get(first["step_type"])
    return slot is not None and not live.get(slot)


async def create_flow_job(
    session: AsyncSession,
    *,
    flow: Flow,
    pipeline: Pipeline,
    plan: Plan,
    trigger: str,
    initial_data: dict[str, Any],
    dry_run: bool,
    idempotency_key: str | None,
    request: dict[str, Any],
    max_attempts: int,
    now: datetime,
    affinity: str | None = None,
    origin_session_id: str | None = None,
    threshold: str = "debug",
) -> Created:
    """A pending job for ``flow`` (docs/engine.md, run-flow); replays an existing job for the same key."""
    request_fingerprint = fingerprint(request)
    replay = await _replay(session, idempotency_key, request_fingerprint, conflict_code="idempotency_key_conflict")
    if replay is not None:
        return replay
    agent_slug = None
    if flow.agent_id is not None:
        agent_slug = (await session.execute(select(Agent.agent_slug).where(Agent.agent_id == flow.agent_id))).scalar()
    job = pending_job(
        trigger=trigger,
        now=now,
        idempotency_key=idempotency_key,
        plan=plan,
        max_attempts=max_attempts,
        affinity=affinity,
        **flow_job_columns(flow, pipeline),
    )
    session.add(job)
    await session.flush()
    block = job_block(
        job, agent_slug=agent_slug, origin_session_id=origin_session_id, request_fingerprint=request_fingerprint
    )
    snap = flow_snapshot(flow, pipeline, job=block, dry_run=dry_run)
    job.engine_data = {**initial_data, **snap}
    flow.last_run_at = now
    await write_log(
        session,
        "debug",
        f"Job {job.job_id} created for flow {flow.flow_id} ({trigger})",
        {
            "job_id": job.job_id,
            "flow_id": flow.flow_id,
            "pipeline_id": pipeline.pipeline_id,
            "run_trigger": trigger,
            "first_step": job.current_step_id,
        },
        agent_id=flow.agent_id,
        user_id=flow.user_id or None,
        threshold=threshold,
    )
    return Created(job, replayed=False)


async def create_direct_job(
    session: AsyncSession,
    *,
    plan: Plan,
    flow_config: dict[str, Any],
    pipeline_config: dict[str, Any],
    user_id: int,
    agent_id: int | None,
    agent_slug: str | None,
    source: str,
    label: str,
    initial_data: dict[str, Any],
    dry_run: bool,
    run_at: datetime,
    idempotency_key: str | None,
    request: dict[str, Any],
    max_attempts: int,
    now: datetime,
    trigger: str = "workflow",
    affinity: str | None = None,
    origin_session_id: str | None = None,
    standalone: bool = False,
    threshold: str = "debug",
) -> Created:
    """A direct (ephemeral) workflow job, or with ``standalone`` a system job (docs/engine.md, Other creation paths)."""
    request_fingerprint = fingerprint(request)
    replay = await _replay(session, idempotency_key, request_fingerprint, conflict_code="operation_key_conflict")
    if replay is not None:
        return replay
    ids = None if standalone else "direct"
    job = pending_job(
        trigger=trigger,
        now=now,
        run_at=run_at,
        idempotency_key=idempotency_key,
        plan=plan,
        max_attempts=max_attempts,
        affinity=affinity,
        user_id=user_id,
        agent_id=agent_id,
        pipeline_id=ids,
        flow_id=ids,
        source=source[:50],
        label=label[:255],
    )
    session.add(job)
    await session.flush()
    snap = snapshot(
        job=job_block(
            job, agent_slug=agent_slug, origin_session_id=origin_session_id, request_fingerprint=request_fingerprint
        ),
        flow={"flow_id": ids, "name": label, "scheduling": {"interval": "manual"}},
        pipeline={"pipeline_id": ids, "name": label},
        flow_config=flow_config,
        pipeline_config=pipeline_config,
        dry_run=dry_run,
        keep_queues=True,
    )
    job.engine_data = {**initial_data, **snap}
    await write_log(
        session,
        "debug",
        f"Job {job.job_id} created ({source})",
        {"job_id": job.job_id, "run_trigger": trigger, "first_step": job.current_step_id},
        agent_id=agent_id,
        user_id=user_id or None,
        threshold=threshold,
    )
    return Created(job, replayed=False)
