"""Jobs toolset, health and metrics: get-flow-health, get-problem-flows and get-run-metrics.

Listings are scoped to the rows the principal may read (docs/access.md, List scoping).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.job_common import job_ref, load_job
from datamachine_mcp.abilities.job_reports import check_agent_filter
from datamachine_mcp.abilities.pipeline_common import load_flow
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output, ts
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.token_usage import own_usage, with_children
from datamachine_mcp.storage.crypto import mask
from datamachine_mcp.storage.models import Flow, Job, ProcessedItem
from datamachine_mcp.storage.timeutil import utcnow

# --- get-flow-health / get-problem-flows ------------------------------------------------------


class LatestJob(Output):
    job_id: int = Field(description="Job id")
    status: str = Field(description="Display status")
    created_at: str = Field(description="ISO 8601 UTC")
    completed_at: str | None = Field(description="ISO 8601 UTC, null while active")


async def latest_jobs(ctx: AbilityContext, flow_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The newest top-level job of each flow."""
    if not flow_ids:
        return {}
    newest = (
        select(func.max(Job.job_id))
        .where(Job.flow_key.in_(flow_ids), Job.parent_job_id.is_(None))
        .group_by(Job.flow_key)
        .scalar_subquery()
    )
    rows = (await ctx.session.execute(select(Job).where(Job.job_id.in_(newest)))).scalars()
    return {
        j.flow_key: {
            "job_id": j.job_id,
            "status": st.display(j.status, j.status_reason),
            "created_at": ts(j.created_at),
            "completed_at": ts(j.completed_at),
        }
        for j in rows
        if j.flow_key is not None
    }


class FlowHealthIn(Input):
    flow_id: int = Field(ge=1, description="Flow")


class FlowHealthOut(Output):
    flow_id: int = Field(description="Flow id")
    consecutive_failures: int = Field(description="Consecutive failed runs (reset by a successful run)")
    consecutive_no_items: int = Field(description="Consecutive runs that found no new items")
    latest_job: LatestJob | None = Field(description="The newest top-level job, or null")
    threshold: int = Field(description="The problem_flow_threshold setting")
    health: Literal["ok", "failing", "idle"] = Field(
        description="failing when failures ≥ threshold, else idle when no-items ≥ threshold, else ok"
    )


@ability(
    "get-flow-health",
    toolset="jobs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Get a flow's failure streaks and latest job."),
)
async def get_flow_health(ctx: AbilityContext, inp: FlowHealthIn) -> FlowHealthOut:
    flow = await load_flow(ctx, inp.flow_id, "viewer", mutating=False)
    threshold = (await ctx.settings()).int("problem_flow_threshold")
    latest = (await latest_jobs(ctx, [flow.flow_id])).get(flow.flow_id)
    if flow.consecutive_failures >= threshold:
        health = "failing"
    elif flow.consecutive_no_items >= threshold:
        health = "idle"
    else:
        health = "ok"
    return FlowHealthOut(
        flow_id=flow.flow_id,
        consecutive_failures=flow.consecutive_failures,
        consecutive_no_items=flow.consecutive_no_items,
        latest_job=latest,
        threshold=threshold,
        health=health,
    )


class ProblemFlowsIn(Input):
    threshold: int | None = Field(None, ge=1, description="Minimum streak")
    agent_id: int | None = Field(None, ge=1, description="Agent filter")


class FailingFlow(Output):
    flow_id: int = Field(description="Flow id")
    flow_name: str = Field(description="Flow name")
    pipeline_id: int = Field(description="Pipeline id")
    consecutive_failures: int = Field(description="Consecutive failed runs")
    latest_job: LatestJob | None = Field(description="The newest top-level job, or null")


class IdleFlow(Output):
    flow_id: int = Field(description="Flow id")
    flow_name: str = Field(description="Flow name")
    pipeline_id: int = Field(description="Pipeline id")
    consecutive_no_items: int = Field(description="Consecutive runs without new items")
    latest_job: LatestJob | None = Field(description="The newest top-level job, or null")


class ProblemFlowsOut(Output):
    failing: list[FailingFlow] = Field(description="Flows failing at least threshold times in a row, worst first")
    idle: list[IdleFlow] = Field(description="Flows finding nothing at least threshold times in a row, worst first")
    count: int = Field(description="Distinct problem flows")
    threshold: int = Field(description="Threshold used")
    message: str = Field(description="Human-readable summary")


@ability(
    "get-problem-flows",
    toolset="jobs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="List flows that keep failing or finding no new items.",
)
async def get_problem_flows(ctx: AbilityContext, inp: ProblemFlowsIn) -> ProblemFlowsOut:
    threshold = inp.threshold or (await ctx.settings()).int("problem_flow_threshold")
    conds: list[Any] = [await ctx.access.scope_filter(Flow.agent_id, Flow.user_id)]
    if inp.agent_id is not None:
        await check_agent_filter(ctx, inp.agent_id)
        conds.append(Flow.agent_id == inp.agent_id)
    failing = list(
        (
            await ctx.session.execute(
                select(Flow)
                .where(*conds, Flow.consecutive_failures >= threshold)
                .order_by(Flow.consecutive_failures.desc(), Flow.flow_id)
            )
        ).scalars()
    )
    idle = list(
        (
            await ctx.session.execute(
                select(Flow)
                .where(*conds, Flow.consecutive_no_items >= threshold)
                .order_by(Flow.consecutive_no_items.desc(), Flow.flow_id)
            )
        ).scalars()
    )
    latest = await latest_jobs(ctx, sorted({f.flow_id for f in failing + idle}))
    count = len({f.flow_id for f in failing + idle})
    message = (
        f"{count} problem flow(s) at threshold {threshold}: {len(failing)} failing, {len(idle)} finding no items."
        if count
        else f"No problem flows at threshold {threshold}."
    )
    return ProblemFlowsOut(
        failing=[
            {
                "flow_id": f.flow_id,
                "flow_name": f.flow_name,
                "pipeline_id": f.pipeline_id,
                "consecutive_failures": f.consecutive_failures,
                "latest_job": latest.get(f.flow_id),
            }
            for f in failing
        ],
        idle=[
            {
                "flow_id": f.flow_id,
                "flow_name": f.flow_name,
                "pipeline_id": f.pipeline_id,
                "consecutive_no_items": f.consecutive_no_items,
                "latest_job": latest.get(f.flow_id),
            }
            for f in idle
        ],
        count=count,
        threshold=threshold,
        message=message,
    )


