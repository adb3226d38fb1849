"""PostgreSQL LISTEN for new-job wake-ups (engine.md §14.3): latency independent of the poll interval.

A dedicated asyncpg connection (outside the SQLAlchemy pool) listens on ``datamachine_jobs``, which a
trigger notifies whenever a job becomes pending; each notification wakes this process's worker.
Polling remains the baseline: if the connection drops (noticed at once when it closes, or by a periodic\ncheck when it dies silently), it is re-opened after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from datamachine_mcp.engine.runtime import EngineServices

log = logging.getLogger("datamachine.listen")
CHANNEL = "datamachine_jobs"
CHECK_SECONDS = 30.0  # how often an idle LISTEN connection is checked
CHECK_TIMEOUT = 10.0
RETRY_SECONDS = 5.0


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def listen_for_jobs(services: EngineServices, stop: asyncio.Event) -> None:
    import asyncpg

    dsn = asyncpg_dsn(services.db.url)

    def on_notify(*_args: Any) -> None:
        services.wake()

    while not stop.is_set():
        conn = None
        lost = asyncio.Event()
        try:
            conn = await asyncpg.connect(dsn)
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            await conn.add_listener(CHANNEL, on_notify)
            services.wake()  # anything created while we were not listening
            while not stop.is_set():
                await _wait_any(stop, lost, CHECK_SECONDS)
                if lost.is_set():
                    raise ConnectionError("the LISTEN connection was closed")
                if not stop.is_set():
                    # a connection that died silently (no FIN) is only noticed by using it
                    await asyncio.wait_for(conn.execute("SELECT 1"), CHECK_TIMEOUT)
        except Exception as exc:
            log.warning("LISTEN %s failed (%s); polling only, retrying in 5 s", CHANNEL, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_SECONDS)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)


async def _wait_any(stop: asyncio.Event, lost: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(lost.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiters:
            task.cancel()
