"""Step types: what one step of a job does; each step type is declared beside its code (``StepType``).

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

from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine.claims import Candidate
from datamachine_mcp.engine.plan import Plan
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.store import GuardMissed, JobRow
from datamachine_mcp.storage.settings_schema import Snapshot

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
    job: JobRow  # the row as this worker holds it (kept current by the commits)
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
        """Direct workflows and system jobs never read or write processed items."""
        return self.job.flow_key is not None

    @property
    def step_type(self) -> str:
        return str(self.step["step_type"])

    def lease_expiry(self) -> datetime:
        return self.now() + timedelta(seconds=self.settings.int("lease_ttl_seconds"))

    @asynccontextmanager
    async def lease_txn(self) -> AsyncIterator[AsyncSession]:
        """A short ORM write transaction that first verifies (and extends) this worker's lease."""
        async with self.services.db.write() as session, self.services.store.bind(session) as tx:
            if not await tx.heartbeat(self.job.job_id, self.worker_id, self.lease_expiry()):
                raise LeaseLost(self.job.job_id)
            yield session

    async def save_engine_data(self, data: dict[str, Any], session: AsyncSession | None = None) -> None:
        """Write ``data`` as the job's engine_data mid-step (lease-checked); LeaseLost if the job is gone."""
        self.job.engine_data = data
        try:
            if session is not None:
                async with self.services.store.bind(session) as tx:
                    await tx.save_data(self.job, self.worker_id, self.lease_expiry())
                return
            async with self.services.store.transaction() as tx:
                await tx.save_data(self.job, self.worker_id, self.lease_expiry())
        except GuardMissed:
            raise LeaseLost(self.job.job_id) from None


StepFn = Callable[[StepRun], Awaitable[StepResult]]


def executor(step_type: str) -> StepFn:
    """The code of a registered step type (declared beside it as a ``StepType``)."""
    from datamachine_mcp.engine.catalog import STEP_TYPES

    run = STEP_TYPES[step_type].run
    assert run is not None, step_type
    return run


def failure(code: str, message: str, *, retryable: bool | None = None, **extra: Any) -> StepResult:
    error = {"code": code, "message": message, **extra}
    if retryable is not None:
        error["retryable"] = retryable
    return StepResult(status="failed", reason=code, error=error)
