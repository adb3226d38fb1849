"""PostgreSQL LISTEN for new-job wake-ups (engine.md §14.3): latency independent of the poll interval.

A dedicated asyncpg connection (outside the SQLAlchemy pool) listens on ``datamachine_jobs``, which a
trigger notifies whenever a job becomes pending; each notification wakes this process's worker.
Polling remains the baseline: if the connection drops, it is re-opened after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from engine.runtime import EngineServices

log = logging.getLogger("datamachine.listen")
CHANNEL = "datamachine_jobs"


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def listen_for_jobs(services: EngineServices, stop: asyncio.Event) -> None:
    import asyncpg

    dsn = asyncpg_dsn(services.db.url)

    def on_notify(*_args: Any) -> None:
        services.wake()

    while not stop.is_set():
        conn = None
        try:
            conn = await asyncpg.connect(dsn)
            await conn.add_listener(CHANNEL, on_notify)
            services.wake()  # anything created while we were not listening
            await stop.wait()
        except Exception as exc:
            log.warning("LISTEN %s failed (%s); polling only, retrying in 5 s", CHANNEL, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
