"""Schema migrations: head revision, models in sync, persistence, refusal of unknown revisions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from datamachine_mcp.server.bootstrap import ProcessConfig, StartupError, open_runtime
from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.migrate import alembic_config, current_revision, migrate
from datamachine_mcp.storage.migrations import HEAD_REVISION
from datamachine_mcp.storage.models import Base
from tests.conftest import TABLES, call, connect

pytestmark = pytest.mark.anyio


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env["DATAMACHINE_DATA_DIR"] = str(tmp_path / "data")
    env.pop("DATAMACHINE_DB", None)
    env.pop("DATAMACHINE_TOKEN", None)
    return env


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "datamachine_mcp.server.cli", *args],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _tables(path: Path) -> set[str]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'")).scalars().all()
    finally:
        engine.dispose()
    return set(rows) - {"sqlite_sequence"}


async def test_empty_database_migrates_to_exactly_the_ten_tables(tmp_path):
    db = Database(str(tmp_path / "fresh.db"))
    try:
        assert await current_revision(db) is None
        assert await migrate(db) is True
        assert await current_revision(db) == HEAD_REVISION
        assert await migrate(db) is False  # already at head: nothing to do
    finally:
        await db.dispose()
    assert _tables(tmp_path / "fresh.db") == {*TABLES, "alembic_version"}
    assert len(TABLES) == 10


async def test_migrated_schema_matches_the_models(runtime):
    engine = create_engine(f"sqlite:///{runtime.db.path}")
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_head_revision_constant_is_alembics_head():
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD_REVISION]


async def test_sqlite_pragmas(runtime):
    async with runtime.db.write() as s:
        assert (await s.execute(text("PRAGMA foreign_keys"))).scalar() == 1
        assert (await s.execute(text("PRAGMA journal_mode"))).scalar() == "wal"


async def test_data_survives_closing_and_reopening(tmp_path):
    cfg = ProcessConfig(db=str(tmp_path / "dm.db"), data_dir=tmp_path, toolsets=None)
    rt = await open_runtime(cfg)
    try:
        async with connect(rt) as c:
            await call(c, "create-agent", {"agent_slug": "keeper", "agent_config": {"description": "kept"}})
            await call(c, "update-settings", {"settings": {"ai_providers": {"openai": {"api_key": "sk-1"}}}})
    finally:
        await rt.db.dispose()
    rt = await open_runtime(cfg)
    try:
        async with connect(rt) as c:
            agent = (await call(c, "get-agent", {"agent_slug": "keeper"}))["agent"]
            assert agent["agent_config"] == {"description": "kept"}
            assert (await call(c, "read-logs", {"audit_only": True}))["total"] == 2
        # the secret key file was reused, so the envelope still decrypts
        async with rt.db.read() as s:
            snap = await rt.settings.snapshot(s, fresh=True)
        assert rt.settings.decrypt_api_key(snap, "openai") == "sk-1"
    finally:
        await rt.db.dispose()


async def _stamp_unknown(path: Path) -> None:
    db = Database(str(path))
    try:
        await migrate(db)
        async with db.write() as s:
            await s.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    finally:
        await db.dispose()


async def test_unknown_revision_is_refused_by_the_cli(tmp_path):
    path = tmp_path / "newer.db"
    await _stamp_unknown(path)
    result = _cli(tmp_path, "migrate", "--db", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "9999_from_the_future" in result.stderr and "never downgrades" in result.stderr
    assert result.stderr.startswith("datamachine-mcp: ")
    assert "Traceback" not in result.stderr
    # nothing was changed
    db = Database(str(path))
    try:
        assert await current_revision(db) == "9999_from_the_future"
    finally:
        await db.dispose()
    # serving refuses to start the same way
    serve = _cli(tmp_path, "--db", str(path))
    assert serve.returncode == 2 and "9999_from_the_future" in serve.stderr and serve.stdout == ""


async def test_unknown_revision_is_refused_by_open_runtime(tmp_path):
    path = tmp_path / "newer.db"
    await _stamp_unknown(path)
    with pytest.raises(StartupError, match="9999_from_the_future"):
        await open_runtime(ProcessConfig(db=str(path), data_dir=tmp_path))


def test_cli_migrate_reports_progress(tmp_path):
    path = tmp_path / "cli.db"
    first = _cli(tmp_path, "migrate", "--db", str(path))
    assert first.returncode == 0, first.stderr
    assert f"migrated from empty to {HEAD_REVISION}" in first.stderr and first.stdout == ""
    second = _cli(tmp_path, "migrate", "--db", str(path))
    assert second.returncode == 0 and f"already at {HEAD_REVISION}" in second.stderr
    assert _tables(path) == {*TABLES, "alembic_version"}
