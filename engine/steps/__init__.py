"""Step types: what one step of a job does (engine.md §6, §15, §16).

A step runs outside any transaction and returns a ``StepResult``; the worker commits it (routing,
claims, terminal accounting) in one short transaction. Steps that must write while running (queue
consumption, publish progress) use ``StepRun.lease_txn``, which verifies the lease first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.claims import Candidate
from datamachine_mcp.engine.plan import Plan
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.models import Job
from datamachine_mcp.storage.settings import Snapshot

StepStatus = Literal["succeeded", "failed", "completed_no_items", "skipped", "waiting"]


class LeaseLost(Exception):
    """The job is no longer ours (cancelled, failed, recovered or deleted): abandon the step."""


@dataclass
class StepResult:
    status: StepStatus
    packets: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    error: dict[str, Any] | None = None
    engine_updates: dict[str, Any] = field(default_factory=dict)
    wait: dict[str, Any] | None = None
    # fetch steps: eligible items in order; packets are built from the ones claimed at commit
    candidates: list[Candidate] | None = None
    max_items: int = 0
    source_type: str | None = None
    fetch_stages: dict[str, Any] | None = None
    token_usage: dict[str, int] | None = None
    handlers: list[str] = field(default_factory=list)
    preview: Any = None
    # built at commit from a claimed candidate (fetch)
    make_packet: Callable[[Candidate], dict[str, Any]] | None = None


@dataclass
class StepRun:
    services: EngineServices
    job: Job  # a detached snapshot of the row as claimed
    flow_step_id: str
    step: dict[str, Any]  # pipeline step merged under the flow step (from the snapshot)
    plan: Plan
    settings: Snapshot
    worker_id: str
    now: Callable[[], datetime]

    @property
    def engine_data(self) -> dict[str, Any]:
        return self.job.engine_data or {}

    @property
    def dry_run(self) -> bool:
        return bool(self.engine_data.get("dry_run_mode"))

    @property
    def dedupes(self) -> bool:
        """Direct workflows and system jobs never read or write processed items (engine.md §10.5)."""
        return self.job.flow_key is not None

    @property
    def step_type(self) -> str:
        return str(self.step["step_type"])

    @asynccontextmanager
    async def lease_txn(self) -> AsyncIterator[AsyncSession]:
        """A short write transaction that first verifies (and extends) this worker's lease."""
        async with self.services.db.write() as session:
            now = self.now()
            ttl = self.settings.int("lease_ttl_seconds")
            result = await session.execute(
                update(Job)
                .where(Job.job_id == self.job.job_id, Job.status == st.PROCESSING, Job.lease_owner == self.worker_id)
                .values(lease_expires_at=now + timedelta(seconds=ttl))
                .execution_options(synchronize_session=False)
            )
            if not rowcount(result):
                raise LeaseLost(self.job.job_id)
            yield session


StepFn = Callable[[StepRun], Awaitable[StepResult]]


def executor(step_type: str) -> StepFn:
    from datamachine_mcp.engine.steps import ai, fetch, gates, publish, system

    return {
        "fetch": fetch.run,
        "ai": ai.run,
        "publish": publish.run,
        "update": publish.run,
        "approval": gates.run_approval,
        "webhook_gate": gates.run_webhook_gate,
        "system_task": system.run,
    }[step_type]


def failure(code: str, message: str, *, retryable: bool | None = None, **extra: Any) -> StepResult:
    error = {"code": code, "message": message, **extra}
    if retryable is not None:
        error["retryable"] = retryable
    return StepResult(status="failed", reason=code, error=error)
