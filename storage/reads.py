"""Light read transactions: prebuilt Core SELECTs without an ORM session, for a call's hot path.

An ORM session costs a unit of work, an identity map and an asynchronous pool checkout per call, and a
Core statement executed through SQLAlchemy another hundred microseconds: several times what SQLite takes
to answer a lookup by key. Here a SELECT declared with SQLAlchemy Core is compiled once per dialect
(lists written into the statement are expanded once, not on every call) and run on the driver:

* SQLite: a ``sqlite3`` connection of this process, inline on the event loop as every SQLite statement
  here is (``storage.sqlite_driver``); the transaction begins at the first statement (one WAL snapshot)
  and is rolled back when the block ends.
* PostgreSQL (and in-memory SQLite): a pooled connection of the read engine, through SQLAlchemy.

Either way each column is decoded by its own type's result processor, as through a session, and rows
offer attribute access by column name or label. Only SELECTs: nothing here writes.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from datamachine_mcp.storage.db import configure_sqlite

# SQLAlchemy is imported to compile a statement (once per statement), not to hold a connection:
# ``sqlite_connection`` serves raw SQL without it.
if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.sql.base import Executable

    from datamachine_mcp.storage.db import Database

POOLED = 4  # idle SQLite read connections kept per database (more are opened while busy, then closed)


class Rows(Protocol):
    """What a read returns (SQLAlchemy's ``Result`` has the same methods)."""

    def all(self) -> Sequence[Any]: ...

    def one(self) -> Any: ...

    def one_or_none(self) -> Any: ...


class Reads(Protocol):
    """One read transaction."""

    async def execute(self, statement: Executable, params: Mapping[str, Any] | None = None) -> Rows: ...


class _List:
    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def all(self) -> list[Any]:
        return self._rows

    def one_or_none(self) -> Any:
        if len(self._rows) > 1:
            from sqlalchemy.exc import MultipleResultsFound

            raise MultipleResultsFound("Multiple rows were found when one or none was required")
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        row = self.one_or_none()
        if row is None:
            from sqlalchemy.exc import NoResultFound

            raise NoResultFound("No row was found when one was required")
        return row


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # positional parameters, in order
    defaults: Mapping[str, Any]  # values bound in the statement itself (e.g. an IN list)
    encode: Mapping[str, Callable[[Any], Any]]  # parameters converted by their type (datetimes)
    decode: tuple[Callable[[Any], Any] | None, ...]
    make: Callable[[Iterable[Any]], Any]  # a row with attribute access by column name or label


_COMPILED: dict[Executable, _Compiled] = {}


@cache
def _sqlite() -> Dialect:
    from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

    return SQLiteDialect_pysqlite()


def _row_type(names: list[str]) -> Any:
    return namedtuple("Row", names, rename=True)


def _compile(statement: Executable) -> _Compiled:
    found = _COMPILED.get(statement)
    if found is None:
        from sqlalchemy import Select

        if not isinstance(statement, Select):
            raise TypeError("a light read runs SELECT statements only")
        dialect = _sqlite()
        compiled = statement.compile(dialect=dialect)
        unbound = {name: None for name, bind in compiled.binds.items() if bind.required}
        if any(compiled.binds[name].expanding for name in unbound):
            raise ValueError("a light read binds IN lists in the statement, not per call")
        # The final text once: lists given in the statement are expanded here, not on every call.
        expanded = compiled.construct_expanded_state(unbound)
        columns = list(statement.selected_columns)
        found = _COMPILED[statement] = _Compiled(
            sql=expanded.statement,
            names=tuple(expanded.positiontup or ()),
            defaults=dict(expanded.parameters),
            encode=dict(expanded.processors),
            decode=tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns),
            make=_row_type([str(c.key) for c in columns])._make,
        )
    return found


class _Inline:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def execute(self, statement: Executable, params: Mapping[str, Any] | None = None) -> Rows:
        compiled = _compile(statement)
        values = {**compiled.defaults, **(params or {})}
        for name, encode in compiled.encode.items():
            if values.get(name) is not None:
                values[name] = encode(values[name])
        if not self.conn.in_transaction:  # one snapshot for all of the read's statements
            self.conn.execute("BEGIN")
        raw = self.conn.execute(compiled.sql, [values[name] for name in compiled.names]).fetchall()
        decode, make = compiled.decode, compiled.make
        return _List(
            [make([value if fn is None else fn(value) for fn, value in zip(decode, r, strict=True)]) for r in raw]
        )


class _Pooled:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, statement: Executable, params: Mapping[str, Any] | None = None) -> Rows:
        return await self._conn.execute(statement, params)


def _connect(db: Database) -> sqlite3.Connection:
    assert db.path is not None
    conn = sqlite3.connect(db.path, isolation_level=None, check_same_thread=False)
    configure_sqlite(conn, write=False)  # WAL; a reader's rare lock wait is short (it blocks the loop)
    conn.execute("PRAGMA query_only=ON")
    return conn


@contextmanager
def sqlite_connection(db: Database) -> Iterator[sqlite3.Connection]:
    """A pooled ``query_only`` connection to ``db``'s file, this block's alone. Each statement is its
    own snapshot unless the block begins a transaction (``reads()`` does); one left open is rolled back."""
    idle = db.light_connections
    conn = idle.pop() if idle else _connect(db)
    try:
        yield conn
    finally:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:  # not fit for another read
            conn.close()
        else:
            if len(idle) < POOLED:
                idle.append(conn)
            else:
                conn.close()


@asynccontextmanager
async def open_reads(db: Database) -> AsyncIterator[Reads]:
    if db.dialect != "sqlite" or db.path is None:
        async with db.read_engine.connect() as pooled:
            yield _Pooled(pooled)
        return
    with sqlite_connection(db) as conn:
        yield _Inline(conn)
