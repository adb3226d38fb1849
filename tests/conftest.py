"""Shared fixtures: a real SQLite file per test, the real server, in-process MCP clients."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from sqlalchemy import text

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.resources.registry import load_all as load_resources
from datamachine_mcp.server.app import DataMachineServer
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime
from datamachine_mcp.server.errors import ERROR_META_KEY

OWNER = Principal(user_id=1, is_admin=True, transport="stdio")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PG_URL_ENV = "DATAMACHINE_TEST_PG_URL"
BACKENDS_ENV = "DATAMACHINE_TEST_BACKENDS"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        choices=["sqlite", "postgresql", "all"],
        default=os.environ.get(BACKENDS_ENV, "sqlite"),
        help=f"Database backends for tests marked 'backends' (env {BACKENDS_ENV}); "
        f"postgresql needs {PG_URL_ENV}=postgresql://user:pass@host/db (a database the tests may wipe)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``backends`` run once per selected backend; every other test runs on SQLite."""
    if "db_backend" not in metafunc.fixturenames:
        return
    chosen = metafunc.config.getoption("--backend")
    backends = ["sqlite", "postgresql"] if chosen == "all" else [chosen]
    if metafunc.definition.get_closest_marker("backends") is None:
        backends = ["sqlite"]
    metafunc.parametrize("db_backend", backends)


async def _wipe_postgres(url: str) -> None:
    """Bring the test database to head and empty every table (tests share one PostgreSQL database)."""
    from datamachine_mcp.storage.db import Database
    from datamachine_mcp.storage.migrate import migrate

    db = Database(url)
    try:
        await migrate(db)
        async with db.write() as session:
            await session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    finally:
        await db.dispose()


def database_url(db_backend: str, tmp_path: Path) -> str:
    if db_backend == "postgresql":
        url = os.environ.get(PG_URL_ENV)
        if not url:
            pytest.fail(f"--backend postgresql needs {PG_URL_ENV}")
        return url
    return str(tmp_path / "dm.db")


@pytest.fixture
async def runtime(tmp_path: Path, db_backend: str) -> AsyncIterator[Runtime]:
    url = database_url(db_backend, tmp_path)
    if db_backend == "postgresql":
        await _wipe_postgres(url)
    # Every tool listed (--toolsets all): tests call tools outside the default core list.
    cfg = ProcessConfig(db=url, data_dir=tmp_path, toolsets=None)
    rt = await open_runtime(cfg)
    try:
        yield rt
    finally:
        await rt.db.dispose()


def make_server(runtime: Runtime, principal: Principal = OWNER) -> DataMachineServer:
    async def resolve(_ctx: Any) -> Principal:
        return principal

    return DataMachineServer(runtime, load_abilities(), load_resources(), resolve)


@asynccontextmanager
async def connect(runtime: Runtime, principal: Principal = OWNER, **kwargs: Any) -> AsyncIterator[Client]:
    """An MCP client talking JSON-RPC (legacy handshake) to a fresh server for ``principal``."""
    app = make_server(runtime, principal)
    async with Client(app.server, mode="legacy", **kwargs) as client:
        yield client


@pytest.fixture
async def owner(runtime: Runtime) -> AsyncIterator[Client]:
    async with connect(runtime) as client:
        yield client


async def call(client: Client, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call a tool that must succeed; returns its structured output."""
    result = await client.call_tool(name, arguments or {})
    assert not result.is_error, result.content[0].text if result.content else result
    assert result.structured_content is not None
    return result.structured_content


def error_of(result: Any) -> dict[str, Any]:
    """The ``{code, message, data}`` of an error result: in its ``_meta``, never as structured content
    (which clients validate against the tool's success output schema)."""
    assert result.is_error, result
    assert result.structured_content is None, result.structured_content
    err = (result.meta or {}).get(ERROR_META_KEY)
    assert err is not None and set(err) == {"code", "message", "data"}, result
    return err


async def fail(
    client: Client, name: str, arguments: dict[str, Any] | None = None, code: str | None = None
) -> dict[str, Any]:
    """Call a tool that must fail; returns ``{code, message, data}`` and checks the text prefix."""
    result = await client.call_tool(name, arguments or {})
    assert result.is_error, f"{name} unexpectedly succeeded: {result.structured_content}"
    err = error_of(result)
    assert result.content[0].text.startswith(f"{err['code']}: "), result.content[0].text
    if code is not None:
        assert err["code"] == code, err
    return err


TABLES = (
    "datamachine_pipelines",
    "datamachine_flows",
    "datamachine_jobs",
    "datamachine_processed_items",
    "datamachine_chat_sessions",
    "datamachine_agents",
    "datamachine_agent_access",
    "datamachine_logs",
    "datamachine_agent_tokens",
    "datamachine_settings",
)


async def table_rows(runtime: Runtime) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the ten tables, for 'nothing was written' assertions."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with runtime.db.read() as session:
        for table in TABLES:
            rows = (await session.execute(text(f"SELECT * FROM {table} ORDER BY 1"))).all()
            out[table] = [
                tuple(json.dumps(v, default=str) if isinstance(v, dict | list) else v for v in r) for r in rows
            ]
    return out


async def count(runtime: Runtime, table: str, where: str = "1=1") -> int:
    async with runtime.db.read() as session:
        return int((await session.execute(text(f"SELECT count(*) FROM {table} WHERE {where}"))).scalar() or 0)


# --- helpers added for the foundation suite (issue 3) ------------------------------------------


async def mint_token(
    runtime: Runtime,
    *,
    user_id: int = 1,
    agent_slug: str | None = None,
    capabilities: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Mint a real bearer token as the local owner; returns create-agent-token's output."""
    args: dict[str, Any] = {"user_id": user_id, **extra}
    if agent_slug is not None:
        args["agent_slug"] = agent_slug
    if capabilities is not None:
        args["capabilities"] = capabilities
    async with connect(runtime) as owner:
        return await call(owner, "create-agent-token", args)


async def token_principal(runtime: Runtime, raw: str, transport: str = "http") -> Principal:
    """Resolve a raw bearer token exactly as the server does."""
    from datamachine_mcp.abilities.tokens import verify_token

    return await verify_token(runtime.db, runtime.settings, raw, transport=transport)


async def as_token(
    runtime: Runtime, *, user_id: int, agent_slug: str | None = None, capabilities: list[str] | None = None
) -> Principal:
    """Mint a token and resolve it: the principal a client holding that token acts as."""
    out = await mint_token(runtime, user_id=user_id, agent_slug=agent_slug, capabilities=capabilities)
    return await token_principal(runtime, out["raw_token"])


async def log_rows(runtime: Runtime, where: str = "1=1") -> list[dict[str, Any]]:
    """Rows of ``datamachine_logs`` (oldest first) as dicts, with ``context`` decoded."""
    async with runtime.db.read() as session:
        result = await session.execute(
            text(
                "SELECT id, agent_id, user_id, job_id, flow_id, pipeline_id, level, message, context "
                f"FROM datamachine_logs WHERE {where} ORDER BY id"
            )
        )
        rows = [dict(r._mapping) for r in result]
    for row in rows:
        if isinstance(row["context"], str):
            row["context"] = json.loads(row["context"])
    return rows


def changed_tables(
    before: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]]
) -> dict[str, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """Tables whose rows differ: ``{table: (rows removed, rows added)}``."""
    out = {}
    for table in TABLES:
        removed = [r for r in before[table] if r not in after[table]]
        added = [r for r in after[table] if r not in before[table]]
        if removed or added:
            out[table] = (removed, added)
    return out
