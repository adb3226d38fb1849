"""Resuming a job parked at a webhook gate: ``POST /webhooks/gates/{token}`` (docs/engine.md, Waits: approval
and webhook gate).

The token in the URL is the credential (a capability URL): the job is found by its sha256 (``wait_ref``).
The posted JSON becomes a ``webhook_payload`` packet ahead of the gate's own input, and the job continues
at the step after the gate (or completes when the gate was its last step). Exactly one resume wins: the
move is a compare-and-set on ``status = 'waiting' AND wait_ref = :ref``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from datamachine_mcp.engine import claims
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.lifecycle import Changes, ed, finish, log_context, log_owner
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.steps.gates import gate_token_ref
from datamachine_mcp.engine.webhooks import Delivery, WebhookRefused, parse_payload
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import Job
from datamachine_mcp.storage.timeutil import iso, utcnow

TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")
GATE = "webhook_gate"


@dataclass(frozen=True)
class Resumed:
    job_id: int
    next_step_id: str | None
    status: str


async def gate_body_limit(services: EngineServices) -> int:
    return (await services.snapshot()).int("webhook_max_body_bytes")


async def resume_gate(
    services: EngineServices, token: str, delivery: Delivery, *, now: Callable[[], datetime] = utcnow
) -> Resumed:
    """Resume the job waiting at the gate of ``token`` with the delivery's JSON; raises WebhookRefused
    (404 ``gate_not_found``, 409 ``job_not_waiting``, 400 ``invalid_json``)."""
    if not TOKEN_RE.match(token):
        raise WebhookRefused(404, "gate_not_found")
    ref = gate_token_ref(token)
    snap = await services.snapshot()
    threshold = str(snap["log_level"])
    moment = now()
    async with services.db.write() as session:
        job = (
            await session.execute(services.db.for_update(select(Job).where(Job.wait_ref == ref)))
        ).scalar_one_or_none()
        if job is None or job.wait_kind != GATE:
            raise WebhookRefused(404, "gate_not_found")
        if job.status != st.WAITING:
            raise WebhookRefused(409, "job_not_waiting")
        if job.wait_expires_at is not None and job.wait_expires_at <= moment:
            raise WebhookRefused(404, "gate_not_found")  # expired: the maintenance loop fails it
        payload = parse_payload(delivery.body, containers_only=False)
        data = ed(job)
        gate = dict(data.get(GATE) or {})
        step_id = str(gate.get("flow_step_id") or job.current_step_id or "")
        packets = [_payload_packet(payload, step_id, delivery, moment), *(job.packets or [])]
        step_results = dict(data.get("step_results") or {})
        if isinstance(step_results.get(step_id), dict):
            step_results[step_id] = {**step_results[step_id], "status": "succeeded"}
        updates: dict[str, Any] = {
            GATE: {**gate, "status": "received", "received_at": iso(moment)},
            "step_results": step_results,
        }
        next_step = gate.get("next_flow_step_id")
        job_id = job.job_id
        if next_step:
            moved = await session.execute(
                update(Job)
                .where(Job.job_id == job_id, Job.status == st.WAITING, Job.wait_ref == ref)
                .values(
                    status=st.PENDING,
                    current_step_id=next_step,
                    packets=packets,
                    attempts=0,
                    run_at=moment,
                    wait_expires_at=None,
                    updated_at=moment,
                    engine_data={**data, **updates},
                )
                .execution_options(synchronize_session=False)
            )
            if not rowcount(moved):
                raise WebhookRefused(409, "job_not_waiting")
            await claims.push_expiry(session, job_id, moment + timedelta(seconds=snap.int("claim_ttl_seconds")))
            changes, status = Changes(jobs={job_id}), st.PENDING
        else:
            done = await finish(
                session,
                job_id,
                st.COMPLETED,
                None,
                now=moment,
                allowed_from=(st.WAITING,),
                packets=packets,
                engine_updates=updates,
                threshold=threshold,
            )
            if done is None:
                raise WebhookRefused(409, "job_not_waiting")
            changes, status = done, st.COMPLETED
        await write_log(
            session,
            "info",
            f"Job {job_id} resumed from its webhook gate",
            log_context(job, flow_step_id=step_id, wait_kind=GATE, remote_ip=delivery.remote_ip),
            threshold=threshold,
            **log_owner(job),
        )
    await services.announce(changes.jobs, changes.flows)
    if next_step:
        services.wake()
    return Resumed(job_id, next_step or None, status)


def _payload_packet(payload: Any, step_id: str, delivery: Delivery, moment: datetime) -> dict[str, Any]:
    return {
        "type": "webhook_payload",
        "timestamp": iso(moment),
        "data": {"title": "Webhook Payload", "body": json.dumps(payload, ensure_ascii=False)},
        "metadata": {
            "source_type": "webhook_gate_inbound",
            "flow_step_id": step_id,
            "received_at": iso(moment),
            "remote_ip": delivery.remote_ip,
        },
    }
