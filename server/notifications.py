"""Change notifications for every MCP session of this process, whatever its transport.

One ``Notifications`` per process is the runtime's event sink and the engine's event receiver: abilities
and the engine announce committed changes to it, and it tells each session about the resources its
principal may read. Nothing here assumes one connection: a transport registers each session with the
principal it acts as, and sessions of different principals are served side by side.

* A handshake-era connection (stdio, or a streamable-HTTP session that sent ``initialize``) is
  ``attach``-ed on each of its requests under a key of the transport's choosing, told who it acts as
  (``acting_as``), subscribes per URI, and is ``detach``-ed when it closes. It receives
  ``resources/updated`` for its subscriptions and every ``resources/list_changed`` on its own channel,
  and is a back channel for the sampling bridge.
* A 2026-era ``subscriptions/listen`` stream is open for one principal (``listening``) and sees the bus.

``resources/updated`` is coalesced per URI (``delivery.Coalescer``) and sent from background tasks, so
a commit never waits on a client or on the visibility checks. Changes committed by other processes
reach subscribers through ``watch_other_processes`` (``change_watch``), which runs once per process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Hashable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from mcp.server.subscriptions import InMemorySubscriptionBus, SubscriptionBus
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.resources.registry import ResourceNotFound
from datamachine_mcp.server.change_watch import WATCH_SECONDS, ChangeWatch
from datamachine_mcp.server.delivery import COALESCE_SECONDS, Coalescer, PrincipalBus
from datamachine_mcp.server.sampling import SamplingBridge
from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.timeutil import utcnow

log = logging.getLogger("datamachine.server")

JOB_URI = "datamachine://jobs/"


class Reader(Protocol):
    """Reads ``uri`` as ``principal`` to decide whether it may be told of a change: a probe, so no
    denial row is written. Returns when readable; raises ResourceNotFound when nothing is there, any
    other exception when refused."""

    async def __call__(self, uri: str, principal: Principal) -> object: ...


class Channel(Protocol):
    """A handshake-era connection's own outbound stream (the SDK's ServerSession has these)."""

    async def send_resource_updated(self, uri: str) -> None: ...

    async def send_resource_list_changed(self) -> None: ...


@dataclass(eq=False)
class _Connection:
    channel: Channel  # the latest request's ServerSession (also the sampling bridge's back channel)
    reader: Reader
    principal: Principal | None = None
    uris: dict[str, datetime] = field(default_factory=dict)  # subscribed URI -> since when


@dataclass(eq=False)
class _Stream:
    """An open ``subscriptions/listen`` stream: its reader and the URIs it asked for (None: unknown)."""

    reader: Reader
    uris: frozenset[str] | None
    opened: datetime


class Notifications:
    """The process's sessions and what each is told: an ``EventSink`` (abilities) and ``EngineEvents``
    (the engine). ``sampling`` is the bridge that completes ``sampling`` AI requests through the same
    connections; it learns them here."""

    def __init__(self, *, sampling: SamplingBridge | None = None, window: float = COALESCE_SECONDS) -> None:
        self.sampling = sampling if sampling is not None else SamplingBridge()
        self.bus: SubscriptionBus = InMemorySubscriptionBus()
        self._connections: dict[Hashable, _Connection] = {}
        # Open listen streams per principal, and the (principal, uri) pairs the event being published
        # is hidden from (the bus's listeners filter synchronously).
        self._listeners: dict[Principal, list[_Stream]] = {}
        self._bus_hidden: set[tuple[Principal, str]] = set()
        # What each principal could read when last checked: a deleted resource reads as not found,
        # and is announced only to those who could read it before.
        self._seen: dict[tuple[Principal, str], bool] = {}
        self._updates = Coalescer(self._deliver_updated, window=window)

    @staticmethod
    def of(runtime: Runtime) -> Notifications:
        """The notifications a runtime was opened with (``open_runtime`` gives every runtime one)."""
        if not isinstance(runtime.events, Notifications):
            raise TypeError("this runtime has no server notifications; open it with open_runtime()")
        return runtime.events

    # --- sessions -----------------------------------------------------------------------------

    def attach(self, key: Hashable, channel: Channel, reader: Reader) -> bool:
        """A request arrived on the handshake-era connection ``key``; ``channel`` is its session.
        True the first time (the caller then arranges ``detach`` for when the connection closes)."""
        conn = self._connections.get(key)
        if conn is None:
            self._connections[key] = _Connection(channel, reader)
            return True
        conn.channel = channel
        return False

    def acting_as(self, key: Hashable, principal: Principal) -> None:
        """The connection's latest request acts as ``principal`` (resolved per request: tokens may change)."""
        conn = self._connections.get(key)
        if conn is None:
            return
        conn.principal = principal
        self.sampling.remember(key, conn.channel, principal.user_id, principal.session_id)

    def detach(self, key: Hashable) -> None:
        """The connection closed: no more notifications to it, no more sampling through it."""
        self._connections.pop(key, None)
        self.sampling.forget(key)

    async def subscribe(self, key: Hashable, uri: str) -> None:
        """Subscribe the connection to ``uri``, noting now whether its principal can read it."""
        since = utcnow()
        conn = self._connections.get(key)
        if conn is None:
            return
        if conn.principal is not None:
            await self._may_read(conn.principal, conn.reader, uri, {})
        conn.uris.setdefault(uri, since)

    def unsubscribe(self, key: Hashable, uri: str) -> None:
        conn = self._connections.get(key)
        if conn is not None:
            conn.uris.pop(uri, None)

    @asynccontextmanager
    async def listening(
        self, principal: Principal, reader: Reader, uris: Iterable[str] | None = None
    ) -> AsyncIterator[SubscriptionBus]:
        """A ``subscriptions/listen`` stream open for ``principal``: the bus as that principal sees it.
        ``uris`` are the resources it subscribed to (None when unknown: every update is published)."""
        stream = _Stream(reader, None if uris is None else frozenset(uris), utcnow())
        self._listeners.setdefault(principal, []).append(stream)
        try:
            yield PrincipalBus(self.bus, self._bus_hidden, principal)
        finally:
            streams = self._listeners[principal]
            streams.remove(stream)
            if not streams:
                del self._listeners[principal]

    def watched(self) -> dict[str, datetime]:
        """Every URI some session subscribed to, with the earliest time it was (for other processes'
        changes: only these are looked for)."""
        out: dict[str, datetime] = {}

        def note(uri: str, since: datetime) -> None:
            if uri not in out or since < out[uri]:
                out[uri] = since

        for conn in list(self._connections.values()):
            for uri, since in list(conn.uris.items()):
                note(uri, since)
        for streams in list(self._listeners.values()):
            for stream in streams:
                for uri in stream.uris or ():
                    note(uri, stream.opened)
        return out

    def subscribed_job_ids(self) -> set[int]:
        """Jobs some session subscribed to."""
        return {
            int(uri[len(JOB_URI) :])
            for uri in self.watched()
            if uri.startswith(JOB_URI) and uri[len(JOB_URI) :].isdigit()
        }

    def _wanted(self, uri: str) -> bool:
        return any(uri in conn.uris for conn in list(self._connections.values())) or any(
            s.uris is None or uri in s.uris for streams in list(self._listeners.values()) for s in streams
        )

    # --- EventSink: notifications after commit --------------------------------------------------

    async def resource_updated(self, uri: str) -> None:
        """Schedule ``resources/updated`` for ``uri`` (coalesced per URI)."""
        if self._wanted(uri):
            self._updates.push(uri)  # nobody subscribed: nothing to schedule (the engine's common case)

    async def resources_list_changed(self) -> None:
        for conn in list(self._connections.values()):
            await _best_effort(conn.channel.send_resource_list_changed())
        await self.bus.publish(ResourcesListChanged())

    # --- EngineEvents: the engine's committed changes ----------------------------------------

    async def jobs_changed(self, job_ids: Iterable[int]) -> None:
        for job_id in sorted(set(job_ids)):
            await self.resource_updated(f"{JOB_URI}{job_id}")

    async def flows_changed(self, flows: Iterable[tuple[int, int]]) -> None:
        for flow_id, pipeline_id in sorted(set(flows)):
            await self.resource_updated(f"datamachine://flows/{flow_id}")
            await self.resource_updated(f"datamachine://pipelines/{pipeline_id}")

    # --- delivery -----------------------------------------------------------------------------

    async def _deliver_updated(self, uri: str) -> None:
        seen: dict[Principal, bool] = {}
        for conn in list(self._connections.values()):
            if (
                uri in conn.uris
                and conn.principal is not None
                and await self._may_read(conn.principal, conn.reader, uri, seen)
            ):
                await _best_effort(conn.channel.send_resource_updated(uri))
        hidden = {
            (principal, uri)
            for principal, streams in list(self._listeners.items())
            if streams and not await self._may_read(principal, streams[0].reader, uri, seen)
        }
        self._bus_hidden |= hidden
        try:
            await self.bus.publish(ResourceUpdated(uri=uri))  # listeners filter synchronously
        finally:
            self._bus_hidden -= hidden

    async def _may_read(self, principal: Principal, reader: Reader, uri: str, seen: dict[Principal, bool]) -> bool:
        """Whether ``principal`` may be told that ``uri`` changed: it can read it, or could until it was
        deleted (a hidden resource reads as not found, so only what was seen before counts)."""
        if principal.is_admin and principal.agent_id is None:
            return True  # the owner and site admins read everything
        if principal in seen:
            return seen[principal]
        key = (principal, uri)
        try:
            await reader(uri, principal)
            allowed = self._seen[key] = True
        except ResourceNotFound:
            allowed = self._seen.pop(key, False)
        except Exception:
            allowed = False
        seen[principal] = allowed
        return allowed

    # --- process lifetime ---------------------------------------------------------------------

    async def watch_other_processes(
        self, db: Database, *, every: float = WATCH_SECONDS, ready: asyncio.Event | None = None
    ) -> None:
        """Announce changes other processes commit to ``db`` until cancelled (run once per process);
        ``ready`` is set once the watch has read where things stand."""
        await ChangeWatch(self, db, every=every, ready=ready).run()

    async def flush(self) -> None:
        """Wait until every scheduled notification has gone out."""
        await self._updates.flush()

    def close(self) -> None:
        """Drop scheduled notifications (the process is stopping)."""
        self._updates.close()


async def _best_effort(send: Awaitable[None]) -> None:
    """Notifications are advisory: a gone client must not fail the call that changed something."""
    try:
        await send
    except Exception:
        log.debug("notification not delivered", exc_info=True)
