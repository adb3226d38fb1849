"""Ending a job's wait at a gate: deciding an approval, resuming a job parked at an approval or a webhook
gate. Reached through the front door (``engine.front``); the HTTP gate endpoint uses ``resume_waiting``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.accounting import Changes, finish
from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.engine.plan import step_config
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.store import JobRow, StoreTx
from datamachine_mcp.storage.timeutil import iso


@dataclass
class Decided:
    job: JobRow
    resumed: bool
    changes: Changes


class AlreadyResolved(Exception):
    def __init__(self, job: JobRow) -> None:
        super().__init__(f"job {job.job_id} is no longer waiting at this approval")
        self.job = job


async def resolve_approval(
    services: EngineServices,
    session: AsyncSession,
    job_id: int,
    action_id: str,
    decision: str,
    *,
    note: str | None,
    user_id: int,
    agent_id: int | None,
    now: datetime,
    threshold: str,
    claim_ttl: int,
) -> Decided:
    """Decide a job waiting at an approval, exactly once: accepted resumes it after the gate (or completes
    it when the gate was its last step); rejected ends it per the step's ``on_reject`` (skip or fail).
    Raises ``AlreadyResolved`` when the job is no longer waiting at ``action_id``."""
    async with services.store.bind(session) as tx:
        job = await tx.get_job(job_id, lock=True)
        if job is None:
            raise CodedError("pending_action_not_found", f"Pending action {action_id} not found.", action_id=action_id)
        data = dict(job.engine_data or {})
        approval = dict(data.get("approval") or {})
        if job.status != st.WAITING or job.wait_ref != action_id or approval.get("status") != "pending":
            raise AlreadyResolved(job)
        decided = {
            **approval,
            "status": decision,
            "decided_by_user_id": user_id,
            "decided_by_agent_id": agent_id,
            "decided_at": iso(now),
            "note": note,
        }
        gate = str(approval.get("flow_step_id") or job.current_step_id or "")
        step_results = dict(data.get("step_results") or {})
        if isinstance(step_results.get(gate), dict):
            outcome = "succeeded" if decision == "accepted" else "rejected"
            step_results[gate] = {**step_results[gate], "status": outcome, "decision": decision}
        updates: dict[str, Any] = {"approval": decided, "step_results": step_results}
        if decision != "accepted":
            to_status = st.SKIPPED
            if _on_reject(data, approval) == "fail":
                to_status = st.FAILED
                updates["error"] = {
                    "reason": "approval_rejected",
                    "flow_step_id": gate,
                    "message": f"Rejected by user {user_id}" + (f": {note}" if note else "."),
                    "class": "approval",
                    "handler": None,
                    "http_status": None,
                    "diagnostics": None,
                }
            changes = await finish(
                tx,
                job,
                to_status,
                "approval_rejected",
                now=now,
                threshold=threshold,
                engine_updates=updates,
                guard="wait",
                wait_ref=action_id,
            )
            return Decided(job, False, changes)
        packets = list(job.packets or []) or [
            {
                "type": "approval_decision",
                "timestamp": iso(now),
                "data": {"title": approval.get("description") or "", "body": note or "", "decision": decision},
                "metadata": {"flow_step_id": gate, "action_id": action_id},
            }
        ]
        changes, resumed = await resume_waiting(
            tx,
            job,
            action_id,
            next_step=approval.get("next_flow_step_id"),
            packets=packets,
            updates=updates,
            now=now,
            threshold=threshold,
            claim_ttl=claim_ttl,
        )
        return Decided(job, resumed, changes)


async def resume_waiting(
    tx: StoreTx,
    job: JobRow,
    wait_ref: str,
    *,
    next_step: str | None,
    packets: list[Any],
    updates: dict[str, Any],
    now: datetime,
    threshold: str,
    claim_ttl: int,
) -> tuple[Changes, bool]:
    """A gate's wait ends well: with a next step the job is pending there (attempts 0, ``packets`` its input),
    else it completes with ``packets``. Guarded on the wait, so of two resumes one wins (GuardMissed).
    Returns the changes and whether the job went on to a next step."""
    if not next_step:
        changes = await finish(
            tx,
            job,
            st.COMPLETED,
            None,
            now=now,
            threshold=threshold,
            packets=packets,
            engine_updates=updates,
            guard="wait",
            wait_ref=wait_ref,
        )
        return changes, False
    job.engine_data = {**(job.engine_data or {}), **updates}
    job.status, job.current_step_id, job.packets, job.attempts = st.PENDING, next_step, packets, 0
    job.run_at = job.updated_at = now
    job.wait_expires_at = None
    await tx.resume(job, wait_ref, now=now)
    await tx.push_claims(job.job_id, now + timedelta(seconds=claim_ttl))
    return Changes(jobs={job.job_id}), True


def _on_reject(data: dict[str, Any], approval: dict[str, Any]) -> str:
    value = approval.get("on_reject")
    if value not in ("skip", "fail"):
        step = step_config(data, str(approval.get("flow_step_id") or "")) or {}
        value = (step.get("flow_step_settings") or {}).get("on_reject")
    return "fail" if value == "fail" else "skip"
