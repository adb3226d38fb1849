"""One transaction of the job store: the hot-path operations as named statements (``statements``).

Subclasses run a statement on their connection (``run``/``rows``/``many``); everything here is the same on
SQLite and PostgreSQL. Log rows are buffered and inserted in one batch when the transaction ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from datamachine_mcp.engine.store import statements as q
from datamachine_mcp.engine.store.rows import JobRow
from datamachine_mcp.storage.logs import level_allows, log_values


class GuardMissed(Exception):
    """A guarded job write matched no row: someone else changed the job first."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} changed meanwhile")
        self.job_id = job_id


def guard_params(
    guard: str,
    job_id: int,
    *,
    worker_id: str | None = None,
    allowed: Sequence[str] = (),
    wait_ref: str | None = None,
    lease_expires_at: datetime | None = None,
) -> dict[str, Any]:
    """The parameters of one of the guards in ``statements.GUARDS``."""
    if guard == "lease":
        return {"job_id": job_id, "worker_id": worker_id}
    if guard == "status":
        padded = (list(allowed) * 3)[:3]
        return {"job_id": job_id, "from1": padded[0], "from2": padded[1], "from3": padded[2]}
    if guard == "wait":
        return {"job_id": job_id, "wait_ref": wait_ref}
    return {"job_id": job_id, "worker_id": worker_id, "lease_expires_at": lease_expires_at}


