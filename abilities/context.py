"""What an ability handler gets: the process runtime and the per-call context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.abilities.access import Access, Principal
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.crypto import SecretBox
from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.settings import SettingsStore, Snapshot

if TYPE_CHECKING:
    from datamachine_mcp.abilities.registry import Ability


class EventSink(Protocol):
    """Where committed changes are announced (the server implements it; docs/architecture.md, Notifications)."""

    async def resource_updated(self, uri: str) -> None: ...

    async def resources_list_changed(self) -> None: ...


class NullEvents:
    async def resource_updated(self, uri: str) -> None:
        return None

    async def resources_list_changed(self) -> None:
        return None


ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]


@dataclass
class Runtime:
    """Process-wide services shared by every call."""

    db: Database
    settings: SettingsStore
    box: SecretBox
    data_dir: Path
    version: str
    toolsets: frozenset[str] | None = None  # the tools listed (abilities/toolsets.py); None = all
    tools: frozenset[str] = frozenset()
    read_only: bool = False
    public_base_url: str | None = None
    # Given at construction: the serving process's notifications (a NullEvents without MCP clients).
    events: EventSink = field(default_factory=NullEvents)
    # The engine's services (wake-ups, waits, the sampling bridge); None where no engine is attached.
    engine: EngineServices | None = None


@dataclass
class AbilityContext:
    """Per-call context: the principal, the call's transaction and its audit trail."""

    runtime: Runtime
    ability: Ability
    principal: Principal
    _session: AsyncSession | None
    request_id: str | None = None
    progress: ProgressFn | None = None
    client: Any = None
    audited: bool = False
    _events: list[tuple[str, str | None]] = field(default_factory=list)
    _access: Access | None = field(default=None, init=False)

    @property
    def session(self) -> AsyncSession:
        """The call's transaction (for manual abilities: the one opened by ``transaction()``/``reading()``)."""
        if self._session is None:
            raise RuntimeError(f"{self.ability.slug}: no transaction is open")
        return self._session

    @property
    def db(self) -> Database:
        return self.runtime.db

    @property
    def access(self) -> Access:
        if self._access is None or self._access.session is not self.session:
            self._access = Access(self.principal, self.session)
        return self._access

    async def settings(self, *, access: bool = False) -> Snapshot:
        """The settings; ``access=True`` for a decision on who may do what (those keys read current)."""
        return await self.runtime.settings.snapshot(self.session, access=access)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A short write transaction bound to this context (for ``transaction="manual"`` abilities)."""
        previous = self._session
        async with self.runtime.db.write() as session:
            self._session = session
            try:
                yield session
            finally:
                self._session = previous

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A short read transaction bound to this context."""
        previous = self._session
        async with self.runtime.db.read() as session:
            self._session = session
            try:
                yield session
            finally:
                self._session = previous

    async def audit(
        self,
        summary: str,
        *,
        target: tuple[str, Any] | None = None,
        changes: list[str] | None = None,
        agent_id: int | None = None,
        job_id: int | None = None,
        flow_id: int | None = None,
        pipeline_id: int | None = None,
        **extra: Any,
    ) -> None:
        """Write this call's audit row in its transaction (docs/access.md, Audit). Exactly once per call."""
        if self.audited:
            raise RuntimeError(f"{self.ability.slug} wrote a second audit row")
        self.audited = True
        context: dict[str, Any] = {"audit": True, "ability": self.ability.slug, **self.principal.actor()}
        if target is not None:
            context["target"] = {"type": target[0], "id": target[1]}
        if changes is not None:
            context["changes"] = changes
        for key, value in (("job_id", job_id), ("flow_id", flow_id), ("pipeline_id", pipeline_id)):
            if value is not None:
                context[key] = value
        if self.request_id is not None:
            context["request_id"] = self.request_id
        if self.principal.session_id is not None:
            context["session_id"] = self.principal.session_id
        context.update(extra)
        await write_log(
            self.session,
            "info",
            f"{self.ability.slug}: {summary}",
            context,
            agent_id=agent_id if agent_id is not None else self.principal.agent_id,
            user_id=self.principal.user_id,
            audit=True,
        )

    async def log(self, level: str, message: str, context: dict[str, Any] | None = None, **owner: Any) -> None:
        """A non-audit log row, subject to the ``log_level`` threshold."""
        snap = await self.settings()
        await write_log(self.session, level, message, context, threshold=snap["log_level"], **owner)

    def notify_updated(self, uri: str) -> None:
        """Announce ``uri`` as updated once this call commits."""
        self._events.append(("updated", uri))

    def notify_list_changed(self) -> None:
        self._events.append(("list_changed", None))

    async def flush_events(self) -> None:
        sink = self.runtime.events
        seen: set[tuple[str, str | None]] = set()
        for event in self._events:
            if event in seen:
                continue
            seen.add(event)
            if event[0] == "updated" and event[1] is not None:
                await sink.resource_updated(event[1])
            else:
                await sink.resources_list_changed()
        self._events.clear()
