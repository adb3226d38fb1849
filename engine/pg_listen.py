"""PostgreSQL LISTEN: one connection per process and database, shared by every channel it follows.

* ``datamachine_jobs`` (migration 0002): a job became pending; wakes this process's worker at once,
  so latency does not depend on the poll interval.
* ``datamachine_changes`` (migration 0005): ids of changed jobs, flows and pipelines; the server turns
  them into change notifications (docs/architecture.md, Notifications).

The connection is a dedicated asyncpg one (outside the SQLAlchemy pool), opened when the first
follower arrives and closed after the last leaves. Polling remains every follower's baseline: if the
connection drops (noticed at once when it closes, or by a periodic check when it dies silently), the
followers are told, and it is re-opened after a pause; they are told again once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from datamachine_mcp.engine.runtime import EngineServices

log = logging.getLogger("datamachine.listen")
JOBS_CHANNEL = "datamachine_jobs"
CHANGES_CHANNEL = "datamachine_changes"
CHECK_SECONDS = 30.0  # how often an idle LISTEN connection is checked
CHECK_TIMEOUT = 10.0
RETRY_SECONDS = 5.0


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _nothing() -> None:
    return None


@dataclass(eq=False)
class _Follower:
    channel: str
    on_notify: Callable[[str], None]  # the payload; called on the event loop, must not block
    on_connect: Callable[[], None]  # listening (again): catch up on what may have been missed
    on_lost: Callable[[], None]  # not listening any more: poll until told otherwise


class Listener:
    """The process's LISTEN connection to one database."""

    def __init__(self, dsn: str, on_idle: Callable[[Listener], None]) -> None:
        self._dsn = dsn
        self._on_idle = on_idle
        self._followers: list[_Follower] = []
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def follow(
        self,
        channel: str,
        on_notify: Callable[[str], None],
        *,
        on_connect: Callable[[], None] = _nothing,
        on_lost: Callable[[], None] = _nothing,
    ) -> AsyncIterator[None]:
        """Receive ``channel``'s notifications while inside the block."""
        follower = _Follower(channel, on_notify, on_connect, on_lost)
        await self._add(follower)
        try:
            yield
        finally:
            # shielded: leaving is usually a cancellation, and the last follower must close the connection
            await asyncio.shield(self._remove(follower))

    async def _add(self, follower: _Follower) -> None:
        async with self._lock:
            fresh = all(f.channel != follower.channel for f in self._followers)
            self._followers.append(follower)
            if self._conn is not None:
                try:
                    if fresh:
                        await self._conn.add_listener(follower.channel, self._dispatch)
                    follower.on_connect()
                except Exception:  # the connection is going away; the run loop re-listens
                    log.debug("LISTEN %s on the open connection failed", follower.channel, exc_info=True)
            if self._task is None:
                self._stop = asyncio.Event()
                self._task = asyncio.create_task(self._run(self._stop), name="pg listen")

    async def _remove(self, follower: _Follower) -> None:
        task = None
        async with self._lock:
            self._followers.remove(follower)
            if self._conn is not None and all(f.channel != follower.channel for f in self._followers):
                with contextlib.suppress(Exception):
                    await self._conn.remove_listener(follower.channel, self._dispatch)
            if not self._followers:
                self._stop.set()
                task, self._task = self._task, None
                self._on_idle(self)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for follower in list(self._followers):
            if follower.channel == channel:
                try:
                    follower.on_notify(payload)
                except Exception:
                    log.exception("handling a %s notification failed", channel)

    async def _run(self, stop: asyncio.Event) -> None:
        import asyncpg

        while not stop.is_set():
            conn = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn)
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                async with self._lock:
                    if stop.is_set():
                        break
                    for channel in {f.channel for f in self._followers}:
                        await conn.add_listener(channel, self._dispatch)
                    self._conn = conn
                    followers = list(self._followers)
                for follower in followers:
                    follower.on_connect()
                while not stop.is_set():
                    await _wait_any(stop, lost, CHECK_SECONDS)
                    if lost.is_set():
                        raise ConnectionError("the LISTEN connection was closed")
                    if not stop.is_set():
                        # a connection that died silently (no FIN) is only noticed by using it
                        await asyncio.wait_for(conn.execute("SELECT 1"), CHECK_TIMEOUT)
            except Exception as exc:
                self._lost(conn)
                channels = ", ".join(sorted({f.channel for f in self._followers}))
                log.warning("LISTEN %s failed (%s); polling only, retrying in 5 s", channels, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_SECONDS)
            finally:
                self._lost(conn)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)

    def _lost(self, conn: Any) -> None:
        if conn is None or self._conn is not conn:
            return
        self._conn = None
        for follower in list(self._followers):
            follower.on_lost()


_shared: dict[tuple[int, str], Listener] = {}


def shared_listener(url: str) -> Listener:
    """This process's (this event loop's) LISTEN connection to the database at ``url``."""
    key = (id(asyncio.get_running_loop()), asyncpg_dsn(url))
    listener = _shared.get(key)
    if listener is None:
        listener = _shared[key] = Listener(key[1], on_idle=lambda done: _forget(key, done))
    return listener


def _forget(key: tuple[int, str], listener: Listener) -> None:
    if _shared.get(key) is listener:
        del _shared[key]


async def listen_for_jobs(services: EngineServices, stop: asyncio.Event) -> None:
    """Wake the worker whenever a job becomes pending in any process, until ``stop`` is set."""
    listener = shared_listener(services.db.url)
    async with listener.follow(JOBS_CHANNEL, lambda _payload: services.wake(), on_connect=services.wake):
        await stop.wait()


async def _wait_any(stop: asyncio.Event, lost: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(lost.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiters:
            task.cancel()
