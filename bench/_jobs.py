"""Pending runs of a flow created up front, as ``run-flow`` creates each one (shared by the engine benches)."""

from __future__ import annotations

from typing import Any

from datamachine_mcp.engine.jobs import create_flow_job
from datamachine_mcp.engine.plan import resolve_plan
from datamachine_mcp.storage.models import Flow, Job, Pipeline
from datamachine_mcp.storage.timeutil import utcnow


async def pending_runs(session: Any, flow_id: int, count: int, *, threshold: str = "info") -> list[Job]:
    """``count`` pending jobs of flow ``flow_id`` in the caller's write transaction."""
    flow = await session.get(Flow, flow_id)
    assert flow is not None
    pipeline = await session.get(Pipeline, flow.pipeline_id)
    assert pipeline is not None
    plan = resolve_plan(flow.flow_config)
    jobs = []
    for _ in range(count):
        created = await create_flow_job(
            session,
            flow=flow,
            pipeline=pipeline,
            plan=plan,
            trigger="manual",
            initial_data={},
            dry_run=False,
            idempotency_key=None,
            request={"flow_id": flow_id},
            max_attempts=3,
            now=utcnow(),
            threshold=threshold,
        )
        jobs.append(created.job)
    return jobs
