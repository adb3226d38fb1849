"""Ending a job: the final write and terminal accounting, exactly once, in one transaction (docs: a job's
final status settles its item claims, restores consumed queue entries on failure, records flow health,
resets a fired one-time schedule, logs, and completes its batch parent when it was the last child).

Everything runs on a job-store transaction; the returned ``Changes`` say what to announce after commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.catalog import claiming_step_types, wait_kinds
from datamachine_mcp.engine.store import JobRow, StoreTx
from datamachine_mcp.engine.token_usage import TOKEN_KEYS, own_usage


@dataclass
class Changes:
    """Jobs and flows changed by a transaction, announced after it commits."""

    jobs: set[int] = field(default_factory=set)
    flows: set[tuple[int, int]] = field(default_factory=set)  # (flow_id, pipeline_id)

    def merge(self, other: Changes | None) -> None:
        if other is not None:
            self.jobs |= other.jobs
            self.flows |= other.flows


def log_owner(job: JobRow) -> dict[str, Any]:
    return {"agent_id": job.agent_id, "user_id": job.user_id or None}


def log_context(job: JobRow, **extra: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {"job_id": job.job_id}
    if job.flow_key is not None:
        ctx["flow_id"] = job.flow_key
    if job.pipeline_key is not None:
        ctx["pipeline_id"] = job.pipeline_key
    ctx.update(extra)
    return ctx


def may_hold_claims(job: JobRow) -> bool:
    """Whether the job can hold item claims at all: a deduplicating (flow, not dry-run) job whose plan has
    a step that claims items. Jobs that cannot are spared every claim statement."""
    data = job.engine_data or {}
    if job.flow_key is None or data.get("dry_run_mode"):
        return False
    claiming = claiming_step_types()
    config = data.get("flow_config") or {}
    return any(isinstance(e, dict) and e.get("step_type") in claiming for e in config.values())


def _duration_ms(job: JobRow, now: datetime) -> int:
    start = job.started_at or job.created_at
    return max(0, int((now - start).total_seconds() * 1000)) if start else 0


async def finish(
    tx: StoreTx,
    job: JobRow,
    status: str,
    reason: str | None,
    *,
    now: datetime,
    guard: str,
    threshold: str,
    packets: list[Any] | None = None,
    engine_updates: dict[str, Any] | None = None,
    gate_status: str | None = None,
    parent_completion: bool = True,
    **guard_kw: Any,
) -> Changes:
    """Make ``job`` final with terminal accounting. ``job`` is the current row (read under the lease, or
    locked by this transaction); it is updated in place. Raises ``GuardMissed`` if the guard fails."""
    assert status in st.FINAL
    data = dict(job.engine_data or {})
    if engine_updates:
        data.update(engine_updates)
    dry_run = bool(data.get("dry_run_mode"))
    changes = Changes(jobs={job.job_id})
    settled = 0
    if may_hold_claims(job):
        settled = await tx.settle_claims(job.job_id, success=status in st.SUCCESS, now=now)
    backups = data.pop("queue_backups", None)
    if backups and status in (st.FAILED, st.CANCELLED) and job.flow_key is not None:
        await restore_queue_entries(tx, job.flow_key, backups, now=now)
    if gate_status:  # a gate the job was parked at can no longer be decided
        for key in wait_kinds():
            if isinstance(data.get(key), dict) and data[key].get("status") == "pending":
                data[key] = {**data[key], "status": gate_status}
    retry = data.get("retry") or {}
    data["run_metrics"] = {
        "steps_run": len(data.get("step_results") or {}),
        "items_processed": settled if status in st.SUCCESS else 0,
        "retries": int(retry.get("total_retries", 0)),
        "duration_ms": _duration_ms(job, now),
    }
    data.pop("job_status", None)
    job.status, job.status_reason = status, st.clip_reason(reason)
    job.engine_data = data
    if packets is not None:
        job.packets = packets
    job.completed_at = job.updated_at = now
    job.lease_owner = job.lease_expires_at = None
    await tx.finish(job, now=now, guard=guard, **guard_kw)
    if job.flow_key is not None and job.parent_job_id is None and not dry_run:
        changes.merge(await _flow_outcome(tx, job, now=now))
    context = log_context(job, status=status, duration_ms=data["run_metrics"]["duration_ms"])
    if job.status_reason:
        context["reason"] = job.status_reason
    if status == st.FAILED and isinstance(data.get("error"), dict):
        context["error"] = {k: data["error"].get(k) for k in ("reason", "message", "class") if k in data["error"]}
    level = "error" if status == st.FAILED else "info"
    tx.log(
        level,
        f"Job {job.job_id} {st.display(status, job.status_reason)}",
        context,
        threshold=threshold,
        **log_owner(job),
    )
    if job.parent_job_id is not None and parent_completion:
        changes.merge(await complete_parent(tx, job.parent_job_id, now=now, threshold=threshold))
    return changes


async def _flow_outcome(tx: StoreTx, job: JobRow, *, now: datetime) -> Changes:
    """Flow health (cancelled runs leave it alone) and the one-time schedule reset."""
    changes = Changes()
    assert job.flow_key is not None
    if job.status != st.CANCELLED:
        pipeline_id = await tx.flow_health(job.flow_key, job.status, st.display(job.status, job.status_reason), now=now)
        if pipeline_id is not None:
            changes.flows.add((job.flow_key, pipeline_id))
    scheduling = ((job.engine_data or {}).get("flow") or {}).get("scheduling") or {}
    # Only a run the one-time schedule fired resets it (a manual run must not cancel a pending one-time run).
    if job.run_trigger == "schedule" and scheduling.get("interval") == "one_time":
        found = await tx.flow_configs(job.flow_key)
        if found is not None and found[1].get("interval") == "one_time":
            reset: dict[str, Any] = {"interval": "manual"}
            if "webhook" in found[1]:
                reset["webhook"] = found[1]["webhook"]
            await tx.set_schedule(job.flow_key, reset, now=now)
            changes.flows.add((job.flow_key, found[2]))
    return changes


async def restore_queue_entries(tx: StoreTx, flow_id: int, backups: dict[str, Any], *, now: datetime) -> None:
    """Put consumed queue entries back (drain: at the head; loop: undo the rotation)."""
    found = await tx.flow_configs(flow_id)
    if found is None:
        return
    config = {k: dict(v) for k, v in found[0].items() if isinstance(v, dict)}
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
        await tx.set_flow_config(flow_id, config, now=now)


def parent_outcome(counts: dict[str, int]) -> tuple[str, str | None, dict[str, int]]:
    """Final status, reason and batch_results of a batch parent whose children are all final: completed if
    any child completed, failed if all failed, else completed_no_items."""
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


async def complete_parent(tx: StoreTx, parent_id: int, *, now: datetime, threshold: str) -> Changes | None:
    """Finish a batch parent once none of its children is active (None when it stays open)."""
    parent = await tx.get_job(parent_id, lock=True)
    if parent is None or parent.status != st.PROCESSING or not (parent.engine_data or {}).get("batch"):
        return None
    counts = await tx.child_counts(parent_id)
    if any(counts.get(s, 0) for s in st.ACTIVE):
        return None
    final, reason, results = parent_outcome(counts)
    tx.log(
        "info",
        f"Batch parent {parent_id} completed: {results}",
        log_context(parent, batch_results=results),
        threshold=threshold,
        **log_owner(parent),
    )
    return await finish(
        tx,
        parent,
        final,
        reason,
        now=now,
        guard="status",
        allowed=(st.PROCESSING,),
        threshold=threshold,
        # the children's AI usage counts as the batch's (they recorded it on their own rows)
        engine_updates={"batch_results": results, "token_usage": await _batch_usage(tx, parent)},
    )


async def _batch_usage(tx: StoreTx, parent: JobRow) -> dict[str, int]:
    own = own_usage(parent.engine_data)
    children = await tx.child_token_usage(parent.job_id)
    return {k: own[k] + n for k, n in zip(TOKEN_KEYS, children, strict=True)}


async def cancel_descendants(
    tx: StoreTx, job_id: int, reason: str, *, now: datetime, threshold: str
) -> tuple[int, Changes]:
    """Cancel every active descendant, parents before children (so none re-evaluates its parent)."""
    changes = Changes()
    cancelled = 0
    frontier = [job_id]
    while frontier:
        children = await tx.active_children(frontier)
        for child in children:
            done = await finish(
                tx,
                child,
                st.CANCELLED,
                reason,
                now=now,
                guard="status",
                allowed=st.ACTIVE,
                threshold=threshold,
                gate_status="cancelled",
                parent_completion=False,  # its parent is being ended by the caller
            )
            changes.merge(done)
            cancelled += 1
        frontier = [c.job_id for c in children]
    return cancelled, changes
