"""SQLite for the async engine, with statements executed inline on the event-loop thread.

aiosqlite sends every cursor operation to a helper thread and back (four round trips per statement,
about 80 µs each here), which dominated every tool call and capped engine throughput. SQLite
statements on a local file take microseconds, so this dialect runs the standard ``sqlite3`` driver
directly inside SQLAlchemy's async machinery. What could block the loop is lock waiting, so
``storage.db`` serialises writers per process with an asyncio lock and waits for other processes'
write locks with asynchronous retries instead of ``busy_timeout`` (see ``Database``).
"""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Generator, Iterator, Sequence
from typing import Any

from sqlalchemy import pool
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import AdaptedConnection
from sqlalchemy.engine.url import URL
from sqlalchemy.util.concurrency import await_, in_greenlet


class _Ready:
    """An awaitable that completes at once: lets SQLAlchemy see an "async" step without a loop turn."""

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


_READY = _Ready()


def _mark_async() -> None:
    # AsyncConnection.execute insists that an await happened; satisfy it without yielding.
    if in_greenlet():
        await_(_READY)


class InlineCursor:
    """A cursor whose rows are fetched eagerly, as SQLAlchemy's async adapters expect."""

    server_side = False
    arraysize = 1

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._cursor = connection.cursor()
        self._rows: collections.deque[Any] = collections.deque()
        self.description: Any = None

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    def execute(self, operation: str, parameters: Any = None) -> None:
        _mark_async()
        if parameters is None:
            self._cursor.execute(operation)
        else:
            self._cursor.execute(operation, parameters)
        self.description = self._cursor.description
        if self.description:
            self._rows = collections.deque(self._cursor.fetchall())

    def executemany(self, operation: str, seq_of_parameters: Any) -> None:
        _mark_async()
        self._cursor.executemany(operation, seq_of_parameters)
        self.description = self._cursor.description

    async def _async_soft_close(self) -> None:
        return None

    def close(self) -> None:
        self._rows.clear()
        self._cursor.close()

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        count = min(size or self.arraysize, len(self._rows))
        return [self._rows.popleft() for _ in range(count)]

    def fetchall(self) -> Sequence[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def __iter__(self) -> Iterator[Any]:
        while self._rows:
            yield self._rows.popleft()


class InlineConnection(AdaptedConnection):
    __slots__ = ("dbapi",)
    # AdaptedConnection types its driver connection as an asyncio DBAPI; ours is sqlite3's, called inline.
    _connection: sqlite3.Connection  # type: ignore[assignment]

    def __init__(self, dbapi: Any, connection: sqlite3.Connection) -> None:
        self.dbapi = dbapi
        self._connection = connection

    @property
    def isolation_level(self) -> str | None:
        return self._connection.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        # typeshed lists DEFERRED/EXCLUSIVE/IMMEDIATE/None; sqlite3 also takes "", which SQLAlchemy sets.
        self._connection.isolation_level = value  # type: ignore[assignment]

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._connection.create_function(*args, **kwargs)

    def cursor(self, server_side: bool = False) -> InlineCursor:
        return InlineCursor(self._connection)

    def execute(self, operation: str, parameters: Any = None) -> InlineCursor:
        cursor = self.cursor()
        cursor.execute(operation, parameters)
        return cursor

    def commit(self) -> None:
        self._connection.commit()

    def rollback(self) -> None:
        self._connection.rollback()

    def close(self) -> None:
        self._connection.close()


class InlineDBAPI:
    """The ``sqlite3`` module, with ``connect`` returning adapted connections."""

    paramstyle = "qmark"

    def __init__(self) -> None:
        for name in (
            "DatabaseError",
            "Error",
            "IntegrityError",
            "InterfaceError",
            "InternalError",
            "NotSupportedError",
            "OperationalError",
            "ProgrammingError",
            "DataError",
            "Warning",
            "sqlite_version",
            "sqlite_version_info",
            "version",
            "version_info",
            "PARSE_COLNAMES",
            "PARSE_DECLTYPES",
            "Binary",
        ):
            setattr(self, name, getattr(sqlite3, name))
        self.sqlite = sqlite3

    def connect(self, *args: Any, **kwargs: Any) -> InlineConnection:
        return InlineConnection(self, sqlite3.connect(*args, **kwargs))


class SQLiteDialect_inline(SQLiteDialect_pysqlite):
    driver = "dminline"
    is_async = True
    supports_statement_cache = True
    has_terminate = False

    @classmethod
    def import_dbapi(cls) -> Any:
        return InlineDBAPI()

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.AsyncAdaptedQueuePool if cls._is_url_file_db(url) else pool.StaticPool

    def create_connect_args(self, url: URL) -> Any:
        args, kwargs = super().create_connect_args(url)
        # Connections are used only from the loop thread, but the pool may close them elsewhere.
        kwargs["check_same_thread"] = False
        return args, kwargs

    def get_driver_connection(self, connection: Any) -> Any:
        return connection._connection


registry.register("sqlite.dminline", "datamachine_mcp.storage.sqlite_driver", "SQLiteDialect_inline")
