"""Status changes of jobs: compare-and-set transitions, terminal accounting exactly once, batch parents,
and the manual controls fail / cancel / retry (engine.md §2.4, §4, §9.3, §11.5).

Every function runs inside the caller's write transaction; the returned ``Changes`` tell the caller
which jobs and flows to announce after commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine import claims
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.token_usage import with_children
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import Flow, Job


@dataclass
class Changes:
    """Jobs and flows changed by a transaction, announced after it commits."""

    jobs: set[int] = field(default_factory=set)
    flows: set[tuple[int, int]] = field(default_factory=set)  # (flow_id, pipeline_id)

    def merge(self, other: Changes) -> None:
        self.jobs |= other.jobs
        self.flows |= other.flows


def ed(job: Job) -> dict[str, Any]:
    return dict(job.engine_data or {})


def log_owner(job: Job) -> dict[str, Any]:
    return {"agent_id": job.agent_id, "user_id": job.user_id or None}


def log_context(job: Job, **extra: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {"job_id": job.job_id}
    if job.flow_key is not None:
        ctx["flow_id"] = job.flow_key
    if job.pipeline_key is not None:
        ctx["pipeline_id"] = job.pipeline_key
    ctx.update(extra)
    return ctx


def _duration_ms(job: Job, now: datetime) -> int:
    start = job.started_at or job.created_at
    return max(0, int((now - start).total_seconds() * 1000)) if start else 0


async def cas(
    session: AsyncSession, job_id: int, allowed_from: tuple[str, ...], owner: str | None = None, **values: Any
) -> bool:
    """``UPDATE jobs SET … WHERE job_id = ? AND status IN (…) [AND lease_owner = owner]``; True when it applied."""
    stmt = update(Job).where(Job.job_id == job_id, Job.status.in_(allowed_from))
    if owner is not None:
        stmt = stmt.where(Job.lease_owner == owner)
    result = await session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    return bool(rowcount(result))


async def reload(session: AsyncSession, job_id: int) -> Job | None:
    return (
        await session.execute(select(Job).where(Job.job_id == job_id).execution_options(populate_existing=True))
    ).scalar_one_or_none()


async def finish(
    session: AsyncSession,
    job_id: int,
    to_status: str,
    reason: str | None,
    *,
    now: datetime,
    allowed_from: tuple[str, ...] = st.ACTIVE,
    lease_owner: str | None = None,
    engine_updates: dict[str, Any] | None = None,
    packets: list[Any] | None = None,
    log_level: str = "info",
    threshold: str = "debug",
    approval_status: str | None = None,
) -> Changes | None:
    """Move a job to a final status with terminal accounting (engine.md §4). None when the CAS missed."""
    assert to_status in st.FINAL
    values: dict[str, Any] = {
        "status": to_status,
        "status_reason": st.clip_reason(reason),
        "completed_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
    }
    if packets is not None:
        values["packets"] = packets
    if not await cas(session, job_id, allowed_from, lease_owner, **values):
        return None
    job = await reload(session, job_id)
    assert job is not None
    return await account(
        session, job, now=now, engine_updates=engine_updates, threshold=threshold, approval_status=approval_status
    )


async def account(
    session: AsyncSession,
    job: Job,
    *,
    now: datetime,
    engine_updates: dict[str, Any] | None = None,
    threshold: str = "debug",
    approval_status: str | None = None,
) -> Changes:
    """Terminal accounting of a job that just became final, in the same transaction (engine.md §4)."""
    changes = Changes(jobs={job.job_id})
    data = ed(job)
    if engine_updates:
        data.update(engine_updates)
    dry_run = bool(data.get("dry_run_mode"))
    final = job.status
    settled = 0
    # 2. settle claims (dry runs claim nothing)
    if not dry_run:
        settled = await claims.settle(session, job.job_id, final, now)
    # 3. queue backups: restored on failure/cancel, dropped otherwise
    backups = data.pop("queue_backups", None)
    if backups and final in (st.FAILED, st.CANCELLED) and job.flow_key is not None:
        await restore_queue_entries(session, job.flow_key, backups)
    if approval_status and isinstance(data.get("approval"), dict) and data["approval"].get("status") == "pending":
        data["approval"] = {**data["approval"], "status": approval_status}
    # 1 (continued). run metrics
    retry = data.get("retry") or {}
    data["run_metrics"] = {
        "steps_run": len(data.get("step_results") or {}),
        "items_processed": settled if final in st.SUCCESS else 0,
        "retries": int(retry.get("total_retries", 0)),
        "duration_ms": _duration_ms(job, now),
    }
    data.pop("job_status", None)
    job.engine_data = data
    top_level = job.parent_job_id is None
    # 4. flow health and 5. one-time reset (top-level, real pipeline runs)
    if job.flow_key is not None and top_level and not dry_run:
        flow = await session.get(Flow, job.flow_key)
        if flow is not None:
            changes.flows.add((flow.flow_id, flow.pipeline_id))
            if final != st.CANCELLED:
                flow.last_run_status = st.display(final, job.status_reason)
                if final == st.FAILED:
                    flow.consecutive_failures += 1
                    flow.consecutive_no_items = 0
                elif final == st.NO_ITEMS:
                    flow.consecutive_no_items += 1
                    flow.consecutive_failures = 0
                else:
                    flow.consecutive_failures = 0
                    flow.consecutive_no_items = 0
            schedule = flow.scheduling_config or {}
            if job.run_trigger == "schedule" and schedule.get("interval") == "one_time":
                reset: dict[str, Any] = {"interval": "manual"}
                if "webhook" in schedule:
                    reset["webhook"] = schedule["webhook"]
                flow.scheduling_config = reset
                flow.next_run_at = None
            flow.updated_at = now
    # 7. log
    level = "error" if final == st.FAILED else "info"
    context = log_context(job, status=final, duration_ms=data["run_metrics"]["duration_ms"])
    if job.status_reason:
        context["reason"] = job.status_reason
    if final == st.FAILED and isinstance(data.get("error"), dict):
        context["error"] = {k: data["error"].get(k) for k in ("reason", "message", "class") if k in data["error"]}
    await write_log(
        session,
        level,
        f"Job {job.job_id} {st.display(final, job.status_reason)}",
        context,
        threshold=threshold,
        **log_owner(job),
    )
    # 6. batch parent completion
    if job.parent_job_id is not None:
        changes.merge(await complete_parent(session, job.parent_job_id, now=now, threshold=threshold))
    return changes


async def restore_queue_entries(session: AsyncSession, flow_id: int, backups: dict[str, Any]) -> None:
    """Put consumed queue entries back (drain: at the head; loop: undo the rotation) (engine.md §16.2)."""
    flow = await session.get(Flow, flow_id)
    if flow is None:
        return
    config = {k: dict(v) for k, v in (flow.flow_config or {}).items()}
    changed = False
    for fsid, backup in backups.items():
        entry = config.get(fsid)
        if entry is None or not isinstance(backup, dict):
            continue
        slot, mode, item = backup.get("slot"), backup.get("mode"), backup.get("entry")
        if slot not in ("prompt_queue", "config_patch_queue") or item is None:
            continue
        queue = list(entry.get(slot) or [])
        if mode == "loop":
            for i in range(len(queue) - 1, -1, -1):
                if queue[i] == item:
                    del queue[i]
                    break
        elif mode != "drain":
            continue
        queue.insert(0, item)
        entry[slot] = queue
        changed = True
    if changed:
        flow.flow_config = config


async def child_counts(session: AsyncSession, parent_id: int) -> dict[str, int]:
    rows = await session.execute(
        select(Job.status, func.count()).where(Job.parent_job_id == parent_id).group_by(Job.status)
    )
    counts = {status: n for status, n in rows.all()}
    counts["total"] = sum(counts.values())
    return counts


def parent_outcome(counts: dict[str, int]) -> tuple[str, str | None, dict[str, int]]:
    """The final status, reason and batch_results of a batch parent whose children are all final (§9.3)."""
    total = counts.get("total", 0)
    results = {
        "completed": counts.get(st.COMPLETED, 0),
        "failed": counts.get(st.FAILED, 0),
        "skipped": counts.get(st.SKIPPED, 0) + counts.get(st.NO_ITEMS, 0),
        "cancelled": counts.get(st.CANCELLED, 0),
        "total": total,
    }
    if results["completed"] >= 1:
        return st.COMPLETED, None, results
    if total and results["failed"] == total:
        return st.FAILED, f"All {total} child jobs failed", results
    return st.NO_ITEMS, None, results


async def complete_parent(session: AsyncSession, parent_id: int, *, now: datetime, threshold: str = "debug") -> Changes:
    """Finish a batch parent once none of its children is active (engine.md §9.3)."""
    # Cheap checks first: every child's completion calls this, and the parent row carries all packets.
    status = (await session.execute(select(Job.status).where(Job.job_id == parent_id))).scalar()
    if status != st.PROCESSING:
        return Changes()
    active_child = (
        await session.execute(
            select(Job.job_id).where(Job.parent_job_id == parent_id, Job.status.in_(st.ACTIVE)).limit(1)
        )
    ).scalar()
    if active_child is not None:
        return Changes()
    parent = await session.get(Job, parent_id)
    if parent is None or not (parent.engine_data or {}).get("batch"):
        return Changes()
    counts = await child_counts(session, parent_id)
    if any(counts.get(s, 0) for s in st.ACTIVE):
        return Changes()
    final, reason, results = parent_outcome(counts)
    await write_log(
        session,
        "info",
        f"Batch parent {parent_id} completed: {results}",
        log_context(parent, batch_results=results),
        threshold=threshold,
        **log_owner(parent),
    )
    changes = await finish(
        session,
        parent_id,
        final,
        reason,
        now=now,
        allowed_from=(st.PROCESSING,),
        # the children's AI usage counts as the batch's (they recorded it on their own rows)
        engine_updates={"batch_results": results, "token_usage": await with_children(session, parent)},
        threshold=threshold,
    )
    return changes or Changes()


async def cancel_descendants(
    session: AsyncSession, job_id: int, reason: str, *, now: datetime, threshold: str
) -> tuple[int, Changes]:
    """Cancel every active descendant (parent first, so they do not re-evaluate it)."""
    changes = Changes()
    cancelled = 0
    frontier = [job_id]
    while frontier:
        rows = await session.execute(
            select(Job.job_id).where(Job.parent_job_id.in_(frontier), Job.status.in_(st.ACTIVE)).order_by(Job.job_id)
        )
        children = [r[0] for r in rows.all()]
        for child in children:
            # Children of a parent being ended must not complete it: mark them first, without parent completion.
            if await cas(
                session,
                child,
                st.ACTIVE,
                status=st.CANCELLED,
                status_reason=reason,
                completed_at=now,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            ):
                job = await reload(session, child)
                assert job is not None
                await claims.settle(session, child, st.CANCELLED, now)
                data = ed(job)
                backups = data.pop("queue_backups", None)
                if backups and job.flow_key is not None:
                    await restore_queue_entries(session, job.flow_key, backups)
                # A gate the child was parked at can no longer be decided (engine.md §13.2).
                for key in ("approval", "webhook_gate"):
                    if isinstance(data.get(key), dict) and data[key].get("status") == "pending":
                        data[key] = {**data[key], "status": "cancelled"}
                job.engine_data = data
                await write_log(
                    session,
                    "info",
                    f"Job {child} cancelled - {reason}",
                    log_context(job, status=st.CANCELLED),
                    threshold=threshold,
                    **log_owner(job),
                )
                cancelled += 1
                changes.jobs.add(child)
        frontier = children
    return cancelled, changes
