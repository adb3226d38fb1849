"""What the engine needs from its process: database, settings, secrets, events, identity."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.storage.crypto import SecretBox
from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.settings import SettingsStore
from datamachine_mcp.storage.settings_schema import Snapshot

if TYPE_CHECKING:
    from datamachine_mcp.engine.providers.base import AIRequest, AIResponse
    from datamachine_mcp.engine.store import JobStore


class EngineEvents(Protocol):
    """Receiver of committed engine changes (the server turns them into MCP notifications)."""

    async def jobs_changed(self, job_ids: Iterable[int]) -> None: ...

    async def flows_changed(self, flows: Iterable[tuple[int, int]]) -> None: ...


class NullEngineEvents:
    async def jobs_changed(self, job_ids: Iterable[int]) -> None:
        return None

    async def flows_changed(self, flows: Iterable[tuple[int, int]]) -> None:
        return None


class Sampler(Protocol):
    """The ``sampling`` AI provider: a completion by a connected MCP client's model (the server's
    bridge). ``session`` is the calling request's own session (a chat message); otherwise the job's
    origin session is tried, then the user's other sessions. Failures are StepErrors."""

    async def complete(
        self,
        request: AIRequest,
        *,
        origin_session_id: str | None = None,
        user_id: int | None = None,
        session: Any = None,
        related_request_id: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request limit passed on to the client)
    ) -> AIResponse: ...


class NoSampler:
    """A process that serves no MCP client (a worker): sampling is unavailable, a retryable failure."""

    async def complete(
        self,
        request: AIRequest,
        *,
        origin_session_id: str | None = None,
        user_id: int | None = None,
        session: Any = None,
        related_request_id: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AIResponse:
        raise StepError(
            "sampling_unavailable", "No MCP client with sampling is connected to this process.", retryable=True
        )


def make_worker_id() -> str:
    """``{hostname}:{pid}:{8 hex}``: readable in lease columns and logs, unique per process."""
    return f"{socket.gethostname()[:70]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class EngineServices:
    db: Database
    settings: SettingsStore
    box: SecretBox
    data_dir: Path
    version: str
    # Given at construction by the process that serves MCP clients (its notifications and sampling
    # bridge); a worker process keeps the null ones.
    events: EngineEvents = field(default_factory=NullEngineEvents)
    worker_id: str = field(default_factory=make_worker_id)
    public_base_url: str | None = None
    sampling: Sampler = field(default_factory=NoSampler)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _ai_limiter: asyncio.Semaphore | None = None
    _ai_limit: int = 0
    _local_waiters: dict[int, list[asyncio.Event]] = field(default_factory=dict)
    _store: Any = None

    @property
    def store(self) -> JobStore:
        """The job store on this process's database (opened on first use, closed with the database)."""
        if self._store is None:
            from datamachine_mcp.engine.store import JobStore

            self._store = JobStore(self.db)
        return self._store

    async def snapshot(self) -> Snapshot:
        cached = self.settings.cached()
        if cached is not None:
            return cached
        async with self.db.read() as session:
            return await self.settings.snapshot(session)

    def wake(self) -> None:
        """A job became claimable in this process: start it without waiting for the next poll."""
        self._wake.set()

    async def wait_for_wake(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    def ai_limiter(self, size: int) -> asyncio.Semaphore:
        """The per-process cap on AI provider requests in flight (ai_max_concurrent_requests)."""
        if self._ai_limiter is None or self._ai_limit != size:
            self._ai_limiter = asyncio.Semaphore(size)
            self._ai_limit = size
        return self._ai_limiter

    def job_waiter(self, job_id: int) -> asyncio.Event:
        """An event set when this process changes ``job_id`` (waits also poll, for other processes)."""
        event = asyncio.Event()
        self._local_waiters.setdefault(job_id, []).append(event)
        return event

    def drop_waiter(self, job_id: int, event: asyncio.Event) -> None:
        waiters = self._local_waiters.get(job_id)
        if waiters and event in waiters:
            waiters.remove(event)
            if not waiters:
                del self._local_waiters[job_id]

    async def announce(self, jobs: Iterable[int] = (), flows: Iterable[tuple[int, int]] = ()) -> None:
        job_ids = set(jobs)
        for job_id in job_ids:
            for event in self._local_waiters.get(job_id, []):
                event.set()
        if job_ids:
            await self.events.jobs_changed(job_ids)
        flow_set = set(flows)
        if flow_set:
            await self.events.flows_changed(flow_set)
