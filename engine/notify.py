"""The optional ``notify_url`` POST when a job parks at a gate. Best effort."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.store import JobRow
from datamachine_mcp.storage.settings_schema import Snapshot

log = logging.getLogger("datamachine.notify")


def delivery_id(kind: str, job_id: int, flow_step_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"datamachine-mcp:{kind}:{job_id}:{flow_step_id}"))


async def post_wait_notification(
    services: EngineServices, snap: Snapshot, job: JobRow, flow_step_id: str, notify: dict[str, Any]
) -> None:
    wait = notify["wait"]
    body: dict[str, Any] = {
        "event": "datamachine.waiting",
        "job_id": job.job_id,
        "flow_id": job.flow_key,
        "flow_step_id": flow_step_id,
        "kind": notify["kind"],
        "expires_at": notify.get("expires_at"),
    }
    if notify["kind"] == "approval":
        body["action_id"] = wait["wait_ref"]
    else:
        base = services.public_base_url
        body["resume_url"] = f"{base.rstrip('/')}/webhooks/gates/{wait.get('token')}" if base else None
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "X-DataMachine-Event": "datamachine.waiting",
        "X-DataMachine-Delivery": delivery_id("notify", job.job_id, flow_step_id),
        "X-DataMachine-Timestamp": str(int(time.time())),
    }
    try:
        async with Outbound(snap, version=services.version) as outbound:
            await outbound.post_json(notify["url"], payload, headers=headers)
    except Exception as exc:  # failures are only logged: the job stays parked either way
        log.warning("wait notification for job %s to %s failed: %s", job.job_id, notify["url"], exc)
