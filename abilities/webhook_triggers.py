"""Flows toolset, part 4: inbound webhook triggers (docs/engine.md, Inbound webhooks).

The configuration is ``scheduling_config.webhook``. Bearer tokens are stored only as their SHA-256
hash and shown once; HMAC secrets are stored encrypted (kind ``webhook_trigger_secret``). The engine
verifies deliveries (``engine.webhooks``) on the HTTP route ``POST /webhooks/flows/{flow_id}``.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any, Literal

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.pipeline_common import load_flow
from datamachine_mcp.abilities.pipeline_views import notify_flow
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.engine.items import sha256_hex
from datamachine_mcp.engine.webhooks import TRIGGER_SECRET_KIND as SECRET_KIND
from datamachine_mcp.storage.crypto import SecretBox
from datamachine_mcp.storage.models import Flow
from datamachine_mcp.storage.timeutil import iso, utcnow

DEFAULT_PREVIOUS_TTL = 604800
AuthMode = Literal["bearer", "hmac"]
NO_URL_WARNING = (
    "This server has no public URL (stdio without DATAMACHINE_PUBLIC_URL), so webhook_url is unknown; it is "
    "served by `datamachine-mcp serve --http`, whose URL webhook-trigger-status then shows."
)


def webhook_url(ctx: AbilityContext, flow_id: int) -> str | None:
    base = ctx.runtime.public_base_url
    return f"{base.rstrip('/')}/webhooks/flows/{flow_id}" if base else None


def new_token() -> str:
    return secrets.token_hex(32)


def secret_ids(hook: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"id": s.get("id"), "expires_at": s.get("expires_at")} for s in hook.get("secrets") or [] if isinstance(s, dict)
    ]


def seal(box: SecretBox, value: str, sid: str, expires_at: str | None = None) -> dict[str, Any]:
    return {"id": sid, "value": box.encrypt(value, SECRET_KIND), "expires_at": expires_at}


def _hook(flow: Flow) -> dict[str, Any] | None:
    hook = (flow.scheduling_config or {}).get("webhook")
    return dict(hook) if isinstance(hook, dict) else None


async def _save(ctx: AbilityContext, flow: Flow, hook: dict[str, Any] | None, summary: str, change: str) -> None:
    config = {k: v for k, v in (flow.scheduling_config or {"interval": "manual"}).items() if k != "webhook"}
    if hook is not None:
        config["webhook"] = hook
    flow.scheduling_config = config
    flow.updated_at = utcnow()
    await ctx.audit(
        summary,
        target=("flow", flow.flow_id),
        changes=[change],
        agent_id=flow.agent_id,
        flow_id=flow.flow_id,
        pipeline_id=flow.pipeline_id,
    )
    notify_flow(ctx, flow)


class RateLimit(Output):
    max: int = Field(description="Accepted requests per window (0 = unlimited)")
    window: int = Field(description="Window in seconds")


class SecretId(Output):
    id: str = Field(description="current or previous")
    expires_at: str | None = Field(description="When a previous secret stops working (ISO 8601 UTC)")


# --- webhook-trigger-enable -------------------------------------------------------------------


class EnableIn(Input):
    flow_id: int = Field(ge=1, description="Flow")
    auth_mode: AuthMode | None = Field(
        None,
        description="Auth mode",
    )
    secret: str | None = Field(None, min_length=16, max_length=256, description="hmac: shared secret to use")
    generate_secret: bool = Field(False, description="hmac: generate one")
    rate_limit_max: int | None = Field(None, ge=0, le=10000, description="Requests per window")
    rate_limit_window: int | None = Field(None, ge=1, le=86400, description="Window (seconds)")
    tolerance_seconds: int | None = Field(None, ge=30, le=3600, description="HMAC timestamp tolerance")
    max_body_bytes: int | None = Field(None, ge=1024, le=10485760, description="Body size cap")


class EnableOut(Output):
    flow_id: int = Field(description="Flow id")
    webhook_url: str | None = Field(description="URL to POST to (null when the server has no public_base_url)")
    auth_mode: AuthMode = Field(description="bearer or hmac")
    token: str | None = Opt("bearer: the new token, shown only now (it is stored hashed)")
    token_prefix: str | None = Opt("bearer: first 8 characters of the token, to recognise it")
    secret: str | None = Opt("hmac: the generated secret, shown only now")
    secret_ids: list[SecretId] = Field(description="hmac: active secrets (never their values)")
    rate_limit: RateLimit = Field(description="Rate limit per flow")
    tolerance_seconds: int = Field(description="HMAC timestamp tolerance in seconds")
    max_body_bytes: int = Field(description="Body size cap")
    warnings: list[str] = Field(description="Notes, e.g. no public URL")
    message: str = Field(description="Human-readable result")


@ability(
    "webhook-trigger-enable",
    toolset="flows",
    level="admin",
    description=("Let HTTP POSTs (bearer or HMAC) start a flow; returns its URL."),
)
async def webhook_trigger_enable(ctx: AbilityContext, inp: EnableIn) -> EnableOut:
    flow = await load_flow(ctx, inp.flow_id, "admin", mutating=True, lock=True)
    old = _hook(flow) or {}
    mode: str = inp.auth_mode or old.get("auth_mode") or "bearer"
    if mode == "bearer" and (inp.secret is not None or inp.generate_secret):
        raise AbilityError(
            "invalid_webhook_config",
            "secret and generate_secret apply to auth_mode hmac; bearer mode uses a generated token.",
            auth_mode=mode,
        )
    snap = await ctx.settings(access=True)
    defaults = snap["webhook_rate_limit"]
    raw_old_limit = old.get("rate_limit")
    old_limit = raw_old_limit if isinstance(raw_old_limit, dict) else {}
    now = utcnow()
    hook: dict[str, Any] = {
        "enabled": True,
        "auth_mode": mode,
        "created_at": old.get("created_at") or iso(now),
        "token_hash": None,
        "token_prefix": None,
        "secrets": [],
        "tolerance_seconds": inp.tolerance_seconds
        or old.get("tolerance_seconds")
        or snap.int("webhook_replay_window_seconds"),
        "max_body_bytes": inp.max_body_bytes or old.get("max_body_bytes") or snap.int("webhook_max_body_bytes"),
        "rate_limit": {
            "max": next(v for v in (inp.rate_limit_max, old_limit.get("max"), defaults["max"]) if v is not None),
            "window": next(
                v for v in (inp.rate_limit_window, old_limit.get("window"), defaults["window"]) if v is not None
            ),
        },
    }
    out: dict[str, Any] = {}
    warnings: list[str] = []
    if mode == "bearer":
        if old.get("auth_mode") == "bearer" and old.get("token_hash"):
            hook["token_hash"], hook["token_prefix"] = old["token_hash"], old.get("token_prefix")
            message = (
                f"Webhook trigger of flow {flow.flow_id} already enabled; rotate to get a new token "
                "(webhook-trigger-rotate-secret)."
            )
        else:
            token = new_token()
            hook["token_hash"], hook["token_prefix"] = sha256_hex(token), token[:8]
            out["token"] = token
            message = (
                f"Webhook trigger of flow {flow.flow_id} enabled (bearer). Store the token now: it is not shown again."
            )
        out["token_prefix"] = hook["token_prefix"]
    else:
        current = [s for s in old.get("secrets") or [] if isinstance(s, dict)] if old.get("auth_mode") == "hmac" else []
        if inp.secret is not None:
            hook["secrets"] = [seal(ctx.runtime.box, inp.secret, "current")]
            message = f"Webhook trigger of flow {flow.flow_id} enabled (hmac) with the given secret."
        elif inp.generate_secret or not any(s.get("id") == "current" for s in current):
            value = new_token()
            hook["secrets"] = [seal(ctx.runtime.box, value, "current")]
            out["secret"] = value
            message = (
                f"Webhook trigger of flow {flow.flow_id} enabled (hmac). Store the secret now: it is not shown again."
            )
        else:
            hook["secrets"] = current
            message = f"Webhook trigger of flow {flow.flow_id} enabled (hmac); the existing secret is kept."
    url = webhook_url(ctx, flow.flow_id)
    if url is None:
        warnings.append(NO_URL_WARNING)
    if hook != old:
        await _save(ctx, flow, hook, f"webhook trigger of flow {flow.flow_id} enabled ({mode})", "webhook")
    return EnableOut.model_validate(
        {
            "flow_id": flow.flow_id,
            "webhook_url": url,
            "auth_mode": mode,
            **out,
            "secret_ids": secret_ids(hook),
            "rate_limit": hook["rate_limit"],
            "tolerance_seconds": hook["tolerance_seconds"],
            "max_body_bytes": hook["max_body_bytes"],
            "warnings": warnings,
            "message": message,
        }
    )


# --- webhook-trigger-disable ------------------------------------------------------------------


class FlowIn(Input):
    flow_id: int = Field(ge=1, description="Flow")


class DisableOut(Output):
    flow_id: int = Field(description="Flow id")
    was_enabled: bool = Field(description="Whether a trigger was configured before the call")
    message: str = Field(description="Human-readable result")


@ability(
    "webhook-trigger-disable",
    toolset="flows",
    level="admin",
    destructive=True,
    idempotent=True,
    description="Disable a flow's webhook trigger and its credentials.",
)
async def webhook_trigger_disable(ctx: AbilityContext, inp: FlowIn) -> DisableOut:
    flow = await load_flow(ctx, inp.flow_id, "admin", mutating=True, lock=True)
    was = _hook(flow) is not None
    if was:
        await _save(ctx, flow, None, f"webhook trigger of flow {flow.flow_id} disabled", "webhook")
    return DisableOut(
        flow_id=flow.flow_id,
        was_enabled=was,
        message=f"Webhook trigger of flow {flow.flow_id} disabled; its credentials are destroyed."
        if was
        else f"Flow {flow.flow_id} had no webhook trigger; nothing changed.",
    )


# --- webhook-trigger-status -------------------------------------------------------------------


class StatusOff(Output):
    flow_id: int = Field(description="Flow id")
    flow_name: str = Field(description="Flow name")
    webhook_enabled: Literal[False] = Field(description="False: no trigger is configured")


class StatusOn(Output):
    flow_id: int = Field(description="Flow id")
    flow_name: str = Field(description="Flow name")
    webhook_enabled: bool = Field(description="Whether the trigger accepts requests")
    webhook_url: str | None = Field(description="URL to POST to (null when the server has no public_base_url)")
    created_at: str | None = Field(description="When the trigger was first enabled (ISO 8601 UTC)")
    auth_mode: AuthMode = Field(description="bearer or hmac")
    token_prefix: str | None = Opt("bearer: first 8 characters of the token")
    secret_ids: list[SecretId] | None = Opt("hmac: the secrets (ids and expiry, never values)")
    rate_limit: RateLimit = Field(description="Rate limit per flow")
    tolerance_seconds: int = Field(description="HMAC timestamp tolerance in seconds")
    max_body_bytes: int = Field(description="Body size cap")


@ability(
    "webhook-trigger-status",
    toolset="flows",
    level="viewer",
    read_only=True,
    idempotent=True,
    description=("Show a flow's webhook trigger."),
)
async def webhook_trigger_status(ctx: AbilityContext, inp: FlowIn) -> StatusOn | StatusOff:
    flow = await load_flow(ctx, inp.flow_id, "viewer", mutating=False)
    hook = _hook(flow)
    if hook is None:
        return StatusOff(flow_id=flow.flow_id, flow_name=flow.flow_name, webhook_enabled=False)
    snap = await ctx.settings(access=True)
    mode = hook.get("auth_mode") or "bearer"
    limit = hook.get("rate_limit") if isinstance(hook.get("rate_limit"), dict) else snap["webhook_rate_limit"]
    return StatusOn.model_validate(
        {
            "flow_id": flow.flow_id,
            "flow_name": flow.flow_name,
            "webhook_enabled": bool(hook.get("enabled")),
            "webhook_url": webhook_url(ctx, flow.flow_id),
            "created_at": hook.get("created_at"),
            "auth_mode": mode,
            "token_prefix": hook.get("token_prefix") if mode == "bearer" else None,
            "secret_ids": secret_ids(hook) if mode == "hmac" else None,
            "rate_limit": limit,
            "tolerance_seconds": hook.get("tolerance_seconds") or snap.int("webhook_replay_window_seconds"),
            "max_body_bytes": hook.get("max_body_bytes") or snap.int("webhook_max_body_bytes"),
        }
    )


# --- webhook-trigger-rotate-secret ------------------------------------------------------------


class RotateIn(Input):
    flow_id: int = Field(ge=1, description="Flow")
    secret: str | None = Field(None, min_length=16, max_length=256, description="hmac: new secret to use")
    generate: bool = Field(False, description="hmac: generate one")
    previous_ttl_seconds: int = Field(
        DEFAULT_PREVIOUS_TTL,
        ge=0,
        le=2592000,
        description="hmac: old secret's grace",
    )


class RotateOut(Output):
    flow_id: int = Field(description="Flow id")
    auth_mode: AuthMode = Field(description="bearer or hmac")
    new_token: str | None = Opt("bearer: the new token, shown only now")
    token_prefix: str | None = Opt("bearer: first 8 characters of the new token")
    new_secret: str | None = Opt("hmac: the generated secret, shown only now")
    previous_expires_at: str | None = Field(description="hmac: when the old secret stops working; null if revoked")
    secret_ids: list[SecretId] = Field(description="hmac: the secrets after rotation")
    message: str = Field(description="Human-readable result")


@ability(
    "webhook-trigger-rotate-secret",
    toolset="flows",
    level="admin",
    destructive=True,
    description=("Replace a flow's webhook token or HMAC secret."),
)
async def webhook_trigger_rotate_secret(ctx: AbilityContext, inp: RotateIn) -> RotateOut:
    flow = await load_flow(ctx, inp.flow_id, "admin", mutating=True, lock=True)
    old = _hook(flow)
    if old is None or not old.get("enabled"):
        raise AbilityError(
            "webhook_not_enabled",
            f"Flow {flow.flow_id} has no webhook trigger; enable one with webhook-trigger-enable.",
            flow_id=flow.flow_id,
        )
    mode = old.get("auth_mode") or "bearer"
    hook = dict(old)
    out: dict[str, Any] = {"previous_expires_at": None}
    if mode == "bearer":
        hmac_only = [
            name
            for name, given in (
                ("secret", inp.secret is not None),
                ("generate", inp.generate),
                ("previous_ttl_seconds", "previous_ttl_seconds" in inp.model_fields_set),
            )
            if given
        ]
        if hmac_only:
            raise AbilityError(
                "invalid_webhook_config",
                f"{', '.join(hmac_only)} apply to hmac triggers; this trigger uses a bearer token, which is replaced "
                "at once.",
                fields=hmac_only,
            )
        token = new_token()
        hook["token_hash"], hook["token_prefix"] = sha256_hex(token), token[:8]
        out.update(new_token=token, token_prefix=token[:8])
        message = "Bearer token replaced; the old token no longer works. Store the new token now."
    else:
        if inp.secret is None and not inp.generate:
            raise AbilityError(
                "webhook_secret_required",
                "Give secret (the new shared secret) or generate: true to rotate an hmac trigger.",
            )
        value = inp.secret if inp.secret is not None else new_token()
        now = utcnow()
        current = [s for s in old.get("secrets") or [] if isinstance(s, dict) and s.get("id") == "current"]
        kept: list[dict[str, Any]] = []
        if current and inp.previous_ttl_seconds > 0:
            expires = iso(now + timedelta(seconds=inp.previous_ttl_seconds))
            kept = [{**current[0], "id": "previous", "expires_at": expires}]
            out["previous_expires_at"] = expires
        hook["secrets"] = [seal(ctx.runtime.box, value, "current"), *kept]
        if inp.secret is None:
            out["new_secret"] = value
        message = (
            f"Secret rotated; the previous one works until {out['previous_expires_at']}."
            if out["previous_expires_at"]
            else "Secret rotated; the previous one is revoked."
        )
    await _save(ctx, flow, hook, f"webhook credential of flow {flow.flow_id} rotated ({mode})", "webhook")
    return RotateOut.model_validate(
        {"flow_id": flow.flow_id, "auth_mode": mode, **out, "secret_ids": secret_ids(hook), "message": message}
    )
