"""Inbound webhook triggers: a POST that starts a flow run (docs/engine.md, Inbound webhooks).

The HTTP layer hands over the raw body, the headers and the sender's address; everything that decides is
here: which credential is valid (a bearer token, or an HMAC signature over ``"{timestamp}.{body}"`` within
the replay window, with a rotated secret honoured until it expires), the per-flow rate limit and the run
it starts. Refusals are ``WebhookRefused`` with the HTTP status and code to answer. Resuming a job parked
at a webhook gate (``engine.gate_resume``) shares ``Delivery``, ``WebhookRefused`` and ``parse_payload``
(``engine.webhook_delivery``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.accounting import Changes
from datamachine_mcp.engine.items import sha256_hex
from datamachine_mcp.engine.jobs import create_flow_job, empty_first_queue, find_by_key
from datamachine_mcp.engine.plan import PlanError, resolve_plan
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.scheduler import create_failed_run
from datamachine_mcp.engine.webhook_delivery import Delivery, Triggered, WebhookRefused, kept_headers, parse_payload
from datamachine_mcp.storage.crypto import SecretUnavailable
from datamachine_mcp.storage.logs import LogThrottle, write_log
from datamachine_mcp.storage.models import Agent, Flow, Job, Pipeline
from datamachine_mcp.storage.timeutil import iso, parse_datetime, utcnow

log = logging.getLogger("datamachine.webhooks")

TRIGGER_SECRET_KIND = "webhook_trigger_secret"  # encryption kind of a trigger's HMAC secrets
TIMESTAMP_HEADER = "x-datamachine-timestamp"
SIGNATURE_HEADER = "x-datamachine-signature"
DELIVERY_HEADERS = ("idempotency-key", "x-datamachine-delivery")
MAX_DELIVERY_ID = 128
BACKPRESSURE_RETRY_SECONDS = 60
UNAUTHORIZED = 401  # unknown flow, disabled trigger and every bad credential look the same
LOG_EVERY_SECONDS = 60.0  # at most one warning row per flow and reason a minute: refusals cannot flood the log


@dataclass
class _Seen:
    """HMAC signatures accepted within the replay window: the same signed request is refused a second time
    (a sender retrying signs again with a fresh timestamp; its delivery id then returns the first job)."""

    until: dict[tuple[int, str], float] = field(default_factory=dict)

    def claim(self, key: tuple[int, str], now: float, ttl: float) -> bool:
        if len(self.until) > 10_000:
            self.until = {k: t for k, t in self.until.items() if t > now}
        if self.until.get(key, 0.0) > now:
            return False
        self.until[key] = now + ttl
        return True

    def release(self, key: tuple[int, str]) -> None:
        self.until.pop(key, None)


@dataclass
class _Window:
    started: float
    count: int = 0


class Webhooks:
    """The process's inbound-webhook intake (its rate windows live in memory, per process)."""

    def __init__(
        self,
        services: EngineServices,
        *,
        now: Callable[[], datetime] = utcnow,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.services = services
        self.now = now
        self.clock = clock
        self._windows: dict[int, _Window] = {}
        self._throttle = LogThrottle(LOG_EVERY_SECONDS)
        self._seen = _Seen()

    # --- flow triggers ----------------------------------------------------------------------

    async def trigger_body_limit(self, flow_id: int) -> int:
        """The body cap of the flow's trigger (the setting for an unknown flow: it is refused after)."""
        hook = await self._hook(flow_id)
        snap = await self.services.snapshot()
        cap = (hook or {}).get("max_body_bytes")
        return int(cap) if isinstance(cap, int) and cap > 0 else snap.int("webhook_max_body_bytes")

    async def trigger(self, flow_id: int, delivery: Delivery) -> Triggered:
        """Verify the delivery, apply the rate limit and start the flow with its payload; raises
        WebhookRefused."""
        snap = await self.services.snapshot()
        now = self.now()
        hook, owner, agent_status = await self._enabled(flow_id)
        mode = hook.get("auth_mode") or "bearer"
        seen = await self._verify(flow_id, hook, mode, delivery, owner, snap, now)
        try:
            await self._rate_limit(flow_id, hook, delivery, owner, snap)
            if agent_status == "inactive":
                raise WebhookRefused(403, "agent_inactive")
            payload = parse_payload(delivery.body, containers_only=True)
            delivery_id = next((delivery.headers[h] for h in DELIVERY_HEADERS if delivery.headers.get(h)), None)
            if delivery_id is not None and len(delivery_id) > MAX_DELIVERY_ID:
                raise WebhookRefused(400, "invalid_delivery_id")
            return await self._start(flow_id, payload, delivery, mode, delivery_id, snap, now)
        except BaseException:
            if seen is not None:  # refused after all: the sender may send the same signed request again
                self._seen.release(seen)
            raise

    async def _enabled(self, flow_id: int) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        """The flow's enabled trigger, its owner and its agent's status; refused when there is none."""
        async with self.services.db.read() as session:
            flow = await session.get(Flow, flow_id)
            hook = _enabled_hook(flow)
            if flow is None or hook is None:
                # Identical to a bad credential: the URL does not reveal which flows exist.
                log.debug("webhook for flow %s refused: no enabled trigger", flow_id)
                raise WebhookRefused(UNAUTHORIZED, "unauthorized")
            owner = {"agent_id": flow.agent_id, "user_id": flow.user_id or None}
            agent_status = None
            if flow.agent_id is not None:
                agent_status = (
                    await session.execute(select(Agent.status).where(Agent.agent_id == flow.agent_id))
                ).scalar()
        return hook, owner, agent_status

    async def _verify(
        self,
        flow_id: int,
        hook: dict[str, Any],
        mode: str,
        delivery: Delivery,
        owner: dict[str, Any],
        snap: Any,
        now: datetime,
    ) -> tuple[int, str] | None:
        """Check the credential (and, for HMAC, that the signature is new); returns the claimed signature
        key, released again if the delivery is refused later."""
        tolerance = int(hook.get("tolerance_seconds") or snap.int("webhook_replay_window_seconds"))
        reason = self._authenticate(mode, hook, delivery, now, tolerance)
        seen: tuple[int, str] | None = None
        if reason is None and mode == "hmac":
            seen = (flow_id, _signature(delivery))
            if not self._seen.claim(seen, self.clock(), 2 * tolerance):  # the timestamp may be early or late
                reason, seen = "replayed_signature", None
        if reason is not None:
            await self._warn(flow_id, reason, delivery, owner, f"Webhook for flow {flow_id} refused: {reason}")
            raise WebhookRefused(UNAUTHORIZED, "unauthorized")
        return seen

    async def _rate_limit(
        self, flow_id: int, hook: dict[str, Any], delivery: Delivery, owner: dict[str, Any], snap: Any
    ) -> None:
        """Take one delivery from the flow's window (its own limit, else the setting), or refuse with 429."""
        own = hook.get("rate_limit")
        limit: dict[str, Any] = own if isinstance(own, dict) else snap["webhook_rate_limit"]
        wait = self._take(flow_id, int(limit.get("max", 60)), int(limit.get("window", 60)))
        if wait is not None:
            await self._warn(
                flow_id, "rate_limited", delivery, owner, f"Webhook for flow {flow_id} rate limited", limit=limit
            )
            raise WebhookRefused(429, "rate_limited", retry_after=wait)

    async def _start(
        self,
        flow_id: int,
        payload: Any,
        delivery: Delivery,
        mode: str,
        delivery_id: str | None,
        snap: Any,
        now: datetime,
    ) -> Triggered:
        """In one transaction: a redelivery answers with its first job; else the flow (locked, still
        enabled) gets a job, unless the engine is at its active-job limit."""
        key = f"webhook:{flow_id}:{delivery_id}" if delivery_id is not None else None
        threshold = str(snap["log_level"])
        changes = Changes()
        async with self.services.db.write() as session:
            if key is not None:
                first = await find_by_key(session, key)
                if first is not None:  # a redelivery: the first job, nothing new
                    return Triggered(first.job_id, flow_id, first.status, True)
            flow = (
                await session.execute(self.services.db.for_update(select(Flow).where(Flow.flow_id == flow_id)))
            ).scalar_one_or_none()
            if flow is None or _enabled_hook(flow) is None:  # disabled or deleted since it was verified
                raise WebhookRefused(UNAUTHORIZED, "unauthorized")
            await _check_backpressure(session, snap.int("max_active_jobs"))
            pipeline = await session.get(Pipeline, flow.pipeline_id)
            assert pipeline is not None  # a flow's pipeline is its foreign key
            try:
                plan = resolve_plan(flow.flow_config)
            except PlanError as err:
                # Like a scheduled fire: nobody to tell, so the run is created failed and shows in flow health.
                job_id, status = await create_failed_run(
                    self.services,
                    session,
                    flow,
                    pipeline,
                    trigger="webhook",
                    key=key,
                    err=err,
                    now=now,
                    threshold=threshold,
                    changes=changes,
                )
            else:
                if empty_first_queue(plan, flow.flow_config or {}):  # like run-flow: nothing to run, nothing written
                    return Triggered(None, flow_id, "skipped", False, skipped="empty_drain_queue")
                trigger = {
                    "payload": payload,
                    "received_at": iso(now),
                    "remote_ip": delivery.remote_ip,
                    "headers": kept_headers(delivery.headers),
                    "auth_mode": mode,
                    "delivery_id": delivery_id,
                }
                created = await create_flow_job(
                    session,
                    flow=flow,
                    pipeline=pipeline,
                    plan=plan,
                    trigger="webhook",
                    initial_data={"webhook_trigger": trigger},
                    dry_run=False,
                    idempotency_key=key,
                    request={"flow_id": flow_id, "delivery_id": delivery_id},
                    max_attempts=snap.int("retry_max_attempts"),
                    now=now,
                    threshold=threshold,
                )
                job_id, status = created.job.job_id, created.job.status
                changes.jobs.add(job_id)
            changes.flows.add((flow.flow_id, flow.pipeline_id))
            await _audit_start(session, flow, job_id, delivery, mode, delivery_id)
        await self.services.announce(changes.jobs, changes.flows)
        self.services.wake()
        return Triggered(job_id, flow_id, status, False)

    def _authenticate(
        self, mode: str, hook: dict[str, Any], delivery: Delivery, now: datetime, tolerance: int
    ) -> str | None:
        """None when the delivery carries a valid credential, else the reason (logged, never answered)."""
        if mode == "bearer":
            header = delivery.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return "missing_credentials"
            expected = str(hook.get("token_hash") or "")
            return None if expected and hmac.compare_digest(sha256_hex(token.strip()), expected) else "bad_token"
        stamp = delivery.headers.get(TIMESTAMP_HEADER, "").strip()
        given = _signature(delivery)
        if not stamp or not given:
            return "missing_credentials"
        try:
            fresh = abs(now.timestamp() - int(stamp)) <= tolerance
        except ValueError:
            fresh = False
        if not fresh:
            return "stale_timestamp"
        secrets = self._active_secrets(hook, now)
        if not secrets:
            return "no_active_secret"
        signed = stamp.encode() + b"." + delivery.body
        matched = False
        for secret in secrets:  # every candidate is compared, so timing does not tell which one matched
            digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
            matched |= hmac.compare_digest(digest, given)
        return None if matched else "bad_signature"

    def _active_secrets(self, hook: dict[str, Any], now: datetime) -> list[str]:
        """The HMAC secrets that still verify: the current one and a rotated one until it expires."""
        out: list[str] = []
        for entry in hook.get("secrets") or []:
            if not isinstance(entry, dict):
                continue
            expires = entry.get("expires_at")
            if isinstance(expires, str) and parse_datetime(expires) <= now:
                continue
            try:
                out.append(str(self.services.box.decrypt(entry.get("value"), TRIGGER_SECRET_KIND)))
            except (SecretUnavailable, ValueError, TypeError):
                log.warning("a webhook secret could not be decrypted (was the secret key changed?)")
        return out

    def _take(self, flow_id: int, limit: int, window: int) -> int | None:
        """Count one accepted request against the flow's fixed window; seconds to wait when it is full."""
        if limit <= 0:
            return None
        now = self.clock()
        current = self._windows.get(flow_id)
        if current is None or now - current.started >= window:
            current = self._windows[flow_id] = _Window(started=now)
        if current.count >= limit:
            return max(1, int(current.started + window - now + 0.999))
        current.count += 1
        return None

    async def _warn(
        self, flow_id: int, reason: str, delivery: Delivery, owner: dict[str, Any], message: str, **extra: Any
    ) -> None:
        count = self._throttle.due((flow_id, reason), self.clock())
        if count is None:
            return
        context = {"flow_id": flow_id, "reason": reason, "remote_ip": delivery.remote_ip, "count": count, **extra}
        try:
            async with self.services.db.write() as session:
                await write_log(session, "warning", message, context, **owner)
        except Exception:  # the refusal is answered even when the log row cannot be written
            log.warning("%s (log row not written)", message, exc_info=True)

    async def _hook(self, flow_id: int) -> dict[str, Any] | None:
        async with self.services.db.read() as session:
            return _enabled_hook(await session.get(Flow, flow_id))


async def _check_backpressure(session: AsyncSession, limit: int) -> None:
    """Refuse with 503 (retry later) while the engine has ``limit`` active jobs (0: no limit)."""
    if limit > 0:
        active = (
            await session.execute(select(func.count()).select_from(Job).where(Job.status.in_(st.RUNNING)))
        ).scalar() or 0
        if active >= limit:
            raise WebhookRefused(503, "queue_backpressure", retry_after=BACKPRESSURE_RETRY_SECONDS)


async def _audit_start(
    session: AsyncSession, flow: Flow, job_id: int, delivery: Delivery, mode: str, delivery_id: str | None
) -> None:
    """The audit row of a started delivery (no user acted: the sender is named by its address)."""
    await write_log(
        session,
        "info",
        f"webhook: job {job_id} created for flow {flow.flow_id}",
        {
            "audit": True,
            "ability": "webhook-trigger",
            "actor_user_id": None,
            "actor_agent_id": None,
            "actor_token_id": None,
            "transport": "webhook",
            "remote_ip": delivery.remote_ip,
            "auth_mode": mode,
            "delivery_id": delivery_id,
            "target": {"type": "job", "id": job_id},
            "job_id": job_id,
            "flow_id": flow.flow_id,
            "pipeline_id": flow.pipeline_id,
        },
        agent_id=flow.agent_id,
        user_id=flow.user_id or None,
        audit=True,
    )


def _signature(delivery: Delivery) -> str:
    return delivery.headers.get(SIGNATURE_HEADER, "").strip().lower().removeprefix("sha256=")


def _enabled_hook(flow: Flow | None) -> dict[str, Any] | None:
    hook = (flow.scheduling_config or {}).get("webhook") if flow is not None else None
    return dict(hook) if isinstance(hook, dict) and hook.get("enabled") is True else None
