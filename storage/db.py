"""Engines, sessions and dialect details (docs/storage.md: Transactions, SQLite, PostgreSQL).

Every unit of work is one transaction: ``Database.write()`` for changes, ``Database.read()`` for
reads. On SQLite a write transaction starts with ``BEGIN IMMEDIATE`` so the write lock is taken
up front (a deferred transaction that reads and then writes can fail with ``SQLITE_BUSY`` in a way
``busy_timeout`` cannot resolve); reads use a separate engine with plain ``BEGIN``.

SQLite statements run inline on the event loop (``storage.sqlite_driver``). So that nothing blocks
the loop while waiting for a lock, writers in this process take an asyncio lock first, and
``BEGIN IMMEDIATE`` against another process's write lock is retried with asynchronous sleeps for up
to the busy timeout instead of letting SQLite's ``busy_timeout`` block the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

# SQLAlchemy is imported when the engines are first used: a process that only lists tools never loads
# it (the start-up schema check reads the raw driver, see storage.migrate).
if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
    from sqlalchemy.sql import Select

    from datamachine_mcp.storage.reads import Reads

log = logging.getLogger(__name__)

DEFAULT_BUSY_TIMEOUT_MS = 5000


def normalize_url(path_or_url: str) -> str:
    """A path means SQLite; ``postgresql://`` and ``sqlite://`` URLs get their async drivers."""
    value = path_or_url.strip()
    if value == ":memory:":
        return "sqlite+dminline:///:memory:"
    if "://" not in value:
        path = Path(value).expanduser().resolve()
        return f"sqlite+dminline:///{path}"
    scheme, rest = value.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if scheme in ("sqlite", "sqlite+aiosqlite", "sqlite+pysqlite"):
        return f"sqlite+dminline://{rest}"
    return value


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other backends and ``:memory:``)."""
    if not url.startswith("sqlite") or url.endswith(":memory:"):
        return None
    return Path(url.split(":///", 1)[1])


READ_BUSY_TIMEOUT_MS = 100  # WAL readers rarely wait; bound the rare wait that blocks the loop

# Planner statistics (Database.analyze): the tables that grow, sampled so ANALYZE takes milliseconds.
ANALYZED_TABLES = ("datamachine_processed_items", "datamachine_jobs", "datamachine_logs", "datamachine_flows")
ANALYSIS_LIMIT = 1000
# SQLite keeps no statistics for a smaller table: its defaults assume a large table, which stays right
# as the table grows, while statistics taken when it was small make it scan once it is large.
SQLITE_MIN_ANALYZED_ROWS = 10_000


def _install_sqlite_hooks(engine: AsyncEngine, *, write: bool, busy_timeout_ms: int) -> None:
    from sqlalchemy import event
    from sqlalchemy.util.concurrency import await_

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from the driver so BEGIN can be IMMEDIATE.
        dbapi_connection.isolation_level = None
        configure_sqlite(dbapi_connection.driver_connection, write=write)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
        if not write:
            raw.execute("BEGIN")
            return
        deadline = time.monotonic() + busy_timeout_ms / 1000
        delay = 0.001
        while not try_begin_immediate(raw, deadline):
            # Another process holds the write lock: wait without blocking the event loop.
            await_(asyncio.sleep(delay))
            delay = min(delay * 2, 0.05)


def try_begin_immediate(raw: sqlite3.Connection, deadline: float) -> bool:
    """``BEGIN IMMEDIATE``; False while another process holds the write lock (until ``deadline``)."""
    try:
        raw.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as exc:
        message = str(exc).lower()
        if ("locked" not in message and "busy" not in message) or time.monotonic() > deadline:
            raise
    return False


async def begin_immediate(raw: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """``BEGIN IMMEDIATE`` from plain async code, waiting for other processes with asynchronous sleeps."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.001
    while not try_begin_immediate(raw, deadline):
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def configure_sqlite(raw: sqlite3.Connection, *, write: bool) -> None:
    """The pragmas of every connection (writers never sleep inside SQLite; readers briefly)."""
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA foreign_keys=ON")
    raw.execute(f"PRAGMA busy_timeout={0 if write else READ_BUSY_TIMEOUT_MS}")
    raw.execute("PRAGMA synchronous=NORMAL")
    raw.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")


