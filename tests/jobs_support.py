"""Helpers shared by the job test modules: an in-process engine, no-network pipelines, waiting.

Pipelines are built with the real tools (create-pipeline in workflow mode, so a flow comes with it):
``files`` fetch from a directory under ``$DATA_DIR/files`` → ``files`` publish into another one, a
``system_task`` echo step, and an ``approval`` gate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import select, text

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.context import Runtime
from datamachine_mcp.engine.host import EngineHost
from datamachine_mcp.storage.models import Job, ProcessedItem
from tests.conftest import call, changed_tables, fail, log_rows, table_rows

USER2 = Principal(user_id=2, transport="http")
USER3 = Principal(user_id=3, transport="http")


@pytest.fixture
async def engine(runtime: Runtime) -> AsyncIterator[EngineHost]:
    """Worker + maintenance loop running in this process for the test's duration."""
    host = EngineHost(runtime.engine, concurrency=2, poll_seconds=0.1)
    await host.start()
    try:
        yield host
    finally:
        await host.stop(grace=5)


def dirs(runtime: Runtime) -> tuple[Path, Path]:
    """(inbox, outbox) under the default files root, created."""
    inbox = runtime.data_dir / "files" / "in"
    outbox = runtime.data_dir / "files" / "out"
    inbox.mkdir(parents=True, exist_ok=True)
    outbox.mkdir(parents=True, exist_ok=True)
    return inbox, outbox


def write_items(inbox: Path, *names: str) -> None:
    for name in names:
        (inbox / f"{name}.md").write_text(f"---\ntitle: {name.title()}\n---\nBody of {name}.\n")


def fetch_step(inbox: Path, max_items: int = 1) -> dict[str, Any]:
    return {
        "step_type": "fetch",
        "handler_slugs": ["files"],
        "handler_configs": {"files": {"directory": str(inbox), "pattern": "*.md", "max_items": max_items}},
    }


def publish_step(outbox: Path) -> dict[str, Any]:
    return {
        "step_type": "publish",
        "handler_slugs": ["files"],
        "handler_configs": {"files": {"directory": str(outbox), "filename_template": "{slug}-{job_id}.md"}},
    }


def echo_step(**params: Any) -> dict[str, Any]:
    return {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": params}}


def approval_step(**settings: Any) -> dict[str, Any]:
    return {"step_type": "approval", "flow_step_settings": {"description": "Check it", **settings}}


async def make_flow(client: Any, steps: list[dict[str, Any]], name: str = "P", **extra: Any) -> dict[str, Any]:
    """create-pipeline in workflow mode; returns its output (pipeline_id, flow_id, flow_step_ids …)."""
    return await call(client, "create-pipeline", {"pipeline_name": name, "workflow": {"steps": steps}, **extra})


async def files_flow(client: Any, runtime: Runtime, *, max_items: int = 1, extra_steps: Any = (), **kw: Any) -> dict:
    inbox, outbox = dirs(runtime)
    steps = [fetch_step(inbox, max_items), *extra_steps, publish_step(outbox)]
    return await make_flow(client, steps, **kw)


async def run(client: Any, flow_id: int, wait: float = 0, **extra: Any) -> dict[str, Any]:
    return await call(client, "run-flow", {"flow_id": flow_id, "wait_seconds": wait, **extra})


async def wait_job(client: Any, job_id: int, seconds: float = 10, **extra: Any) -> dict[str, Any]:
    return await call(client, "wait-for-job", {"job_id": job_id, "timeout_seconds": seconds, **extra})


async def wait_until(predicate: Any, seconds: float = 10, step: float = 0.05) -> None:
    """Poll ``predicate`` (the engine runs in other tasks; nothing to await on directly)."""
    with anyio.fail_after(seconds):
        while not await predicate():  # noqa: ASYNC110
            await anyio.sleep(step)


async def job_row(runtime: Runtime, job_id: int) -> Job | None:
    async with runtime.db.read() as session:
        return await session.get(Job, job_id)


async def items_of(runtime: Runtime, **where: Any) -> list[tuple[str, str, int | None]]:
    """processed_items rows as (item_identifier, status, job_id), filtered by column equality."""
    async with runtime.db.read() as session:
        stmt = select(ProcessedItem.item_identifier, ProcessedItem.status, ProcessedItem.job_id)
        for key, value in where.items():
            stmt = stmt.where(getattr(ProcessedItem, key) == value)
        return [tuple(r) for r in (await session.execute(stmt.order_by(ProcessedItem.id))).all()]


async def sql(runtime: Runtime, statement: str, **params: Any) -> None:
    async with runtime.db.write() as session:
        await session.execute(text(statement), params)


async def settings(client: Any, **values: Any) -> None:
    await call(client, "update-settings", {"settings": values})


async def unchanged(runtime: Runtime, client: Any, tool: str, args: dict[str, Any], code: str) -> dict[str, Any]:
    """The call fails with ``code`` and writes nothing at all."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


async def denied(runtime: Runtime, client: Any, tool: str, args: dict[str, Any], code: str = "agent_access_denied"):
    """The call is refused: nothing changes but the one warning row of the denial."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1, changed
    assert (await log_rows(runtime))[-1]["message"] == f"{tool} denied: {code}"
    return err


async def audit_rows(runtime: Runtime, ability: str) -> list[dict[str, Any]]:
    return [
        r
        for r in await log_rows(runtime)
        if (r["context"] or {}).get("ability") == ability
        and (r["context"] or {}).get("audit")
        and "denied" not in r["message"]
    ]


async def make_agent(owner: Any, slug: str = "bot") -> int:
    return (await call(owner, "create-agent", {"agent_slug": slug}))["agent_id"]


async def grant(owner: Any, agent_id: int, user_id: int, role: str) -> None:
    await call(owner, "grant-agent-access", {"agent_id": agent_id, "user_id": user_id, "role": role})
