"""``webhook`` publish/update handler: a signed JSON POST to a URL.

Body (compact UTF-8 JSON): ``{event, delivery_id, job_id, flow_id, pipeline_id, flow_step_id,
dry_run: false, packet, engine}``. Headers: ``Content-Type``, ``X-DataMachine-Event``,
``X-DataMachine-Delivery`` (UUID5, stable across retries), ``X-DataMachine-Timestamp`` and, with a
secret, ``X-DataMachine-Signature`` = hex HMAC-SHA256 of ``"{timestamp}.{body}"``. Extra
``headers`` from the config cannot replace these. A dry run returns the request as ``preview``
(header values from the config and the signature masked).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from datamachine_mcp.engine.catalog import PUBLISHING, FieldSpec, HandlerSpec
from datamachine_mcp.engine.handlers.base import HandlerContext, PublishResult, with_defaults
from datamachine_mcp.engine.http import display_url, excerpt
from datamachine_mcp.engine.items import render
from datamachine_mcp.storage.crypto import MASK

EVENTS = {"publish": "datamachine.publish", "update": "datamachine.update"}


def delivery_id(job_id: Any, flow_step_id: Any, kind: str = "webhook") -> str:
    """UUID5 (``uuid.NAMESPACE_URL``) of ``datamachine-mcp:{kind}:{job_id}:{flow_step_id}``: the same on every retry."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"datamachine-mcp:{kind}:{job_id}:{flow_step_id}"))


def signature(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def build_body(event: str, ctx: HandlerContext, packet: Mapping[str, Any], keys: list[str]) -> bytes:
    engine = {key: ctx.engine_data[key] for key in keys if key in ctx.engine_data}
    document = {
        "event": event,
        "delivery_id": delivery_id(ctx.job_id, ctx.flow_step_id),
        "job_id": ctx.job_id,
        "flow_id": ctx.flow_id,
        "pipeline_id": ctx.pipeline_id,
        "flow_step_id": ctx.flow_step_id,
        "dry_run": False,
        "packet": packet,
        "engine": engine,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class WebhookHandler:
    slug = "webhook"

    async def publish(self, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext) -> PublishResult:
        return await self._send("publish", config, packet, ctx)

    async def update(self, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext) -> PublishResult:
        return await self._send("update", config, packet, ctx)

    async def _send(
        self, kind: str, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext
    ) -> PublishResult:
        cfg = with_defaults(self.slug, kind, config)
        url = cfg["url"]
        ctx.outbound.validate_url(url)
        event = EVENTS[kind]
        body = build_body(event, ctx, packet, list(cfg.get("include_engine_data") or []))
        timestamp = str(int(time.time()))
        secret = cfg.get("secret")
        extra = {str(k): render(v) for k, v in (cfg.get("headers") or {}).items()}
        own = {
            "Content-Type": "application/json",
            "X-DataMachine-Event": event,
            "X-DataMachine-Delivery": delivery_id(ctx.job_id, ctx.flow_step_id),
            "X-DataMachine-Timestamp": timestamp,
        }
        if secret:
            own["X-DataMachine-Signature"] = signature(str(secret), timestamp, body)
        lowered = {k.lower() for k in own}
        headers = {k: v for k, v in extra.items() if k.lower() not in lowered}
        headers.update(own)
        if ctx.dry_run:
            shown = {k: (MASK if k in extra or k == "X-DataMachine-Signature" else v) for k, v in headers.items()}
            preview = {"method": "POST", "url": display_url(url), "headers": shown, "body": json.loads(body)}
            return {"status": "preview", "url": display_url(url), "preview": preview, "engine_updates": {}}
        response = await ctx.outbound.post_json(url, body, headers=headers)
        return {
            "status": "published" if kind == "publish" else "updated",
            "url": display_url(url),
            "status_code": response.status,
            "response": excerpt(response.content),
            "engine_updates": {},
        }


HANDLER = HandlerSpec(
    "webhook",
    "Webhook",
    "POST the item as JSON to a URL, signed with HMAC-SHA256 when a secret is set.",
    PUBLISHING,
    {
        "url": FieldSpec("string", "Receiver URL (http or https)", required=True, kind="url"),
        "secret": FieldSpec("string", "HMAC-SHA256 signing secret (stored encrypted)", secret=True),
        "headers": FieldSpec("object", "Extra request headers (stored encrypted)", secret=True),
        "include_engine_data": FieldSpec(
            "array",
            "engine_data keys sent along",
            items="string",
            default=["item_identifier", "source_url", "post_id", "published_url", "file_path"],
        ),
    },
    code=WebhookHandler(),
    position=50,
)
