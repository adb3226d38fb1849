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
from datetime import datetime
from typing import Any

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.accounting import log_context, log_owner
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.steps.gates import gate_token_ref
from datamachine_mcp.engine.store import GuardMissed
from datamachine_mcp.engine.waits import resume_waiting
from datamachine_mcp.engine.webhook_delivery import Delivery, WebhookRefused, parse_payload
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
    async with services.store.transaction() as tx:
        job = await tx.job_waiting_at(ref)
        if job is None or job.wait_kind != GATE:
            raise WebhookRefused(404, "gate_not_found")
        if job.status != st.WAITING:
            raise WebhookRefused(409, "job_not_waiting")
        if job.wait_expires_at is not None and job.wait_expires_at <= moment:
            raise WebhookRefused(404, "gate_not_found")  # expired: the maintenance loop fails it
        payload = parse_payload(delivery.body, containers_only=False)
        data = dict(job.engine_data or {})
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
        try:
            changes, resumed = await resume_waiting(
                tx,
                job,
                ref,
                next_step=next_step,
                packets=packets,
                updates=updates,
                now=moment,
                threshold=threshold,
                claim_ttl=snap.int("claim_ttl_seconds"),
            )
        except GuardMissed:
            raise WebhookRefused(409, "job_not_waiting") from None
        status = st.PENDING if resumed else st.COMPLETED
        tx.log(
            "info",
            f"Job {job_id} resumed from its webhook gate",
            log_context(job, flow_step_id=step_id, wait_kind=GATE, remote_ip=delivery.remote_ip),
            threshold=threshold,
            **log_owner(job),
        )
    await services.announce(changes.jobs, changes.flows)
    if resumed:
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
