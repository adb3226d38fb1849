"""Delivering ``resources/updated``: after the commit, coalesced, to readers only.

A batch of 500 jobs changes the same parent URI hundreds of times a second; a subscriber gets the
first change at once and then at most one notification per URI every 250 ms (the changes in
between fold into it). Sends run in background tasks, so the engine's commit path never waits on
a slow client or on the visibility check. See docs/architecture.md, Notifications.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.subscriptions import SubscriptionBus
from mcp.shared.subscriptions import ResourceUpdated, ServerEvent

log = logging.getLogger("datamachine.server")

COALESCE_SECONDS = 0.25
_FORGET_AFTER = 10_000  # remembered send times kept before old ones are pruned


class Coalescer:
    """At most one send per key per window: the first change goes out at once, the ones that follow
    within the window become one send at the window's end."""

    def __init__(self, send: Callable[[str], Awaitable[None]], *, window: float = COALESCE_SECONDS) -> None:
        self._send = send
        self._window = window
        self._last: dict[str, float] = {}
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def push(self, key: str) -> None:
        """Schedule a send for ``key`` (a no-op when one is already scheduled: it will carry this change)."""
        if key in self._pending:
            return
        self._pending.add(key)
        now = asyncio.get_running_loop().time()
        delay = max(0.0, self._last.get(key, now - self._window) + self._window - now)
        task = asyncio.create_task(self._fire(key, delay), name=f"notify {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fire(self, key: str, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        loop = asyncio.get_running_loop()
        # taken off pending before sending: a change committed during the send schedules the next one
        self._pending.discard(key)
        self._last[key] = loop.time()
        if len(self._last) > _FORGET_AFTER:
            cutoff = loop.time() - self._window
            self._last = {k: t for k, t in self._last.items() if t >= cutoff}
        try:
            await self._send(key)
        except Exception:
            log.debug("notification for %s not delivered", key, exc_info=True)

    async def flush(self) -> None:
        """Wait until every scheduled send has gone out (shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class PrincipalBus:
    """The server's bus as one listen stream sees it: updates its principal may not read are dropped.

    ``hidden`` holds the ``(principal, uri)`` pairs the publisher found unreadable for the event it is
    publishing (the check needs the database, the bus's listeners are synchronous).
    """

    def __init__(self, bus: SubscriptionBus, hidden: set[tuple[Any, str]], principal: Any) -> None:
        self._bus = bus
        self._hidden = hidden
        self._principal = principal

    async def publish(self, event: ServerEvent) -> None:
        await self._bus.publish(event)

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        def filtered(event: ServerEvent) -> None:
            if isinstance(event, ResourceUpdated) and (self._principal, event.uri) in self._hidden:
                return
            listener(event)

        return self._bus.subscribe(filtered)
