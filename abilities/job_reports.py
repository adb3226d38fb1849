"""Jobs toolset, reads: get-jobs and get-jobs-summary.

Every listing is scoped to the rows the principal may read (docs/access.md, List scoping) and every count is computed
over that same set. Flow health, problem flows and run metrics are in ``abilities.job_stats``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import func, select

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.job_common import JobOut, job_ref, load_job, redact
from datamachine_mcp.abilities.jobs import BaseStatus, JobRef, describe_jobs, ref_condition
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, DateTimeIn, Input, Opt, Output, PageOut
from datamachine_mcp.abilities.uris import JOB
from datamachine_mcp.engine import status as st
from datamachine_mcp.storage.models import Agent, Flow, Job, Pipeline
from datamachine_mcp.storage.timeutil import iso

RunTrigger = Literal["manual", "schedule", "webhook", "batch", "workflow", "system"]
OrderBy = Literal["job_id", "created_at", "completed_at", "updated_at", "status", "flow_id", "pipeline_id"]
BREAKDOWN_LIMIT = 50


async def check_agent_filter(ctx: AbilityContext, agent_id: int) -> None:
    """An explicit agent filter: the agent must exist and be readable."""
    agent = await ctx.session.get(Agent, agent_id)
    if agent is None:
        raise AbilityError("agent_not_found", f"Agent {agent_id} not found.", agent_id=agent_id)
    await ctx.access.check_agent_filter(agent.agent_id, agent.agent_slug)


def all_counts(pairs: dict[str, int]) -> dict[str, int]:
    """Every base status (0 when absent) plus total."""
    counts = {status: int(pairs.get(status, 0)) for status in st.ALL}
    counts["total"] = sum(counts.values())
    return counts


# --- get-jobs ---------------------------------------------------------------------------------


class GetJobsIn(Input):
    job_id: int | None = Field(None, ge=1, description="One job, with packets")
    flow_id: JobRef | None = Field(None, description='Flow, or "direct"')
    pipeline_id: JobRef | None = Field(None, description='Pipeline, or "direct"')
    agent_id: int | None = Field(None, ge=1, description="Agent filter")
    user_id: int | None = Field(None, ge=0, description="User filter (0 = shared)")
    status: BaseStatus | None = Field(None, description="Base status")
    source: str | None = Field(None, max_length=50, description="Source filter")
    run_trigger: RunTrigger | None = Field(None, description="What created the job")
    handler: str | None = Field(None, max_length=100, description="Handler slug")
    since: DateTimeIn | None = Field(None, description="Created at or after (UTC)")
    parent_job_id: int | None = Field(None, ge=1, description="Batch parent filter")
    hide_children: bool = Field(False, description="Exclude batch child jobs")
    metadata: dict[str, Any] | None = Field(None, description="{engine_data.dot.path: value} exact matches")
    metadata_scan_limit: int = Field(1000, ge=1, le=5000, description="Rows scanned for metadata")
    include_engine_data: bool = Field(False, description="Add engine_data")
    orderby: OrderBy = Field("job_id", description="Sort column")
    order: Literal["ASC", "DESC"] = Field("DESC", description="Sort direction")
    per_page: int = Field(50, ge=1, le=100, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class GetJobsOut(PageOut):
    jobs: list[JobOut] = Field(description="Jobs (single mode: with engine_data and packets)")
    filters_applied: dict[str, Any] = Field(description="The filters used")
    metadata_scan_truncated: bool | None = Opt(
        "metadata filters only: more candidates matched the SQL filters than metadata_scan_limit"
    )


_MISSING = object()


def dot_path(data: Any, path: str) -> Any:
    """The value at a dotted path (list elements by index), or a sentinel when absent."""
    value = data
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _sort_value(job: Job, orderby: str) -> Any:
    return {
        "job_id": job.job_id,
        "created_at": job.created_at,
        "completed_at": job.completed_at,
        "updated_at": job.updated_at,
        "status": job.status,
        "flow_id": job.flow_key,
        "pipeline_id": job.pipeline_key,
    }[orderby]


def sort_jobs(jobs: list[Job], orderby: str, descending: bool) -> list[Job]:
    """The SQL order in Python: the column, NULLs last in both directions, job_id as tie-break."""
    present = [j for j in jobs if _sort_value(j, orderby) is not None]
    absent = [j for j in jobs if _sort_value(j, orderby) is None]
    present.sort(key=lambda j: (_sort_value(j, orderby), j.job_id), reverse=descending)
    absent.sort(key=lambda j: j.job_id, reverse=descending)
    return present + absent


def _order_column(orderby: str) -> Any:
    return {
        "job_id": Job.job_id,
        "created_at": Job.created_at,
        "completed_at": Job.completed_at,
        "updated_at": Job.updated_at,
        "status": Job.status,
        "flow_id": Job.flow_key,
        "pipeline_id": Job.pipeline_key,
    }[orderby]


async def job_conditions(ctx: AbilityContext, inp: Any, applied: dict[str, Any]) -> list[Any]:
    """The scope plus the explicit filters shared by get-jobs and get-jobs-summary."""
    conds: list[Any] = [await ctx.access.scope_filter(Job.agent_id, Job.user_id)]
    if inp.agent_id is not None:
        await check_agent_filter(ctx, inp.agent_id)
        conds.append(Job.agent_id == inp.agent_id)
        applied["agent_id"] = inp.agent_id
    elif getattr(inp, "user_id", None) is not None:
        ctx.access.check_user_filter(inp.user_id)
        conds.append(Job.user_id == inp.user_id)
        applied["user_id"] = inp.user_id
    if inp.flow_id is not None:
        conds.append(ref_condition(Job.flow_id, Job.flow_key, inp.flow_id))
        applied["flow_id"] = inp.flow_id
    if inp.pipeline_id is not None:
        conds.append(ref_condition(Job.pipeline_id, Job.pipeline_key, inp.pipeline_id))
        applied["pipeline_id"] = inp.pipeline_id
    if inp.status is not None:
        conds.append(Job.status == inp.status)
        applied["status"] = inp.status
    if inp.source is not None:
        conds.append(Job.source == inp.source)
        applied["source"] = inp.source
    if inp.handler is not None:
        conds.append(Job.handler_slug == inp.handler)
        applied["handler"] = inp.handler
    if inp.since is not None:
        conds.append(Job.created_at >= inp.since)
        applied["since"] = iso(inp.since)
    if getattr(inp, "run_trigger", None) is not None:
        conds.append(Job.run_trigger == inp.run_trigger)
        applied["run_trigger"] = inp.run_trigger
    if getattr(inp, "parent_job_id", None) is not None:
        conds.append(Job.parent_job_id == inp.parent_job_id)
        applied["parent_job_id"] = inp.parent_job_id
    if getattr(inp, "hide_children", False):
        conds.append(Job.parent_job_id.is_(None))
        applied["hide_children"] = True
    return conds


@ability(
    "get-jobs",
    core=True,
    links={"jobs[].job_id": JOB},
    toolset="jobs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Get one job with its packets, or list jobs newest first."),
)
async def get_jobs(ctx: AbilityContext, inp: GetJobsIn) -> GetJobsOut:
    if inp.job_id is not None:
        applied: dict[str, Any] = {"job_id": inp.job_id}
        job, _ = await load_job(ctx, inp.job_id, "viewer", mutating=False)  # job_not_found when missing
        rows = await describe_jobs(ctx, [job], engine_data=True, packets=True)
        return GetJobsOut(jobs=rows, total=len(rows), per_page=inp.per_page, offset=inp.offset, filters_applied=applied)
    applied = {}
    conds = await job_conditions(ctx, inp, applied)
    descending = inp.order == "DESC"
    truncated = None
    if inp.metadata:
        applied["metadata"] = inp.metadata
        matched_sql = int(
            (await ctx.session.execute(select(func.count()).select_from(Job).where(*conds))).scalar() or 0
        )
        candidates = list(
            (
                await ctx.session.execute(
                    select(Job).where(*conds).order_by(Job.job_id.desc()).limit(inp.metadata_scan_limit)
                )
            ).scalars()
        )
        truncated = matched_sql > inp.metadata_scan_limit
        wanted = list(inp.metadata.items())
        # Matched against the redacted view (envelopes masked, no trace), so filters reveal nothing more.
        matches = [
            j
            for j in candidates
            if all(dot_path(redact(j.engine_data, admin=False), path) == value for path, value in wanted)
        ]
        total = len(matches)
        page = sort_jobs(matches, inp.orderby, descending)[inp.offset : inp.offset + inp.per_page]
    else:
        total = int((await ctx.session.execute(select(func.count()).select_from(Job).where(*conds))).scalar() or 0)
        column = _order_column(inp.orderby)
        order = [column.desc().nulls_last() if descending else column.asc().nulls_last()]
        if inp.orderby != "job_id":
            order.append(Job.job_id.desc() if descending else Job.job_id.asc())
        page = list(
            (
                await ctx.session.execute(
                    select(Job).where(*conds).order_by(*order).limit(inp.per_page).offset(inp.offset)
                )
            ).scalars()
        )
    rows = await describe_jobs(ctx, page, engine_data=inp.include_engine_data)
    return GetJobsOut(
        jobs=rows,
        total=total,
        per_page=inp.per_page,
        offset=inp.offset,
        filters_applied=applied,
        metadata_scan_truncated=truncated,
    )


# --- get-jobs-summary -------------------------------------------------------------------------


class JobsSummaryIn(Input):
    flow_id: JobRef | None = Field(None, description='Flow, or "direct"')
    pipeline_id: JobRef | None = Field(None, description='Pipeline, or "direct"')
    agent_id: int | None = Field(None, ge=1, description="Agent filter")
    handler: str | None = Field(None, max_length=100, description="Handler slug")
    status: BaseStatus | None = Field(None, description="Status filter")
    source: str | None = Field(None, max_length=50, description="Source filter")
    since: DateTimeIn | None = Field(None, description="Created at or after (UTC)")
    compact: bool = Field(False, description="Totals only")


class StatusCounts(Output):
    pending: int = Field(description="Jobs waiting to be claimed")
    processing: int = Field(description="Jobs running (or batch parents waiting for children)")
    waiting: int = Field(description="Jobs parked at an approval or webhook gate")
    completed: int = Field(description="Jobs that ran to the end")
    failed: int = Field(description="Failed jobs")
    cancelled: int = Field(description="Cancelled jobs")
    completed_no_items: int = Field(description="Jobs that found nothing to do")
    agent_skipped: int = Field(description="Jobs a step skipped")


class PipelineCounts(Output):
    pipeline_id: int | str = Field(description='Pipeline id or "direct"')
    pipeline_name: str | None = Field(description="Current pipeline name (null for direct jobs)")
    counts: dict[str, int] = Field(description="Jobs per base status, plus total")


class FlowCounts(Output):
    flow_id: int | str = Field(description='Flow id or "direct"')
    flow_name: str | None = Field(description="Current flow name (null for direct jobs)")
    counts: dict[str, int] = Field(description="Jobs per base status, plus total")


class HandlerCounts(Output):
    handler: str = Field(description="handler_slug")
    counts: dict[str, int] = Field(description="Jobs per base status, plus total")


class JobsSummaryOut(Output):
    summary: StatusCounts = Field(description="Jobs per base status (every status present)")
    total: int = Field(description="All matching jobs")
    by_pipeline: list[PipelineCounts] | None = Opt("Per pipeline, by total descending (at most 50)")
    by_flow: list[FlowCounts] | None = Opt("Per flow, by total descending (at most 50)")
    by_handler: list[HandlerCounts] | None = Opt("Per handler, by total descending (at most 50)")


async def _grouped(ctx: AbilityContext, column: Any, conds: list[Any]) -> list[tuple[Any, dict[str, int]]]:
    rows = await ctx.session.execute(
        select(column, Job.status, func.count()).where(*conds, column.is_not(None)).group_by(column, Job.status)
    )
    grouped: dict[Any, dict[str, int]] = {}
    for key, status, n in rows.all():
        grouped.setdefault(key, {})[status] = int(n)
    out = [(key, all_counts(pairs)) for key, pairs in grouped.items()]
    out.sort(key=lambda kv: (-kv[1]["total"], str(kv[0]).zfill(20)))
    return out[:BREAKDOWN_LIMIT]


@ability(
    "get-jobs-summary",
    toolset="jobs",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Count jobs by status, per pipeline, flow and handler."),
)
async def get_jobs_summary(ctx: AbilityContext, inp: JobsSummaryIn) -> JobsSummaryOut:
    conds = await job_conditions(ctx, inp, {})
    rows = await ctx.session.execute(select(Job.status, func.count()).where(*conds).group_by(Job.status))
    counts = all_counts({status: int(n) for status, n in rows.all()})
    total = counts.pop("total")
    out: dict[str, Any] = {"summary": counts, "total": total}
    if not inp.compact:
        by_pipeline = await _grouped(ctx, Job.pipeline_id, conds)
        ids = [int(k) for k, _ in by_pipeline if k != "direct"]
        names: dict[int | str | None, str] = dict(
            (
                await ctx.session.execute(
                    select(Pipeline.pipeline_id, Pipeline.pipeline_name).where(Pipeline.pipeline_id.in_(ids))
                )
            ).all()
        )
        out["by_pipeline"] = [
            {"pipeline_id": job_ref(k), "pipeline_name": names.get(job_ref(k)), "counts": c} for k, c in by_pipeline
        ]
        by_flow = await _grouped(ctx, Job.flow_id, conds)
        ids = [int(k) for k, _ in by_flow if k != "direct"]
        names = dict(
            (await ctx.session.execute(select(Flow.flow_id, Flow.flow_name).where(Flow.flow_id.in_(ids)))).all()
        )
        out["by_flow"] = [{"flow_id": job_ref(k), "flow_name": names.get(job_ref(k)), "counts": c} for k, c in by_flow]
        out["by_handler"] = [{"handler": k, "counts": c} for k, c in await _grouped(ctx, Job.handler_slug, conds)]
    return JobsSummaryOut.model_validate(out)
