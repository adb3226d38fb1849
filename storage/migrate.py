"""Schema migrations on start, under a lock (docs/storage.md, Migrations).

Startup reads ``alembic_version`` with the raw driver (``sqlite3``, ``asyncpg``) and imports
SQLAlchemy and Alembic only when an upgrade is needed: the common case (schema already at head) then
costs one query and no import.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.migrations import HEAD_REVISION

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_PG_LOCK = "hashtext('datamachine_migrations')"


class MigrationError(RuntimeError):
    """The database cannot be brought to this code's schema (e.g. it is newer)."""


def alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _read_revision(conn: Connection) -> str | None:
    from sqlalchemy import inspect, text

    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


async def current_revision(db: Database) -> str | None:
    """The schema revision recorded in the database (None: not migrated yet), read on the raw driver."""
    if db.path is not None:
        return _sqlite_revision(db.path)
    if db.dialect == "postgresql":
        try:
            return await _pg_revision(db.url)
        except Exception:  # e.g. a URL option only SQLAlchemy's dialect knows: ask through it instead
            log.debug("reading the schema revision with asyncpg failed", exc_info=True)
    # in-memory SQLite (only the engine's connection sees it), or the fallback above
    async with db.read_engine.connect() as conn:
        return await conn.run_sync(_read_revision)


def _sqlite_revision(path: Path) -> str | None:
    if not path.exists():
        return None
    conn = sqlite3.connect(path, timeout=5)
    try:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'")
        if found.fetchone() is None:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None
    finally:
        conn.close()


async def _pg_revision(url: str) -> str | None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        if await conn.fetchval("SELECT to_regclass('alembic_version')") is None:
            return None
        value = await conn.fetchval("SELECT version_num FROM alembic_version")
        return value if isinstance(value, str) else None
    finally:
        await conn.close()


def _upgrade(conn: Connection) -> str | None:
    from alembic import command
    from alembic.script import ScriptDirectory

    revision = _read_revision(conn)
    if revision == HEAD_REVISION:
        return revision  # another process migrated while we waited for the lock
    cfg = alembic_config(conn)
    script = ScriptDirectory.from_config(cfg)
    if revision is not None and revision not in {rev.revision for rev in script.walk_revisions()}:
        raise MigrationError(
            f"the database is at schema revision {revision!r}, which this version of datamachine-mcp "
            f"does not know (its newest is {HEAD_REVISION!r}); upgrade datamachine-mcp, it never downgrades"
        )
    command.upgrade(cfg, "head")
    return revision


async def migrate(db: Database) -> bool:
    """Bring the schema to head. Returns True when an upgrade ran."""
    if await current_revision(db) == HEAD_REVISION:
        return False
    from sqlalchemy import text

    if db.dialect == "postgresql":
        async with db.write_engine.connect() as conn:
            await conn.execute(text(f"SELECT pg_advisory_lock({_PG_LOCK})"))
            await conn.commit()
            try:
                async with conn.begin():
                    before = await conn.run_sync(_upgrade)
            finally:
                await conn.execute(text(f"SELECT pg_advisory_unlock({_PG_LOCK})"))
                await conn.commit()
    else:
        before = await _upgrade_sqlite(db)
    if before != HEAD_REVISION:
        log.info("database migrated from %s to %s", before or "empty", HEAD_REVISION)
        if before is not None:  # a table rebuilt by a migration has lost its statistics
            await db.analyze()
    return before != HEAD_REVISION


async def _upgrade_sqlite(db: Database) -> str | None:
    """The upgrade in one transaction on a connection with foreign keys off.

    A migration that changes a constraint rebuilds its table; with foreign keys on, dropping the old
    table would run the ON DELETE actions of every row that points at it (children deleted, claims
    freed). The pragma only takes effect outside a transaction, so it is set before BEGIN and restored
    after; any reference the upgrade left broken rolls it back.
    """
    async with db.write_engine.connect() as conn:
        raw = cast(sqlite3.Connection, (await conn.get_raw_connection()).driver_connection)
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            # The write engine begins with BEGIN IMMEDIATE: the whole upgrade holds the write lock.
            async with conn.begin():
                broken = await _broken_references(conn)
                before = await conn.run_sync(_upgrade)
                if now_broken := await _broken_references(conn) - broken:
                    tables = ", ".join(sorted({str(row[0]) for row in now_broken}))
                    raise MigrationError(f"the upgrade would leave broken references in {tables}; nothing was changed")
        finally:
            raw.execute("PRAGMA foreign_keys=ON")
    return before


async def _broken_references(conn: AsyncConnection) -> set[tuple[object, ...]]:
    return {tuple(r) for r in (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()}
