"""The webhook routes beside the MCP endpoint; they authenticate with their own secrets, not bearer tokens.

* ``POST /webhooks/flows/{flow_id}`` starts the flow with the posted JSON (202 ``{job_id, flow_id, status,
  replayed}``; ``job_id`` null and a ``reason`` when the flow's first step drains an empty queue);
* ``POST /webhooks/gates/{token}`` resumes the job waiting at that gate (202 ``{job_id, next_step_id,
  status}``).

Only HTTP lives here (reading a capped body, mapping refusals to statuses); the decisions are the engine's.
Error bodies are ``{"error": <code>}``.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from datamachine_mcp.engine.gate_resume import gate_body_limit, resume_gate
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.webhooks import Delivery, WebhookRefused, Webhooks

log = logging.getLogger("datamachine.http")


class _TooLarge(Exception):
    pass


async def read_capped(request: Request, cap: int) -> bytes:
    """The request body, refused (413) past ``cap`` bytes without reading more than ``cap + 1``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > cap:
            raise _TooLarge
    return bytes(body)


def _error(status: int, code: str, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": code}, status_code=status, headers=headers)


def _delivery(request: Request, body: bytes) -> Delivery:
    return Delivery(
        body=body,
        headers={name: value for name, value in request.headers.items()},
        remote_ip=request.client.host if request.client else None,
    )


def webhook_routes(services: EngineServices) -> list[Route]:
    intake = Webhooks(services)

    async def flow_trigger(request: Request) -> Response:
        flow_id: int = request.path_params["flow_id"]
        try:
            body = await read_capped(request, await intake.trigger_body_limit(flow_id))
            done = await intake.trigger(flow_id, _delivery(request, body))
        except _TooLarge:
            return _error(413, "payload_too_large")
        except WebhookRefused as refused:
            return _error(refused.status, refused.code, refused.retry_after)
        body_out: dict[str, Any] = {
            "job_id": done.job_id,
            "flow_id": done.flow_id,
            "status": done.status,
            "replayed": done.replayed,
        }
        if done.skipped is not None:
            body_out["reason"] = done.skipped
        return JSONResponse(body_out, status_code=202)

    async def gate(request: Request) -> Response:
        token: str = request.path_params["token"]
        try:
            body = await read_capped(request, await gate_body_limit(services))
            done = await resume_gate(services, token, _delivery(request, body))
        except _TooLarge:
            return _error(413, "payload_too_large")
        except WebhookRefused as refused:
            return _error(refused.status, refused.code, refused.retry_after)
        return JSONResponse(
            {"job_id": done.job_id, "next_step_id": done.next_step_id, "status": done.status}, status_code=202
        )

    return [
        Route("/webhooks/flows/{flow_id:int}", flow_trigger, methods=["POST"]),
        Route("/webhooks/gates/{token}", gate, methods=["POST"]),
    ]