# --- get-run-metrics --------------------------------------------------------------------------


class RunMetricsIn(Input):
    job_id: int = Field(ge=1, description="Job")


class RunTimestamps(Output):
    created_at: str = Field(description="ISO 8601 UTC")
    started_at: str | None = Field(description="First claim by a worker")
    completed_at: str | None = Field(description="When the job became final")
    updated_at: str = Field(description="Last change")


class RunMetrics(Output):
    job_id: int = Field(description="Job id")
    status: str = Field(description="Display status")
    run_trigger: str = Field(description="What created the job")
    source: str = Field(description="Job source")
    label: str | None = Field(description="Job label")
    flow_id: int | str | None = Field(description='Flow id, "direct" or null')
    pipeline_id: int | str | None = Field(description='Pipeline id, "direct" or null')
    parent_job_id: int | None = Field(description="Batch parent")
    attempts: int = Field(description="Starts of the current step")
    max_attempts: int = Field(description="Maximum starts of one step")
    timestamps: RunTimestamps = Field(description="Lifecycle timestamps")
    duration_ms: int = Field(description="Run time (so far, while active)")
    steps_run: int = Field(description="Steps that ran")
    items_processed: int = Field(description="Items completed (so far: items claimed, while active)")
    retries: int = Field(description="Automatic retries")
    step_results: list[dict[str, Any]] = Field(description="Per-step results in run order, each with flow_step_id")
    fetch_stages: dict[str, Any] | None = Opt("The fetch step's item funnel")
    child_jobs: dict[str, int] = Field(description="Child jobs per base status, plus total")
    batch_results: dict[str, int] | None = Opt("Batch parent results {completed, failed, skipped, cancelled, total}")
    token_usage: dict[str, int] = Field(description="AI token usage {prompt_tokens, completion_tokens, total_tokens}")


class RunMetricsOut(Output):
    metrics: RunMetrics = Field(description="Metrics of the job")


def _duration(job: Job, now: datetime) -> int:
    start = job.started_at or job.created_at
    end = job.completed_at or now
    return max(0, int((end - start).total_seconds() * 1000)) if start else 0


@ability(
    "get-run-metrics",
    toolset="jobs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Get a job's metrics: steps, items, retries, timings, AI tokens."),
)
async def get_run_metrics(ctx: AbilityContext, inp: RunMetricsIn) -> RunMetricsOut:
    job, _ = await load_job(ctx, inp.job_id, "viewer", mutating=False)
    data = job.engine_data or {}
    results = [
        {"flow_step_id": fsid, **mask(entry)}
        for fsid, entry in (data.get("step_results") or {}).items()
        if isinstance(entry, dict)
    ]
    results.sort(key=lambda r: str(r.get("started_at") or ""))
    fetch_stages = next((r["fetch_stages"] for r in results if isinstance(r.get("fetch_stages"), dict)), None)
    run = data.get("run_metrics") if job.status in st.FINAL else None
    if isinstance(run, dict):
        steps_run = int(run.get("steps_run", 0))
        items = int(run.get("items_processed", 0))
        retries = int(run.get("retries", 0))
        duration = int(run.get("duration_ms", 0))
    else:
        steps_run = len(results)
        items = int(
            (
                await ctx.session.execute(
                    select(func.count()).select_from(ProcessedItem).where(ProcessedItem.job_id == job.job_id)
                )
            ).scalar()
            or 0
        )
        retries = int((data.get("retry") or {}).get("total_retries", 0))
        duration = _duration(job, utcnow())
    rows = await ctx.session.execute(
        select(Job.status, func.count()).where(Job.parent_job_id == job.job_id).group_by(Job.status)
    )
    children = {status: int(n) for status, n in rows.all()}
    children["total"] = sum(children.values())
    # A batch parent's usage includes its children's: written when it completes, summed live before.
    if data.get("batch") and job.status not in st.FINAL:
        tokens = await with_children(ctx.session, job)
    else:
        tokens = own_usage(data)
    metrics = {
        "job_id": job.job_id,
        "status": st.display(job.status, job.status_reason),
        "run_trigger": job.run_trigger,
        "source": job.source,
        "label": job.label,
        "flow_id": job_ref(job.flow_id),
        "pipeline_id": job_ref(job.pipeline_id),
        "parent_job_id": job.parent_job_id,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "timestamps": {
            "created_at": ts(job.created_at),
            "started_at": ts(job.started_at),
            "completed_at": ts(job.completed_at),
            "updated_at": ts(job.updated_at),
        },
        "duration_ms": duration,
        "steps_run": steps_run,
        "items_processed": items,
        "retries": retries,
        "step_results": results,
        "fetch_stages": fetch_stages,
        "child_jobs": children,
        "batch_results": data.get("batch_results") if isinstance(data.get("batch_results"), dict) else None,
        "token_usage": tokens,
    }
    return RunMetricsOut.model_validate({"metrics": metrics})
