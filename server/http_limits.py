"""Per-token rate limiting of HTTP clients (docs/access.md, HTTP rate limits).

A token bucket per token: capacity = the limit, refilled at limit / 60 per second. The limit is the
token's own ``rate_limit_per_minute`` or the setting ``http_rate_limit_per_minute`` (0 = unlimited).
Only calls that do work are counted (``tools/call``, ``resources/read``, ``prompts/get``); listing,
``initialize``, ``ping`` and notifications are free. A refused call runs nothing and writes nothing of
its own: one warning row per token a minute records that limiting happened, with the count. Buckets
live in this process's memory (several HTTP processes each apply the limit).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.abilities.runner import refusal
from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.server.errors import request_error, tool_error
from datamachine_mcp.server.http_auth import PRINCIPAL_KEY
from datamachine_mcp.storage.logs import LogThrottle, write_log

log = logging.getLogger("datamachine.http")

COUNTED = frozenset({"tools/call", "resources/read", "prompts/get"})
WINDOW_SECONDS = 60


class TokenBuckets:
    """One bucket per key: ``take`` spends a call, or says how many whole seconds until one is back."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # key -> (calls left, when counted)

    def take(self, key: int, limit: int) -> int | None:
        now = self.clock()
        rate = limit / WINDOW_SECONDS
        left, at = self._buckets.get(key, (float(limit), now))
        left = min(float(limit), left + (now - at) * rate)
        if left >= 1:
            self._buckets[key] = (left - 1, now)
            return None
        self._buckets[key] = (left, now)
        return max(1, math.ceil((1 - left) / rate))


class RateLimit:
    """The SDK server middleware that refuses counted calls over the token's limit, before any handler."""

    def __init__(self, runtime: Runtime, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.clock = clock
        self.buckets = TokenBuckets(clock)
        self._rows = LogThrottle(WINDOW_SECONDS)

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        request = ctx.request
        principal = getattr(request, "scope", {}).get(PRINCIPAL_KEY) if request is not None else None
        if ctx.method not in COUNTED or not isinstance(principal, Principal) or principal.token_id is None:
            return await call_next(ctx)
        limit = principal.rate_limit_per_minute
        if limit is None:
            limit = (await self._settings())["http_rate_limit_per_minute"]
        wait = self.buckets.take(principal.token_id, int(limit)) if limit else None
        if wait is None:
            return await call_next(ctx)
        await self._note(principal, int(limit))
        err = CodedError(
            "rate_limited",
            f"rate limit of {limit} calls per minute exceeded; retry in {wait} s",
            retry_after=wait,
            limit=limit,
            window_seconds=WINDOW_SECONDS,
        )
        if ctx.method == "tools/call":
            return tool_error(refusal(err))
        uri = (ctx.params or {}).get("uri")
        raise request_error(err, uri=str(uri) if uri is not None else None)

    async def _settings(self) -> Any:
        cached = self.runtime.settings.cached()
        if cached is not None:
            return cached
        async with self.runtime.db.read() as session:
            return await self.runtime.settings.snapshot(session)

    async def _note(self, principal: Principal, limit: int) -> None:
        count = self._rows.due(principal.token_id, self.clock())
        if count is None:
            return
        message = f"token {principal.token_id} rate limited ({limit} calls per minute): {count} call(s) refused"
        try:
            async with self.runtime.db.write() as session:
                await write_log(
                    session,
                    "warning",
                    message,
                    {"token_id": principal.token_id, "count": count, "limit": limit, "transport": "http"},
                    agent_id=principal.agent_id,
                    user_id=principal.user_id,
                )
        except Exception:  # the refusal is answered even when its log row cannot be written
            log.warning("%s (log row not written)", message, exc_info=True)
