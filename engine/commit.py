"""The step commit: one short transaction that records a step's outcome and routes the job.

Routing, first match wins: failure (retry or fail), waiting (park), skipped, a final ``job_status``
override, no items, last step (complete), one packet or none (continue inline), several (fan out).
The job row in memory is authoritative while the worker holds the lease, so each route is one guarded
write of the new row (no reload, no second update); a guard miss means the lease was lost.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from datamachine_mcp.engine import claims as claim_ops
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.accounting import Changes, finish, log_context, log_owner, may_hold_claims
from datamachine_mcp.engine.catalog import STEP_TYPES
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.fan_out import child_engine_data, child_rows
from datamachine_mcp.engine.plan import reserved_keys
from datamachine_mcp.engine.retry import RetryPolicy
from datamachine_mcp.engine.steps import StepResult, StepRun
from datamachine_mcp.engine.store import JobRow, StoreTx
from datamachine_mcp.storage.timeutil import iso

TRACE_CHARS = 2000


@dataclass
class Committed:
    changes: Changes = field(default_factory=Changes)
    continue_inline: bool = False
    created_children: bool = False
    notify: dict[str, Any] | None = None


def result_from_exception(exc: BaseException) -> StepResult:
    """Turn what a step raised into a failed StepResult."""
    if isinstance(exc, StepError):
        # to_dict() carries the classification (retryable, class) computed with everything the error knows.
        return StepResult(status="failed", reason=exc.code, error=exc.to_dict())
    if isinstance(exc, TimeoutError):
        return StepResult(
            status="failed",
            reason="step_timeout",
            error={"code": "step_timeout", "message": "The step exceeded step_timeout_seconds.", "retryable": True},
        )
    trace = "".join(traceback.format_exception(exc))[-TRACE_CHARS:]
    return StepResult(
        status="failed",
        reason="step_exception",
        error={"code": "step_exception", "message": f"{type(exc).__name__}: {exc}"[:1000], "trace": trace},
    )


def classify_bare(result: StepResult, step_type: str) -> StepResult:
    """A bare packet list: none is no items (fetch) or a failure; a packet flagged as failed fails.

    A step parks its job only under the wait kind its step type declares (the schema lists none)."""
    if result.status == "waiting":
        spec = STEP_TYPES.get(step_type)
        kind, declared = (result.wait or {}).get("kind"), spec.wait_kind if spec else None
        if kind is None or kind != declared:
            return fail_plan_result(
                "undeclared_wait_kind",
                f"The {step_type} step parked the job as {kind!r}; its step type declares {declared!r}.",
            )
    if result.status != "succeeded" or result.candidates is not None:
        return result
    if not result.packets:
        if step_type == "fetch":
            return StepResult(
                status="completed_no_items", engine_updates=result.engine_updates, handlers=result.handlers
            )
        return StepResult(
            status="failed",
            reason="empty_data_packet_returned",
            error={
                "code": "empty_data_packet_returned",
                "message": "The step returned no packets.",
                "retryable": False,
            },
            handlers=result.handlers,
        )
    for packet in result.packets:
        meta = packet.get("metadata") or {}
        if meta.get("success") is False or meta.get("step_execution_success") is False:
            reason = str(meta.get("failure_reason") or "packet_failure")
            return StepResult(
                status="failed",
                reason=reason,
                error={"code": reason, "message": "A packet reported failure.", "retryable": False},
                handlers=result.handlers,
            )
    return result


def fail_plan_result(code: str, message: str) -> StepResult:
    return StepResult(status="failed", reason=code, error={"code": code, "message": message, "retryable": False})


def needs_session(run: StepRun, result: StepResult) -> bool:
    """Whether the commit claims or transfers item claims (done with the ORM, in the same transaction)."""
    if not run.dedupes or run.dry_run:
        return False
    return result.candidates is not None or len(result.packets) > 1


class StepCommit:
    """One step's commit on ``tx``; ``run.job`` (the row in memory) is updated to what was written."""

    def __init__(self, tx: StoreTx, run: StepRun, result: StepResult, *, started_at: datetime, now: datetime) -> None:
        self.tx, self.run, self.now = tx, run, now
        self.result = classify_bare(result, run.step_type)
        self.started_at = started_at
        self.job: JobRow = run.job
        self.fsid = run.flow_step_id
        self.threshold = str(run.settings["log_level"])
        self.input_packets = list(self.job.packets or [])
        self.out = Committed()

    def log(self, level: str, message: str, **extra: Any) -> None:
        self.tx.log(level, message, log_context(self.job, **extra), threshold=self.threshold, **log_owner(self.job))

    def lease_expiry(self) -> datetime:
        return self.now + timedelta(seconds=self.run.settings.int("lease_ttl_seconds"))

    def claim_expiry(self, base: datetime) -> datetime:
        return base + timedelta(seconds=self.run.settings.int("claim_ttl_seconds"))

    async def commit(self) -> Committed:
        result, job, fsid = self.result, self.job, self.fsid
        data = dict(job.engine_data or {})
        reserved = reserved_keys()
        updates = {k: v for k, v in result.engine_updates.items() if k not in reserved or k == "job_status"}
        override = updates.pop("job_status", None)
        data.update(updates)
        packets = list(result.packets)
        if result.candidates is not None and result.status == "succeeded":
            packets = await self._take_items(data)
        record: dict[str, Any] = {
            "step_type": self.run.step_type,
            "handlers": result.handlers,
            "status": result.status,
            "reason": result.reason,
            "packet_count": len(packets),
            "attempt": job.attempts,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.now),
            "duration_ms": int((self.now - self.started_at).total_seconds() * 1000),
        }
        if result.fetch_stages is not None:
            record["fetch_stages"] = result.fetch_stages
        if result.token_usage:
            record["token_usage"] = result.token_usage
            total = dict(data.get("token_usage") or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                total[key] = int(total.get(key, 0)) + int(result.token_usage.get(key, 0))
            data["token_usage"] = total
        if result.preview is not None:
            record["dry_run_preview"] = result.preview
        data["step_results"] = {**(data.get("step_results") or {}), fsid: record}
        if result.status == "failed":
            return await self._failed(data)
        # Step outcomes are in engine_data.step_results; the log row is for debugging only.
        self.log(
            "debug", f"Step {fsid} {result.status}", flow_step_id=fsid, status=result.status, packet_count=len(packets)
        )
        if result.status == "waiting":
            return await self._park(data)
        if result.status == "skipped":
            return await self._final(data, st.SKIPPED, result.reason or "skipped", self.input_packets)
        if isinstance(override, str):
            base, reason = st.parse(override)
            if base in st.FINAL:
                return await self._final(data, base, reason, packets)
            self.log("warning", f"Ignored non-final job_status override '{override}'", flow_step_id=fsid)
        if result.status == "completed_no_items" or (result.candidates is not None and not packets):
            reason = result.reason if result.reason != "empty_drain_queue" else None
            return await self._final(data, st.NO_ITEMS, reason, [])
        following = self.run.plan.next_after(fsid)
        if following is None:
            return await self._final(data, st.COMPLETED, None, packets)
        if len(packets) <= 1:
            job.current_step_id = following["flow_step_id"]
            job.packets = packets
            job.attempts = 1
            job.engine_data = data
            job.updated_at = self.now
            job.lease_expires_at = self.lease_expiry()
            await self.tx.advance(job, self.run.worker_id, now=self.now, lease_expires_at=job.lease_expires_at)
            self.out.changes.jobs.add(job.job_id)
            self.out.continue_inline = True
            return self.out
        return await self._fan_out(data, packets, following)

    async def _take_items(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Claim the selected items now, inside this transaction (backfilling lost ones from reserves)."""
        result, run = self.result, self.run
        assert result.candidates is not None and result.make_packet is not None
        conflicts = 0
        if not run.dedupes or run.dry_run:
            limit = result.max_items if result.max_items > 0 else len(result.candidates)
            taken = result.candidates[:limit]
        else:
            taken, conflicts = await claim_ops.claim(
                self.tx.session,
                job_id=self.job.job_id,
                flow_key=int(self.job.flow_key or 0),
                flow_step_id=self.fsid,
                source_type=str(result.source_type),
                candidates=result.candidates,
                max_items=result.max_items,
                now=self.now,
                claim_ttl=run.settings.int("claim_ttl_seconds"),
            )
        packets = [result.make_packet(c) for c in taken]
        if result.fetch_stages is not None:
            result.fetch_stages["claim_conflicts"] = conflicts
            result.fetch_stages["final_packets"] = len(packets)
        if len(packets) == 1:
            meta = packets[0].get("metadata") or {}
            data.update({k: meta[k] for k in ("item_identifier", "source_type", "source_url") if k in meta})
        self.log(
            "debug",
            f"Fetch of step {self.fsid}: {len(packets)} item(s)",
            flow_step_id=self.fsid,
            fetch_stages=result.fetch_stages,
        )
        return packets

    async def _final(self, data: dict[str, Any], status: str, reason: str | None, packets: list[Any]) -> Committed:
        self.job.engine_data = data
        changes = await finish(
            self.tx,
            self.job,
            status,
            reason,
            now=self.now,
            guard="lease",
            worker_id=self.run.worker_id,
            threshold=self.threshold,
            packets=packets,
        )
        self.out.changes.merge(changes)
        return self.out

    async def _failed(self, data: dict[str, Any]) -> Committed:
        result, job, fsid = self.result, self.job, self.fsid
        error = dict(
            result.error or {"code": result.reason or "step_failed", "message": result.reason or "step failed"}
        )
        code = str(error.get("code") or result.reason or "step_failed")
        policy = RetryPolicy.from_settings(self.run.settings)
        decision = policy.decide(error, job.attempts, job.max_attempts)
        self.log(
            "warning",
            f"Step {fsid} failed: {code}",
            flow_step_id=fsid,
            reason=code,
            **{"class": decision.error_class},
            retryable=decision.retryable,
            http_status=error.get("http_status"),
        )
        if decision.retry:
            run_at = policy.record_retry(
                data,
                flow_step_id=fsid,
                attempt=job.attempts,
                error_class=decision.error_class,
                delay=decision.delay,
                now=self.now,
                code=code,
                message=str(error.get("message", "")),
            )
            job.engine_data = data
            job.status, job.run_at, job.updated_at = st.PENDING, run_at, self.now
            if may_hold_claims(job):
                await self.tx.push_claims(job.job_id, self.claim_expiry(run_at))
            await self.tx.requeue(job, run_at=run_at, now=self.now, guard="lease", worker_id=self.run.worker_id)
            job.lease_owner = job.lease_expires_at = None
            self.log(
                "warning",
                f"Retry of step {fsid} scheduled in {decision.delay} s",
                flow_step_id=fsid,
                attempt=job.attempts,
                delay_seconds=decision.delay,
                next_retry_at=iso(run_at),
            )
            self.out.changes.jobs.add(job.job_id)
            return self.out
        message = str(error.get("message", code))
        if decision.retryable:
            policy.record_exhausted(data, decision.error_class, message)
            message = f"{message} (after {job.attempts} attempts)"
        data["error"] = {
            "reason": code,
            "flow_step_id": fsid,
            "message": message,
            "class": decision.error_class,
            "handler": result.handlers[0] if result.handlers else None,
            "http_status": error.get("http_status"),
            "diagnostics": error.get("diagnostics"),
            "trace": error.get("trace"),
        }
        # The failed step's input stays in packets so retry-job can resume there.
        return await self._final(data, st.FAILED, code, self.input_packets)

    async def _park(self, data: dict[str, Any]) -> Committed:
        job, wait = self.job, self.result.wait or {}
        kind = wait["kind"]
        expires = wait.get("expires_at")
        data[kind] = wait["state"]  # a parking step's state lives under its wait kind
        job.engine_data = data
        job.status, job.wait_kind, job.wait_ref, job.wait_expires_at = st.WAITING, kind, wait["wait_ref"], expires
        job.updated_at = self.now
        if may_hold_claims(job):
            await self.tx.push_claims(job.job_id, self.claim_expiry(expires) if expires else None)
        await self.tx.park(job, self.run.worker_id, now=self.now)
        job.lease_owner = job.lease_expires_at = None
        self.log(
            "info",
            f"Job {job.job_id} waiting at {kind}",
            flow_step_id=self.fsid,
            wait_kind=kind,
            action_id=wait["wait_ref"] if kind == "approval" else None,
        )
        self.out.changes.jobs.add(job.job_id)
        if wait.get("notify_url"):
            self.out.notify = {"url": wait["notify_url"], "kind": kind, "wait": wait, "expires_at": iso(expires)}
        return self.out

    async def _fan_out(
        self, data: dict[str, Any], packets: list[dict[str, Any]], following: dict[str, Any]
    ) -> Committed:
        """The parent waits in processing (no lease); one pending child per packet."""
        parent, now = self.job, self.now
        data["batch"] = {
            "is_parent": True,
            "total": len(packets),
            "next_flow_step_id": following["flow_step_id"],
            "created_at": iso(now),
        }
        parent.engine_data, parent.packets, parent.updated_at = data, packets, now
        await self.tx.fan_out_parent(parent, self.run.worker_id, now=now)
        parent.lease_owner = parent.lease_expires_at = None
        child_ids = await self.tx.insert_children(child_rows(parent, packets, following["flow_step_id"], now))
        child_data = child_engine_data(parent, data, zip(child_ids, packets, strict=True), now)
        self.out.changes.jobs.update(child_ids)
        await self.tx.set_child_data(child_data)
        if self.run.dedupes and not self.run.dry_run:
            await claim_ops.transfer_many(
                self.tx.session,
                parent_id=parent.job_id,
                children=list(zip(child_ids, packets, strict=True)),
                expires=self.claim_expiry(now),
            )
        self.log(
            "info",
            f"Batch fan-out: {len(packets)} child jobs",
            total=len(packets),
            next_flow_step_id=following["flow_step_id"],
        )
        self.out.changes.jobs.add(parent.job_id)
        self.out.created_children = True
        return self.out


async def commit_step(
    tx: StoreTx, run: StepRun, result: StepResult, *, started_at: datetime, now: datetime
) -> Committed:
    return await StepCommit(tx, run, result, started_at=started_at, now=now).commit()
