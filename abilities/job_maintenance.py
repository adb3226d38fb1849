"""Jobs toolset, maintenance: delete-jobs and recover-stuck-jobs (docs/engine.md, Recovery and maintenance).

Each mutation writes one audit row; after it commits the changed jobs are announced through the engine
(local waiters, ``datamachine://jobs/{id}`` subscribers).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from sqlalchemy import delete, func, select

from datamachine_mcp.abilities.agent_common import agent_owner
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.job_common import load_job
from datamachine_mcp.abilities.jobs import JobRef, publish_changes, ref_condition, role_condition
from datamachine_mcp.abilities.pipeline_common import load_flow, load_pipeline
from datamachine_mcp.abilities.questions import confirmation
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output
from datamachine_mcp.engine import front
from datamachine_mcp.engine import status as st
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.models import Agent, Job, ProcessedItem

CHUNK = 500


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


# --- delete-jobs ------------------------------------------------------------------------------


class DeleteJobsIn(Input):
    type: Literal["all", "failed"] = Field(description="all final jobs, or failed only")
    flow_id: JobRef | None = Field(None, description='Flow, or "direct"')
    pipeline_id: JobRef | None = Field(None, description='Pipeline, or "direct"')
    agent_id: int | None = Field(None, ge=1, description="Agent filter")
    cleanup_processed: bool = Field(False, description="Also their processed items")


class DeleteJobsOut(Output):
    deleted_count: int = Field(description="Job rows deleted, batch children included")
    processed_items_cleaned: int = Field(description="processed_items rows of the deleted jobs removed")
    skipped_active: int = Field(description="Jobs matched but kept because they (or a child) are still active")
    message: str = Field(description="Human-readable result")


async def _descendants(session: Any, roots: list[int]) -> dict[int, list[int]]:
    """root id → every descendant id (batch children, nested)."""
    out: dict[int, list[int]] = {r: [] for r in roots}
    owner: dict[int, int] = {r: r for r in roots}
    frontier = list(roots)
    while frontier:
        found: list[tuple[int, int]] = []
        for chunk in _chunks(frontier):
            rows = await session.execute(select(Job.job_id, Job.parent_job_id).where(Job.parent_job_id.in_(chunk)))
            found.extend((r[0], r[1]) for r in rows.all())
        frontier = []
        for child, parent in found:
            root = owner[parent]
            owner[child] = root
            out[root].append(child)
            frontier.append(child)
    return out


def _delete_jobs_question(inp: DeleteJobsIn) -> str:
    kind = "failed" if inp.type == "failed" else "finished"
    scope = [f"{name} {value}" for name, value in (("flow", inp.flow_id), ("pipeline", inp.pipeline_id)) if value]
    if inp.agent_id is not None:
        scope.append(f"agent {inp.agent_id}")
    extra = " and the items they processed" if inp.cleanup_processed else ""
    return f"Delete the {kind} jobs of {', '.join(scope) or 'every agent'}{extra}?"


@ability(
    "delete-jobs",
    ask=confirmation(_delete_jobs_question),
    toolset="jobs",
    level="admin",
    destructive=True,
    idempotent=True,
    transaction="manual",
    description=("Delete finished (or failed) jobs."),
)
async def delete_jobs(ctx: AbilityContext, inp: DeleteJobsIn) -> DeleteJobsOut:
    async with ctx.transaction() as session:
        if inp.flow_id is None and inp.pipeline_id is None and inp.agent_id is None:
            ctx.access.require_global_admin(
                "delete-jobs without a flow_id, pipeline_id or agent_id filter (all agents' jobs)"
            )
        conds: list[Any] = [Job.parent_job_id.is_(None), await role_condition(ctx, "admin")]
        if isinstance(inp.flow_id, int):
            await load_flow(ctx, inp.flow_id, "admin", mutating=True)
        if inp.flow_id is not None:
            conds.append(ref_condition(Job.flow_id, Job.flow_key, inp.flow_id))
        if isinstance(inp.pipeline_id, int):
            await load_pipeline(ctx, inp.pipeline_id, "admin", mutating=True)
        if inp.pipeline_id is not None:
            conds.append(ref_condition(Job.pipeline_id, Job.pipeline_key, inp.pipeline_id))
        if inp.agent_id is not None:
            agent = await session.get(Agent, inp.agent_id)
            if agent is None:
                raise AbilityError("agent_not_found", f"Agent {inp.agent_id} not found.", agent_id=inp.agent_id)
            await ctx.access.authorize(
                agent_owner(agent), "admin", mutating=True, target={"type": "agent", "id": inp.agent_id}
            )
            conds.append(Job.agent_id == inp.agent_id)
        wanted = st.FINAL if inp.type == "all" else (st.FAILED,)
        roots = [r[0] for r in (await session.execute(select(Job.job_id).where(*conds, Job.status.in_(wanted)))).all()]
        skipped = 0
        if inp.type == "all":
            skipped = int(
                (
                    await session.execute(
                        select(func.count()).select_from(Job).where(*conds, Job.status.in_(st.ACTIVE))
                    )
                ).scalar()
                or 0
            )
        tree = await _descendants(session, roots)
        active_children: set[int] = set()
        all_children = [c for kids in tree.values() for c in kids]
        for chunk in _chunks(all_children):
            rows = await session.execute(select(Job.job_id).where(Job.job_id.in_(chunk), Job.status.in_(st.ACTIVE)))
            active_children.update(r[0] for r in rows.all())
        # A final parent can have an active child again after retry-job; the tree stays until it ends.
        kept = [r for r in roots if not any(c in active_children for c in tree[r])]
        skipped += len(roots) - len(kept)
        doomed = kept + [c for r in kept for c in tree[r]]
        cleaned = 0
        if inp.cleanup_processed:
            for chunk in _chunks(doomed):
                result = await session.execute(delete(ProcessedItem).where(ProcessedItem.job_id.in_(chunk)))
                cleaned += rowcount(result)
        for chunk in _chunks(kept):
            # Children go with their parent (ON DELETE CASCADE); processed rows keep existing with job_id NULL.
            await session.execute(delete(Job).where(Job.job_id.in_(chunk)).execution_options(synchronize_session=False))
        if doomed:
            filters = [
                f"{name}={value}"
                for name, value in (
                    ("flow_id", inp.flow_id),
                    ("pipeline_id", inp.pipeline_id),
                    ("agent_id", inp.agent_id),
                )
                if value is not None
            ]
            await ctx.audit(
                f"deleted {len(doomed)} {inp.type if inp.type == 'failed' else 'final'} jobs",
                target=("jobs", inp.type),
                changes=[f"deleted: {len(doomed)} jobs ({len(kept)} top-level)"]
                + ([f"processed_items cleaned: {cleaned}"] if inp.cleanup_processed else [])
                + filters,
                agent_id=inp.agent_id,
                flow_id=inp.flow_id if isinstance(inp.flow_id, int) else None,
                pipeline_id=inp.pipeline_id if isinstance(inp.pipeline_id, int) else None,
                deleted_job_ids=doomed[:1000],
            )
    await publish_changes(ctx, front.Changes(jobs=set(doomed)))
    parts = [f"Deleted {len(doomed)} job(s)"]
    if inp.cleanup_processed:
        parts.append(f"cleaned {cleaned} processed item(s)")
    if skipped:
        parts.append(f"kept {skipped} active job(s)")
    return DeleteJobsOut(
        deleted_count=len(doomed),
        processed_items_cleaned=cleaned,
        skipped_active=skipped,
        message=", ".join(parts) + ".",
    )


# --- recover-stuck-jobs -----------------------------------------------------------------------


class RecoverIn(Input):
    dry_run: bool = Field(False, description="Report only")
    flow_id: int | None = Field(None, ge=1, description="Flow filter")
    job_id: int | None = Field(None, ge=1, description="Only this job")
    older_than_minutes: int | None = Field(
        None,
        ge=1,
        le=10080,
        description="Also recover steps running this long",
    )
    limit: int = Field(100, ge=1, le=1000, description="Most jobs per call")


class RecoveredJob(Output):
    job_id: int = Field(description="Job id")
    previous_status: str = Field(description="Status before recovery")
    new_status: str = Field(description="Status after recovery (display form)")
    action: str = Field(description="requeued, failed, wait_timed_out or parent_completed")


class RecoverOut(Output):
    requeued: int = Field(description="Processing jobs with an expired lease put back to pending")
    failed: int = Field(description="Processing jobs with an expired lease and no attempts left, failed")
    timed_out_waits: int = Field(description="Waiting jobs past their wait timeout, failed")
    parents_completed: int = Field(description="Batch parents whose children were all final, completed")
    leases_voided: int = Field(description="Leases voided because of older_than_minutes")
    limit_reached: bool = Field(description="More jobs may need recovery: call again")
    dry_run: bool = Field(description="Nothing was changed")
    jobs: list[RecoveredJob] = Field(description="The affected jobs")
    message: str = Field(description="Human-readable result")


@ability(
    "recover-stuck-jobs",
    toolset="jobs",
    level="operator",
    idempotent=True,
    transaction="manual",
    description=("Recover stuck jobs now."),
)
async def recover_stuck_jobs(ctx: AbilityContext, inp: RecoverIn) -> RecoverOut:
    engine = ctx.runtime.engine
    if engine is None:
        raise AbilityError("engine_unavailable", "This process has no engine attached; recovery is not possible.")
    async with ctx.reading():
        if inp.flow_id is None and inp.job_id is None:
            ctx.access.require_global_admin("recover-stuck-jobs without a flow_id or job_id filter (all agents)")
        if inp.job_id is not None:
            await load_job(ctx, inp.job_id, "operator", mutating=not inp.dry_run)
        if inp.flow_id is not None:
            await load_flow(ctx, inp.flow_id, "operator", mutating=not inp.dry_run)
        where = await role_condition(ctx, "operator")
    # recover() runs the maintenance steps in its own short transactions and announces what changed.
    report = await front.recover(
        engine,
        dry_run=inp.dry_run,
        flow_id=inp.flow_id,
        job_id=inp.job_id,
        older_than_minutes=inp.older_than_minutes,
        limit=inp.limit,
        where=where,
    )
    if not inp.dry_run and (report["jobs"] or report["leases_voided"]):
        async with ctx.transaction():
            await ctx.audit(
                report["message"],
                target=("job", inp.job_id) if inp.job_id else ("flow", inp.flow_id) if inp.flow_id else ("jobs", "all"),
                changes=[
                    f"job {j['job_id']}: {j['previous_status']} -> {j['new_status']}" for j in report["jobs"][:100]
                ]
                + ([f"leases voided: {report['leases_voided']}"] if report["leases_voided"] else []),
                job_id=inp.job_id,
                flow_id=inp.flow_id,
            )
    return RecoverOut.model_validate(report)