class Database:
    """One database (SQLite file or PostgreSQL), with write and read sessions; its engines are created
    on first use."""

    def __init__(
        self,
        path_or_url: str,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        pool_size: int = 10,
    ) -> None:
        self.url = normalize_url(path_or_url)
        self.dialect = "postgresql" if self.url.startswith("postgresql") else "sqlite"
        self.path = sqlite_path(self.url)
        if self.dialect == "sqlite" and self.path is not None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.busy_timeout_ms = busy_timeout_ms
        self.pool_size = pool_size
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.light_connections: list[sqlite3.Connection] = []  # idle connections of ``reads()`` (SQLite)

    @cached_property
    def _engines(self) -> tuple[AsyncEngine, AsyncEngine]:
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.pool import StaticPool

        import datamachine_mcp.storage.sqlite_driver  # noqa: F401 - registers the sqlite+dminline dialect

        if self.dialect != "sqlite":
            pooled = create_async_engine(
                self.url, pool_size=self.pool_size, max_overflow=self.pool_size, pool_pre_ping=True
            )
            return pooled, pooled
        memory = self.path is None
        kwargs: dict[str, Any] = {"poolclass": StaticPool} if memory else {}
        write_engine = create_async_engine(self.url, **kwargs)
        _install_sqlite_hooks(write_engine, write=True, busy_timeout_ms=self.busy_timeout_ms)
        if memory:  # one shared connection: reads go through the write engine
            return write_engine, write_engine
        read_engine = create_async_engine(self.url)
        _install_sqlite_hooks(read_engine, write=False, busy_timeout_ms=self.busy_timeout_ms)
        return write_engine, read_engine

    @property
    def write_engine(self) -> AsyncEngine:
        return self._engines[0]

    @property
    def read_engine(self) -> AsyncEngine:
        return self._engines[1]

    @cached_property
    def _writer(self) -> async_sessionmaker[AsyncSession]:
        from sqlalchemy.ext.asyncio import async_sessionmaker

        return async_sessionmaker(self.write_engine, expire_on_commit=False, autoflush=True)

    @cached_property
    def _reader(self) -> async_sessionmaker[AsyncSession]:
        from sqlalchemy.ext.asyncio import async_sessionmaker

        return async_sessionmaker(self.read_engine, expire_on_commit=False, autoflush=True)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def write_lock(self) -> asyncio.Lock | None:
        """The lock every writer of this process holds for its SQLite transaction (None on PostgreSQL)."""
        return self._write_lock

    def on_dispose(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer`` when the database is disposed (connections opened beside the engines)."""
        self._closers.append(closer)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: commits when the block ends, rolls back on any exception."""
        if self._write_lock is None:
            async with self._writer() as session, session.begin():
                yield session
            return
        async with self._write_lock, self._writer() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only transaction (rolled back at the end; nothing it does is kept)."""
        # Closing (not rolling back) keeps loaded rows readable after the block; the pool's
        # reset-on-return rolls the connection back.
        async with self._reader() as session:
            yield session

    def read_session(self) -> AsyncSession:
        """A read session not yet begun (it begins at its first statement); the caller closes it."""
        return self._reader()

    def reads(self) -> contextlib.AbstractAsyncContextManager[Reads]:
        """A light read transaction: prebuilt Core SELECTs without an ORM session (``storage.reads``)."""
        from datamachine_mcp.storage.reads import open_reads

        return open_reads(self)

    def for_update(self, stmt: Select[Any], *, skip_locked: bool = False) -> Select[Any]:
        """Lock the selected rows for a read-modify-write of a JSON column or a job row.

        SQLite's ``BEGIN IMMEDIATE`` already holds the database write lock; PostgreSQL takes
        row locks. ``skip_locked`` leaves rows another transaction holds to it (sweeps that several
        processes run at once, which must neither wait on each other nor act twice).
        """
        return stmt.with_for_update(skip_locked=skip_locked) if self.dialect == "postgresql" else stmt

    async def analyze(self) -> None:
        """Refresh the planner's statistics of the growing tables (after migrations, daily with retention).

        The hot dedup queries are shaped not to depend on them; other queries choose better with them.
        PostgreSQL's autovacuum gathers them as well.
        """
        from sqlalchemy import text

        for table in ANALYZED_TABLES:  # one short transaction per table: its lock is not held for the rest
            async with self.write() as session:
                if self.is_sqlite:
                    rows = (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar() or 0
                    if rows < SQLITE_MIN_ANALYZED_ROWS:
                        continue
                await session.execute(text(f"ANALYZE {table}"))

    async def dispose(self) -> None:
        closers, self._closers = self._closers, []
        for closer in closers:
            await closer()
        while self.light_connections:
            self.light_connections.pop().close()
        if "_engines" not in self.__dict__:
            return  # never used: no engine to close
        write_engine, read_engine = self._engines
        await write_engine.dispose()
        if read_engine is not write_engine:
            await read_engine.dispose()

    def describe(self) -> str:
        if self.path is not None:
            return f"sqlite:{self.path}"
        return self.url.split("@")[-1] if self.dialect == "postgresql" else self.url


# PostgreSQL's "try again" errors: a deadlock the server broke, a serialization failure.
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})


def is_transient_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a concurrency conflict that the same work, run again, gets past."""
    orig = getattr(exc, "orig", None)
    for err in (exc, orig, getattr(orig, "__cause__", None)):
        if getattr(err, "sqlstate", None) in _TRANSIENT_SQLSTATES:
            return True
        if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
            return True
    return False


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "datamachine-mcp"


def default_db_path() -> Path:
    return default_data_dir() / "datamachine.db"
