"""Waiting steps: approval and webhook gate. They park the job; nothing holds a worker."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import timedelta
from typing import Any

from datamachine_mcp.engine.catalog import FieldSpec, StepType
from datamachine_mcp.engine.steps import StepResult, StepRun
from datamachine_mcp.storage.timeutil import iso

PREVIEW_CHARS = 2000


def _settings(run: StepRun) -> dict[str, Any]:
    return dict(run.step.get("flow_step_settings") or {})


def _next_step_id(run: StepRun) -> str | None:
    following = run.plan.next_after(run.flow_step_id)
    return following["flow_step_id"] if following else None


async def run_approval(run: StepRun) -> StepResult:
    settings = _settings(run)
    now = run.now()
    hours = int(settings.get("timeout_hours") or 0)
    expires = now + timedelta(hours=hours) if hours > 0 else None
    packets = run.job.packets or []
    data = (packets[0].get("data") or {}) if packets else {}
    body = str(data.get("content_string") or data.get("body") or "")
    action_id = "pa_" + uuid.uuid4().hex
    state = {
        "action_id": action_id,
        "flow_step_id": run.flow_step_id,
        "next_flow_step_id": _next_step_id(run),
        "description": settings.get("description") or "",
        "preview": {"title": data.get("title") or "", "body": body[:PREVIEW_CHARS]},
        "requested_at": iso(now),
        "expires_at": iso(expires),
        "status": "pending",
        "on_reject": settings.get("on_reject") or "skip",
    }
    return StepResult(
        status="waiting",
        wait={
            "kind": "approval",
            "wait_ref": action_id,
            "expires_at": expires,
            "state": state,
            "notify_url": settings.get("notify_url"),
        },
    )


def gate_token_ref(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def run_webhook_gate(run: StepRun) -> StepResult:
    settings = _settings(run)
    now = run.now()
    hours = int(settings.get("timeout_hours") or 0) or run.settings.int("webhook_gate_default_expiry_hours")
    expires = now + timedelta(hours=hours)
    token = secrets.token_bytes(32).hex()
    state = {
        "flow_step_id": run.flow_step_id,
        "next_flow_step_id": _next_step_id(run),
        "description": settings.get("description") or "",
        "token": run.services.box.encrypt(token, "webhook_gate_token"),
        "created_at": iso(now),
        "expires_at": iso(expires),
        "status": "pending",
        "received_at": None,
    }
    return StepResult(
        status="waiting",
        wait={
            "kind": "webhook_gate",
            "wait_ref": gate_token_ref(token),
            "expires_at": expires,
            "state": state,
            "notify_url": settings.get("notify_url"),
            "token": token,
        },
    )


_GATE_FIELDS = {
    "description": FieldSpec("string", "Shown to reviewers / sent with the notification"),
    "timeout_hours": FieldSpec("integer", "Hours before the wait times out (0 = none)", default=0, min=0, max=8760),
    "notify_url": FieldSpec("string", "URL notified (signed POST) when a job parks here", kind="url"),
}

STEP_TYPES = (
    StepType(
        "approval",
        "Approval",
        "Park the job until a person accepts or rejects it.",
        False,
        settings_fields={
            **_GATE_FIELDS,
            "on_reject": FieldSpec("string", "What a rejection does to the job", default="skip", enum=("skip", "fail")),
        },
        run=run_approval,
        wait_kind="approval",
        position=50,
    ),
    StepType(
        "webhook_gate",
        "Webhook gate",
        "Park the job until an HTTP POST to its resume URL arrives.",
        False,
        settings_fields=dict(
            _GATE_FIELDS,
            timeout_hours=FieldSpec(
                "integer",
                "Hours before the gate expires (0 = webhook_gate_default_expiry_hours)",
                default=0,
                min=0,
                max=8760,
            ),
        ),
        run=run_webhook_gate,
        wait_kind="webhook_gate",
        position=60,
    ),
)
