"""Opening a process: configuration, database and migrations, secret key, identity.

Flags override environment (``DATAMACHINE_*``), which overrides defaults. Opening a runtime imports
no database layer when the schema is already at head (it is read on the raw driver); SQLAlchemy and
the ability modules load when a call first needs them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.abilities.tool_cache import catalog
from datamachine_mcp.abilities.toolsets import CORE, SelectionError
from datamachine_mcp.abilities.toolsets import parse_tools as _parse_tools
from datamachine_mcp.abilities.toolsets import parse_toolsets as _parse_toolsets
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.server.notifications import Notifications
from datamachine_mcp.storage.crypto import SecretBox, SecretKeyError, load_key
from datamachine_mcp.storage.db import Database, default_data_dir, default_db_path
from datamachine_mcp.storage.migrate import MigrationError, migrate
from datamachine_mcp.storage.settings import SettingsStore

log = logging.getLogger("datamachine.server")


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("datamachine-mcp")
    except Exception:  # running from a source tree without installation
        return "0.0.0+source"


class StartupError(RuntimeError):
    """A configuration or environment problem: printed on stderr, exit code 2."""


@dataclass(frozen=True)
class ProcessConfig:
    db: str
    data_dir: Path
    local_user: int = 1
    agent: str | None = None
    token: str | None = None
    # The tools listed: the core profile by default; None lists every tool (--toolsets all).
    toolsets: frozenset[str] | None = frozenset({CORE})
    tools: frozenset[str] = frozenset()  # single tools added with --tools
    read_only: bool = False
    busy_timeout_ms: int = 5000
    public_base_url: str | None = None  # base of generated URLs (webhook_url, gate resume URLs)
    worker: bool = True  # run the engine (worker + maintenance) in this process
    concurrency: int = 4
    http: str | None = None  # serve streamable HTTP on [HOST:]PORT instead of stdio
    allow_origins: tuple[str, ...] = ()  # browser origins the HTTP listener accepts besides its own


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"DATAMACHINE_{name}")
    return value if value not in (None, "") else default


def resolve_db(flag: str | None) -> str:
    return flag or env("DB") or str(default_db_path())


def resolve_data_dir(flag: str | None, db: str) -> Path:
    explicit = flag or env("DATA_DIR")
    if explicit:
        path = Path(explicit).expanduser().resolve()
    elif "://" not in db and db != ":memory:":
        path = Path(db).expanduser().resolve().parent
    else:
        path = default_data_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def parse_toolsets(raw: str | None) -> frozenset[str] | None:
    """``--toolsets`` / DATAMACHINE_TOOLSETS: core (default), all, or toolset names and core."""
    try:
        return _parse_toolsets(raw)
    except SelectionError as exc:
        raise StartupError(str(exc)) from None


def parse_tools(raw: str | None, data_dir: Path | None = None) -> frozenset[str]:
    """``--tools`` / DATAMACHINE_TOOLS: single tools listed besides the toolsets (checked against the
    declarations, read from the tool cache in ``data_dir``)."""
    if not raw:
        return frozenset()
    declared = catalog(None if data_dir is None else data_dir / "cache", version()).declared
    try:
        return _parse_tools(raw, declared)
    except SelectionError as exc:
        raise StartupError(str(exc)) from None


async def open_runtime(cfg: ProcessConfig, notifications: Notifications | None = None) -> Runtime:
    """Open the database (migrating it), load the secret key and settings.

    ``notifications`` (a new one by default) is the process's: every runtime and its engine announce
    committed changes to it and sample through its bridge; the servers of this runtime serve it.
    """
    hub = notifications if notifications is not None else Notifications()
    db = Database(cfg.db, busy_timeout_ms=cfg.busy_timeout_ms)
    try:
        await migrate(db)
    except MigrationError as exc:
        await db.dispose()
        raise StartupError(str(exc)) from None
    except Exception as exc:
        await db.dispose()
        raise StartupError(f"cannot open the database {db.describe()}: {exc}") from None
    try:
        box = SecretBox(load_key(cfg.data_dir))
    except SecretKeyError as exc:
        await db.dispose()
        raise StartupError(str(exc)) from None
    settings = SettingsStore(cfg.data_dir, box)
    engine = EngineServices(
        db=db,
        settings=settings,
        box=box,
        data_dir=cfg.data_dir,
        version=version(),
        public_base_url=cfg.public_base_url,
        events=hub,
        sampling=hub.sampling,
    )
    return Runtime(
        db=db,
        settings=settings,
        box=box,
        data_dir=cfg.data_dir,
        version=engine.version,
        toolsets=cfg.toolsets,
        tools=cfg.tools,
        read_only=cfg.read_only,
        public_base_url=cfg.public_base_url,
        events=hub,
        engine=engine,
    )


Resolver = Callable[[Any], Awaitable[Principal]]


async def stdio_identity(runtime: Runtime, cfg: ProcessConfig) -> Resolver:
    """The stdio principal: the local owner, optionally in an agent's context, or a token's identity."""
    if cfg.token:
        from datamachine_mcp.abilities.tokens import TokenRejected, verify_token

        if cfg.agent:
            raise StartupError("--agent cannot be combined with --token: the token decides the agent")
        try:
            start = await verify_token(runtime.db, runtime.settings, cfg.token, transport="stdio")
        except TokenRejected as exc:
            raise StartupError(f"the token given with --token was rejected ({exc.reason})") from None

        async def by_token(_ctx: Any) -> Principal:
            # Re-verified on every call: a revoked token stops working at once.
            try:
                return await verify_token(runtime.db, runtime.settings, cfg.token or "", transport="stdio")
            except TokenRejected:
                raise AbilityError("unauthenticated", "token revoked or expired") from None

        log.info("acting as token %s (user %s)", start.token_prefix, start.user_id)
        return by_token

    agent_id = agent_slug = None
    if cfg.agent:
        from sqlalchemy import select

        from datamachine_mcp.storage.models import Agent

        async with runtime.db.read() as session:
            agent = (await session.execute(select(Agent).where(Agent.agent_slug == cfg.agent))).scalar_one_or_none()
        if agent is None:
            raise StartupError(f"--agent '{cfg.agent}' names no agent; create it first (create-agent)")
        agent_id, agent_slug = agent.agent_id, agent.agent_slug
    owner = Principal(
        user_id=cfg.local_user, agent_id=agent_id, is_admin=True, transport="stdio", agent_slug=agent_slug
    )

    async def local_owner(_ctx: Any) -> Principal:
        return owner

    return local_owner
