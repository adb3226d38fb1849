"""The job store: the engine's hot path (claim, heartbeat, step commits, finish, release, requeue, park,
resume, claim settlement) as named statements run directly on a database connection.

``JobStore.transaction()`` opens a transaction on the store's own connection (SQLite: one connection
per process, taken under the process's write lock with ``BEGIN IMMEDIATE``; PostgreSQL: an asyncpg
pool). ``JobStore.bind(session)`` runs the same statements inside an ORM session's transaction, for the
tool calls and sweeps that also write through the ORM (audit rows, item claims, flows).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from datamachine_mcp.engine.store.base import GuardMissed, StoreTx, guard_params
from datamachine_mcp.engine.store.drivers import PgSessionTx, PgTx, SqliteTx
from datamachine_mcp.engine.store.rows import JobRow
from datamachine_mcp.storage.db import Database, begin_immediate, configure_sqlite

__all__ = ["GuardMissed", "JobRow", "JobStore", "StoreTx", "guard_params"]


async def _init_pg(conn: Any) -> None:
    # The codecs SQLAlchemy installs, so rows read here and through the ORM look alike.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda s: b"\x01" + s.encode(),
        decoder=lambda b: json.loads(b[1:].decode()),
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "json", encoder=str.encode, decoder=lambda b: json.loads(b.decode()), schema="pg_catalog", format="binary"
    )


class JobStore:
    def __init__(
        self, db: Database, *, pool_size: int = 10, setup: Callable[[Any], Awaitable[None]] | None = None
    ) -> None:
        self.db = db
        self._setup = setup  # extra per-connection setup of the PostgreSQL pool (tests force plans with it)
        self.dialect = db.dialect
        self.pool_size = pool_size
        self._conn: sqlite3.Connection | None = None
        self._pool: Any = None
        db.on_dispose(self.close)

    async def _sqlite(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.db.path is None:  # in-memory: the engine's one shared connection
                async with self.db.write_engine.connect() as shared:
                    self._conn = (await shared.get_raw_connection()).driver_connection
            else:
                own = sqlite3.connect(str(self.db.path), isolation_level=None, check_same_thread=False)
                configure_sqlite(own, write=True)
                self._conn = own
        assert self._conn is not None
        return self._conn

    async def _pg_pool(self) -> Any:
        if self._pool is None:
            import asyncpg

            dsn = self.db.url.replace("postgresql+asyncpg://", "postgresql://", 1)

            async def init(conn: Any) -> None:
                await _init_pg(conn)
                if self._setup is not None:
                    await self._setup(conn)

            self._pool = await asyncpg.create_pool(dsn, min_size=1, max_size=self.pool_size, init=init)
        return self._pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTx]:
        """One transaction on the store's connection: committed when the block ends, else rolled back."""
        if self.dialect == "postgresql":
            pool = await self._pg_pool()
            async with pool.acquire() as conn, conn.transaction():
                tx = PgTx(conn)
                yield tx
                await tx.flush_logs()
            return
        lock = self.db.write_lock
        assert lock is not None
        async with lock:
            conn = await self._sqlite()
            await begin_immediate(conn, self.db.busy_timeout_ms)
            try:
                lite = SqliteTx(conn)
                yield lite
                await lite.flush_logs()
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[StoreTx]:
        """For one statement: PostgreSQL runs it without BEGIN/COMMIT round trips; SQLite as a transaction."""
        if self.dialect != "postgresql":
            async with self.transaction() as tx:
                yield tx
            return
        pool = await self._pg_pool()
        async with pool.acquire() as conn:
            tx = PgTx(conn)
            yield tx
            await tx.flush_logs()

    @asynccontextmanager
    async def bind(self, session: Any) -> AsyncIterator[StoreTx]:
        """The store's statements inside ``session``'s transaction (the session commits)."""
        await session.flush()  # ORM changes first, so store statements see (and are not overwritten by) them
        conn = await session.connection()
        if self.dialect == "postgresql":
            tx: StoreTx = PgSessionTx(conn, session)
        else:
            tx = SqliteTx((await conn.get_raw_connection()).driver_connection, session)
        yield tx
        await tx.flush_logs()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        if self._conn is not None and self.db.path is not None:
            self._conn.close()
        self._conn = None
