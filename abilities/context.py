"""What an ability handler gets: the process runtime and the per-call context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.crypto import SecretBox
from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.settings import SettingsStore
from datamachine_mcp.storage.settings_schema import Snapshot

# A Runtime is opened before the first tool list is answered, which needs no database layer: what
# loads SQLAlchemy (the access checks, log rows) is imported where a call uses it.
if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.sql.base import Executable

    from datamachine_mcp.abilities.access import Access
    from datamachine_mcp.abilities.catalog import Catalog
    from datamachine_mcp.abilities.registry import Ability
    from datamachine_mcp.storage.reads import Reads, Rows


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

    @cached_property
    def catalog(self) -> Catalog:
        """Every declared ability, listed from the tool cache in the data directory: reading what is
        declared (tool lists, whoami) imports no ability module."""
        from datamachine_mcp.abilities.tool_cache import catalog

        return catalog(self.data_dir / "cache", self.version)


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
    # A read-only call's transaction opens on first use (``close()`` ends it): an ORM session when the
    # handler asks for ``session``, or a light read when it only runs Core statements through ``read``.
    lazy: bool = False
    _events: list[tuple[str, str | None]] = field(default_factory=list)
    _access: Access | None = field(default=None, init=False)
    _access_of: AsyncSession | None = field(default=None, init=False)
    _reads: AbstractAsyncContextManager[Reads] | None = field(default=None, init=False)
    _reader: Reads | None = field(default=None, init=False)

    @property
    def session(self) -> AsyncSession:
        """The call's transaction (for manual abilities: the one opened by ``transaction()``/``reading()``)."""
        if self._session is None:
            if not self.lazy:
                raise RuntimeError(f"{self.ability.slug}: no transaction is open")
            self._session = self.runtime.db.read_session()
        return self._session

    @property
    def db(self) -> Database:
        return self.runtime.db

    async def read(self, statement: Executable, params: Mapping[str, Any] | None = None) -> Rows:
        """Run a Core SELECT in this call's transaction: its session if one is open, else (a read-only
        call) a light read without the ORM (prebuilt statements: storage/reads.py). Consume the rows
        at once."""
        if self._session is not None or not self.lazy:
            return await self.session.execute(statement, params)
        if self._reader is None:
            self._reads = self.runtime.db.reads()
            self._reader = await self._reads.__aenter__()
        return await self._reader.execute(statement, params)

    async def close(self) -> None:
        """End a read-only call's transaction (whatever it opened)."""
        reads, self._reads, self._reader = self._reads, None, None
        try:
            if reads is not None:
                await reads.__aexit__(None, None, None)
        finally:
            if self.lazy and self._session is not None:
                session, self._session = self._session, None
                await session.close()

    @property
    def access(self) -> Access:
        # Roles are cached per transaction: a manual ability's next transaction asks again.
        if self._access is None or (self._access_of is not None and self._access_of is not self._session):
            from datamachine_mcp.abilities.access import Access

            self._access = Access(self.principal, self.read)
            self._access_of = self._session
        return self._access

    async def settings(self, *, access: bool = False) -> Snapshot:
        """The settings; ``access=True`` for a decision on who may do what (those keys read current)."""
        cached = None if access else self.runtime.settings.cached()  # fresh: a read-only call opens no session
        return cached if cached is not None else await self.runtime.settings.snapshot(self.session, access=access)

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
        from datamachine_mcp.storage.logs import write_log

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
        from datamachine_mcp.storage.logs import write_log

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
