"""Running the engine inside a process: the worker, the scheduler and the maintenance loop.

The stdio server runs one host in-process (unless ``--no-worker``); ``datamachine-mcp worker`` runs
hosts without an MCP transport. Every loop is safe in several processes on one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from datamachine_mcp.engine import retention
from datamachine_mcp.engine.maintenance import tick
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.engine.scheduler import Scheduler
from datamachine_mcp.engine.worker import DEFAULT_CONCURRENCY, Worker
from datamachine_mcp.storage.db import is_transient_conflict
from datamachine_mcp.storage.timeutil import utcnow

log = logging.getLogger("datamachine.engine")


class EngineHost:
    def __init__(
        self, services: EngineServices, *, concurrency: int = DEFAULT_CONCURRENCY, poll_seconds: float = 1.0
    ) -> None:
        self.services = services
        self.worker = Worker(services, concurrency=concurrency, poll_seconds=poll_seconds)
        self.scheduler = Scheduler(services)
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.worker.run(), name="worker"),
            asyncio.create_task(self.scheduler.run(), name="scheduler"),
            asyncio.create_task(self._maintenance(), name="maintenance"),
        ]
        if self.services.db.dialect == "postgresql":
            from datamachine_mcp.engine.pg_listen import listen_for_jobs

            self._tasks.append(asyncio.create_task(listen_for_jobs(self.services, self._stop), name="listen"))

    async def _maintenance(self) -> None:
        while not self._stop.is_set():
            try:
                snap = await self.services.snapshot()
                interval = snap.int("maintenance_interval_seconds")
                await tick(self.services)
                if await retention.claim_due(self.services, utcnow()):
                    await retention.run_retention(self.services)
            except Exception as exc:
                if is_transient_conflict(exc):  # another process's sweep or commit crossed this one
                    log.warning("maintenance pass met a concurrent change; trying again shortly")
                    interval = 1
                else:
                    log.exception("maintenance pass failed; trying again next interval")
                    interval = 30
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, hand running jobs back, end the loops (bounded by ``grace`` seconds)."""
        self._stop.set()
        self.worker.stop()
        self.scheduler.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