class StoreTx:
    """A transaction (or, for single statements on PostgreSQL, an autocommit connection) of the store."""

    dialect = "?"
    session: Any = None  # the ORM session sharing this transaction, when bound to one

    def __init__(self) -> None:
        self._logs: list[dict[str, Any]] = []
        # Flows whose success outcome this transaction already wrote (or found in place): another success
        # of the same flow in the same transaction (a group commit) changes nothing and is skipped.
        self._healthy: set[tuple[int, str]] = set()

    # --- primitives (per driver) ---------------------------------------------------------------
    async def run(self, stmt: q.Query, params: Mapping[str, Any]) -> int:
        raise NotImplementedError

    async def rows(self, stmt: q.Query, params: Mapping[str, Any]) -> list[Sequence[Any]]:
        raise NotImplementedError

    async def many(self, stmt: q.Query, params: Sequence[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    async def jobs(self, stmt: q.Query, params: Mapping[str, Any]) -> list[JobRow]:
        raise NotImplementedError

    async def insert_children(self, rows: Sequence[Sequence[Any]]) -> list[int]:
        raise NotImplementedError

    # --- logs ----------------------------------------------------------------------------------
    def log(
        self,
        level: str,
        message: str,
        context: dict[str, Any] | None = None,
        *,
        threshold: str = "debug",
        agent_id: int | None = None,
        user_id: int | None = None,
        at: datetime | None = None,
    ) -> None:
        """Queue one log row (dropped below ``threshold``); written with the transaction."""
        if level_allows(level, threshold):
            self._logs.append(log_values(level, message, context, agent_id=agent_id, user_id=user_id, created_at=at))

    def log_mark(self) -> int:
        return len(self._logs)

    def log_reset(self, mark: int) -> None:
        del self._logs[mark:]

    # --- savepoints (a group member that must be undone alone) ---------------------------------
    _savepoints = 0

    async def savepoint(self) -> str:
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        await self.execute_plain(f"SAVEPOINT {name}")
        return name

    async def rollback_to(self, name: str) -> None:
        await self.execute_plain(f"ROLLBACK TO SAVEPOINT {name}")
        await self.execute_plain(f"RELEASE SAVEPOINT {name}")

    async def release_savepoint(self, name: str) -> None:
        await self.execute_plain(f"RELEASE SAVEPOINT {name}")

    async def execute_plain(self, sql: str) -> None:
        raise NotImplementedError

    async def flush_logs(self) -> None:
        if self._logs:
            logs, self._logs = self._logs, []
            await self.many(q.INSERT_LOG, logs)

    # --- claiming and reading ------------------------------------------------------------------
    async def claim(self, worker_id: str, limit: int, *, now: datetime, lease_expires_at: datetime) -> list[JobRow]:
        """Claim up to ``limit`` due jobs for ``worker_id``: full rows, in claim order."""
        rows = await self.jobs(
            q.CLAIM, {"worker_id": worker_id, "limit": limit, "now": now, "lease_expires_at": lease_expires_at}
        )
        rows.sort(key=lambda r: (r.run_at, r.job_id))
        return rows

    async def next_due(self, worker_id: str) -> Any:
        found = await self.rows(q.NEXT_DUE, {"worker_id": worker_id})
        return found[0][0] if found else None

    async def get_job(self, job_id: int, *, lock: bool = False) -> JobRow | None:
        """The job's current row; ``lock`` holds it for this transaction (PostgreSQL ``FOR UPDATE``)."""
        found = await self.jobs(q.LOCK_JOB if lock else q.GET_JOB, {"job_id": job_id})
        return found[0] if found else None

    async def job_waiting_at(self, wait_ref: str) -> JobRow | None:
        """The job whose wait has this reference (any status), locked for this transaction."""
        found = await self.jobs(q.WAITING_AT, {"wait_ref": wait_ref})
        return found[0] if found else None

    async def active_children(self, parent_ids: Sequence[int]) -> list[JobRow]:
        out: list[JobRow] = []
        for parent_id in parent_ids:
            out.extend(await self.jobs(q.ACTIVE_CHILDREN, {"parent_id": parent_id}))
        return out

    async def child_counts(self, parent_id: int) -> dict[str, int]:
        counts = {str(status): int(n) for status, n in await self.rows(q.CHILD_COUNTS, {"parent_id": parent_id})}
        counts["total"] = sum(counts.values())
        return counts

    async def child_token_usage(self, parent_id: int) -> tuple[int, int, int]:
        """``(prompt, completion, total)`` tokens the children of ``parent_id`` recorded."""
        row = (await self.rows(q.CHILD_TOKEN_USAGE, {"parent_id": parent_id}))[0]
        return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)

    # --- guarded job writes --------------------------------------------------------------------
    async def _guarded(self, stmt: q.Query, params: dict[str, Any]) -> None:
        if not await self.run(stmt, params):
            raise GuardMissed(params["job_id"])

    async def heartbeat(self, job_id: int, worker_id: str, lease_expires_at: datetime) -> bool:
        params = {"job_id": job_id, "worker_id": worker_id, "lease_expires_at": lease_expires_at}
        return bool(await self.run(q.HEARTBEAT, params))

    async def save_data(self, job: JobRow, worker_id: str, lease_expires_at: datetime) -> None:
        """Write the job's engine_data mid-step (queue backups, publish progress); lease-guarded."""
        params = {"job_id": job.job_id, "worker_id": worker_id}
        await self._guarded(
            q.SAVE_DATA, {**params, "engine_data": job.engine_data, "lease_expires_at": lease_expires_at}
        )

    async def advance(self, job: JobRow, worker_id: str, *, now: datetime, lease_expires_at: datetime) -> None:
        """Inline continuation: the row takes the job's new step, packets, attempts 1 and engine_data."""
        await self._guarded(
            q.ADVANCE,
            {
                "job_id": job.job_id,
                "worker_id": worker_id,
                "step_id": job.current_step_id,
                "packets": job.packets,
                "engine_data": job.engine_data,
                "lease_expires_at": lease_expires_at,
                "now": now,
            },
        )

    async def requeue(
        self, job: JobRow, *, run_at: datetime, now: datetime, guard: str = "lease", **guard_kw: Any
    ) -> None:
        stmt = q.REQUEUE if guard == "lease" else q.REQUEUE_EXPIRED
        params = guard_params(guard, job.job_id, **guard_kw)
        await self._guarded(stmt, {**params, "run_at": run_at, "engine_data": job.engine_data, "now": now})

    async def park(self, job: JobRow, worker_id: str, *, now: datetime) -> None:
        await self._guarded(
            q.PARK,
            {
                "job_id": job.job_id,
                "worker_id": worker_id,
                "wait_kind": job.wait_kind,
                "wait_ref": job.wait_ref,
                "wait_expires_at": job.wait_expires_at,
                "engine_data": job.engine_data,
                "now": now,
            },
        )

    async def finish(self, job: JobRow, *, now: datetime, guard: str, **guard_kw: Any) -> None:
        """Write the job's final status, reason, packets and engine_data (set on ``job``) under ``guard``."""
        params = guard_params(guard, job.job_id, **guard_kw)
        params.update(
            status=job.status,
            reason=job.status_reason,
            packets=job.packets,
            engine_data=job.engine_data,
            now=now,
        )
        await self._guarded(q.FINISH[guard], params)

    async def release(self, job_id: int, worker_id: str, *, now: datetime) -> bool:
        return bool(await self.run(q.RELEASE, {"job_id": job_id, "worker_id": worker_id, "now": now}))

    async def void_lease(self, job_id: int, worker_id: str, *, expired_at: datetime) -> bool:
        params = {"job_id": job_id, "worker_id": worker_id, "lease_expires_at": expired_at}
        return bool(await self.run(q.VOID_LEASE, params))

    async def void_old_lease(self, job_id: int, *, expired_at: datetime) -> bool:
        return bool(await self.run(q.VOID_OLD_LEASES, {"job_id": job_id, "lease_expires_at": expired_at}))

    async def resume(self, job: JobRow, wait_ref: str, *, now: datetime) -> None:
        params = {"job_id": job.job_id, "wait_ref": wait_ref, "step_id": job.current_step_id}
        await self._guarded(q.RESUME, {**params, "packets": job.packets, "engine_data": job.engine_data, "now": now})

    async def reopen(self, job: JobRow, *, now: datetime, allowed: Sequence[str]) -> None:
        """Back to ``job.status`` (pending for a retried job, processing for a reopened batch parent)."""
        params = guard_params("status", job.job_id, allowed=allowed)
        params.update(
            status=job.status,
            run_at=job.run_at,
            attempts=job.attempts,
            step_id=job.current_step_id,
            handler_slug=job.handler_slug,
            engine_data=job.engine_data,
            now=now,
        )
        await self._guarded(q.REOPEN, params)

    async def fan_out_parent(self, job: JobRow, worker_id: str, *, now: datetime) -> None:
        params = {"job_id": job.job_id, "worker_id": worker_id, "packets": job.packets}
        await self._guarded(q.FAN_OUT_PARENT, {**params, "engine_data": job.engine_data, "now": now})

    async def set_child_data(self, data: Sequence[tuple[int, dict[str, Any]]]) -> None:
        await self.many(q.CHILD_DATA, [{"job_id": job_id, "engine_data": ed} for job_id, ed in data])

    # --- claims --------------------------------------------------------------------------------
    async def push_claims(self, job_id: int, expires: datetime | None) -> None:
        await self.run(q.PUSH_CLAIMS, {"job_id": job_id, "expires": expires})

    async def settle_claims(self, job_id: int, *, success: bool, now: datetime) -> int:
        """Complete (success) or release (failure, cancel) the job's claims; returns how many."""
        if success:
            return await self.run(q.COMPLETE_CLAIMS, {"job_id": job_id, "now": now})
        return await self.run(q.RELEASE_CLAIMS, {"job_id": job_id})

    # --- flows ---------------------------------------------------------------------------------
    async def flow_health(self, flow_id: int, final: str, display: str, *, now: datetime) -> int | None:
        """Record a run's outcome on its flow; the flow's pipeline id when the flow changed, else None."""
        stmt = q.HEALTH.get(final, q.HEALTH_SUCCESS)
        if stmt is q.HEALTH_SUCCESS:
            if (flow_id, display) in self._healthy:
                return None
            self._healthy.add((flow_id, display))
        else:
            self._healthy = {seen for seen in self._healthy if seen[0] != flow_id}
        found = await self.rows(stmt, {"flow_id": flow_id, "status": display, "now": now})
        return int(found[0][0]) if found else None

    async def flow_configs(self, flow_id: int) -> tuple[dict[str, Any], dict[str, Any], int] | None:
        """(flow_config, scheduling_config, pipeline_id) of a flow, locked for this transaction."""
        found = await self.rows(q.FLOW_CONFIGS, {"flow_id": flow_id})
        if not found:
            return None
        config, schedule, pipeline_id = found[0]
        return self.decode_json(config) or {}, self.decode_json(schedule) or {}, int(pipeline_id)

    def decode_json(self, value: Any) -> Any:
        return value

    async def set_flow_config(self, flow_id: int, config: dict[str, Any], *, now: datetime) -> None:
        await self.run(q.SET_FLOW_CONFIG, {"flow_id": flow_id, "flow_config": config, "now": now})

    async def set_schedule(self, flow_id: int, schedule: dict[str, Any], *, now: datetime) -> None:
        await self.run(q.SET_SCHEDULE, {"flow_id": flow_id, "schedule": schedule, "now": now})
