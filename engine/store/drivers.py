"""The store's statements on each kind of connection.

* ``SqliteTx``: a ``sqlite3`` connection, inline on the event loop like the project's SQLite driver
  (statements on a local file take microseconds; lock waits are handled before ``BEGIN IMMEDIATE``).
* ``PgTx``: an ``asyncpg`` connection of the store's own pool.
* ``PgSessionTx``: the connection under an ORM session, so store writes share the session's transaction.

Parameters: datetimes and JSON values (dicts, lists) are converted here, so callers pass Python values.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from datamachine_mcp.engine.store import statements as q
from datamachine_mcp.engine.store.base import StoreTx
from datamachine_mcp.engine.store.rows import JobRow, dumps, job_from_decoded, job_from_sqlite, sqlite_ts


def _lite(value: Any) -> Any:
    if isinstance(value, datetime):
        return sqlite_ts(value)
    if isinstance(value, dict | list):
        return dumps(value)
    return value


def _lite_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _lite(v) for k, v in params.items()}


def _pg(value: Any) -> Any:
    # JSON goes to the driver as text (the connection's json/jsonb codec takes str, as SQLAlchemy sets it).
    return dumps(value) if isinstance(value, dict | list) else value


def _pg_args(stmt: q.Query, params: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(_pg(params[name]) for name in stmt.pg_names)


def _rowcount(status: str) -> int:
    """asyncpg's command tag (``UPDATE 3``) as a row count."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class SqliteTx(StoreTx):
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, session: Any = None) -> None:
        super().__init__()
        self.conn = conn
        self.session = session

    async def run(self, stmt: q.Query, params: Mapping[str, Any]) -> int:
        cursor = self.conn.execute(stmt.sqlite, _lite_params(params))
        if cursor.description:  # RETURNING: count the rows (they must be read before the commit)
            return len(cursor.fetchall())
        return cursor.rowcount

    async def rows(self, stmt: q.Query, params: Mapping[str, Any]) -> list[Sequence[Any]]:
        return self.conn.execute(stmt.sqlite, _lite_params(params)).fetchall()

    async def many(self, stmt: q.Query, params: Sequence[Mapping[str, Any]]) -> None:
        self.conn.executemany(stmt.sqlite, [_lite_params(p) for p in params])

    async def jobs(self, stmt: q.Query, params: Mapping[str, Any]) -> list[JobRow]:
        return [job_from_sqlite(r) for r in self.conn.execute(stmt.sqlite, _lite_params(params)).fetchall()]

    async def insert_children(self, rows: Sequence[Sequence[Any]]) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(rows), 200):  # well under SQLite's bound-variable limit
            chunk = rows[start : start + 200]
            sql, _ = q.insert_children(len(chunk))
            flat = [_lite(v) for row in chunk for v in row]
            # RETURNING order follows the VALUES order for one multi-row INSERT on SQLite.
            ids.extend(r[0] for r in self.conn.execute(sql, flat).fetchall())
        return ids

    def decode_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    async def execute_plain(self, sql: str) -> None:
        self.conn.execute(sql)


class PgTx(StoreTx):
    dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self.conn = conn

    async def run(self, stmt: q.Query, params: Mapping[str, Any]) -> int:
        if "RETURNING" in stmt.pg:
            return len(await self.conn.fetch(stmt.pg, *_pg_args(stmt, params)))
        return _rowcount(await self.conn.execute(stmt.pg, *_pg_args(stmt, params)))

    async def rows(self, stmt: q.Query, params: Mapping[str, Any]) -> list[Sequence[Any]]:
        return list(await self.conn.fetch(stmt.pg, *_pg_args(stmt, params)))

    async def many(self, stmt: q.Query, params: Sequence[Mapping[str, Any]]) -> None:
        await self.conn.executemany(stmt.pg, [_pg_args(stmt, p) for p in params])

    async def jobs(self, stmt: q.Query, params: Mapping[str, Any]) -> list[JobRow]:
        return [job_from_decoded(r) for r in await self.conn.fetch(stmt.pg, *_pg_args(stmt, params))]

    async def insert_children(self, rows: Sequence[Sequence[Any]]) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(rows), 200):
            chunk = rows[start : start + 200]
            _, sql = q.insert_children(len(chunk))
            found = await self.conn.fetch(sql, *[_pg(v) for row in chunk for v in row])
            ids.extend(r[0] for r in found)  # PostgreSQL returns VALUES order for a plain INSERT
        return ids

    async def execute_plain(self, sql: str) -> None:
        await self.conn.execute(sql)


class PgSessionTx(StoreTx):
    """Statements on an ORM session's connection (SQLAlchemy's asyncpg adapter, same codecs)."""

    dialect = "postgresql"

    def __init__(self, conn: Any, session: Any) -> None:
        super().__init__()
        self.conn = conn
        self.session = session

    async def _exec(self, sql: str, args: tuple[Any, ...]) -> Any:
        return await self.conn.exec_driver_sql(sql, args)

    async def run(self, stmt: q.Query, params: Mapping[str, Any]) -> int:
        result = await self._exec(stmt.pg, _pg_args(stmt, params))
        if result.returns_rows:
            return len(result.all())
        return int(result.rowcount)

    async def rows(self, stmt: q.Query, params: Mapping[str, Any]) -> list[Sequence[Any]]:
        return list((await self._exec(stmt.pg, _pg_args(stmt, params))).all())

    async def many(self, stmt: q.Query, params: Sequence[Mapping[str, Any]]) -> None:
        if params:
            await self.conn.exec_driver_sql(stmt.pg, [_pg_args(stmt, p) for p in params])

    async def jobs(self, stmt: q.Query, params: Mapping[str, Any]) -> list[JobRow]:
        return [job_from_decoded(r) for r in await self.rows(stmt, params)]

    async def insert_children(self, rows: Sequence[Sequence[Any]]) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(rows), 200):
            chunk = rows[start : start + 200]
            _, sql = q.insert_children(len(chunk))
            found = await self._exec(sql, tuple(_pg(v) for row in chunk for v in row))
            ids.extend(r[0] for r in found.all())
        return ids

    async def execute_plain(self, sql: str) -> None:
        await self.conn.exec_driver_sql(sql)
