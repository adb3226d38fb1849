"""Change notifications across processes (docs/architecture.md, Notifications).

Most subscribers below are real stdio servers in their own processes (``--no-worker``), reached with
the Python SDK client: legacy ``resources/subscribe`` or the 2026 ``subscriptions/listen`` stream; the
last test's are HTTP sessions of a server in this process. The change is committed by another
process: a ``datamachine-mcp worker`` running the job, or another stdio server calling ``fail-job``.
The subscriber must learn of it within 2 seconds (SQLite: the once-a-second poll; PostgreSQL:
LISTEN/NOTIFY), and a subscriber that may not read the job hears nothing about it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated

from datamachine_mcp.abilities.context import Runtime
from tests.conftest import call, mint_token
from tests.http_support import MODERN, mcp_client
from tests.http_support import listening as http_listening
from tests.jobs_support import echo_step, job_row, make_flow, run
from tests.test_worker_process import Workers

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.backends,
    pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed"),
]

WITHIN = 2.0  # seconds from a commit in another process to the subscriber knowing about it
FINAL = {"completed", "failed"}


def db_arg(runtime: Runtime) -> str:
    return str(runtime.db.path) if runtime.db.path is not None else runtime.db.url


def server_params(runtime: Runtime, tmp_path: Path, *extra: str) -> StdioServerParameters:
    """A stdio server on the test's database that runs no jobs itself (every tool listed)."""
    return StdioServerParameters(
        command=sys.executable,
        args=[
            *("-m", "datamachine_mcp.server.cli", "--db", db_arg(runtime)),
            *("--data-dir", str(runtime.data_dir), "--no-worker", "--toolsets", "all", *extra),
        ],
        env={"XDG_DATA_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"},
    )


def job_status(body: dict[str, Any]) -> str:
    (job,) = body["jobs"]
    return job["base_status"]


def flow_last_run(body: dict[str, Any]) -> str | None:
    (flow,) = body["flows"]
    return flow["last_run_status"]


@dataclass
class Subscriber:
    """One stdio server process subscribed to some URIs: notes when each update arrived and, for the
    URIs given a reader, what the resource reads as after each update (how a client learns the state)."""

    client: Client
    readers: dict[str, Callable[[dict[str, Any]], Any]]
    heard: list[tuple[str, float]] = field(default_factory=list)
    list_changes: list[float] = field(default_factory=list)
    learned: dict[tuple[str, Any], float] = field(default_factory=dict)  # (uri, value) -> first read at
    _news: set[str] = field(default_factory=set)
    _wake: anyio.Event = field(default_factory=anyio.Event)

    def hear(self, uri: str) -> None:
        self.heard.append((uri, time.monotonic()))
        if uri in self.readers:
            self._news.add(uri)
            self._wake.set()

    def heard_at(self, uri: str) -> list[float]:
        return [at for u, at in self.heard if u == uri]

    async def follow(self) -> None:
        """Re-read a resource after each of its updates (runs for the subscriber's life)."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            news, self._news = self._news, set()
            for uri in sorted(news):
                result = await self.client.read_resource(uri, cache_mode="bypass")
                value = self.readers[uri](json.loads(result.contents[0].text))
                self.learned.setdefault((uri, value), time.monotonic())

    async def learns(self, uri: str, value: Any, seconds: float) -> float | None:
        """When the subscriber first read ``value`` at ``uri`` (None if not within ``seconds``)."""
        with anyio.move_on_after(seconds):
            while (uri, value) not in self.learned:  # noqa: ASYNC110 - the subscriber's own tasks fill it
                await anyio.sleep(0.02)
        return self.learned.get((uri, value))


@asynccontextmanager
async def subscribed(
    params: StdioServerParameters, era: str, readers: dict[str, Callable[[dict[str, Any]], Any]], *more: str
) -> AsyncIterator[Subscriber]:
    """A subscriber process for the URIs of ``readers`` and ``more`` through ``era``: "legacy"
    (resources/subscribe) or "listen" (subscriptions/listen)."""
    uris = [*readers, *more]
    holder: list[Subscriber] = []

    async def on_message(message: Any) -> None:
        if not holder:
            return
        if isinstance(message, types.ResourceUpdatedNotification):
            holder[0].hear(str(message.params.uri))
        elif isinstance(message, types.ResourceListChangedNotification):
            holder[0].list_changes.append(time.monotonic())

    if era == "legacy":
        async with Client(params, mode="legacy", message_handler=on_message) as client:
            sub = Subscriber(client, readers)
            holder.append(sub)
            for uri in uris:
                await client.subscribe_resource(uri)
            async with anyio.create_task_group() as tg:
                tg.start_soon(sub.follow)
                yield sub
                tg.cancel_scope.cancel()
        return
    async with (
        Client(params) as client,
        client.listen(resource_subscriptions=uris, resources_list_changed=True) as stream,
    ):
        sub = Subscriber(client, readers)

        async def pump() -> None:
            async for event in stream:
                if isinstance(event, ResourceUpdated):
                    sub.hear(event.uri)
                elif isinstance(event, ResourcesListChanged):
                    sub.list_changes.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            tg.start_soon(sub.follow)
            yield sub
            tg.cancel_scope.cancel()


@pytest.fixture
def workers(runtime: Runtime, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(runtime, tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


async def pending_flow(owner: Client) -> dict[str, Any]:
    """A flow whose run nobody runs yet (no worker in this process): a pending job."""
    made = await make_flow(owner, [echo_step(done=True)], name="Watched")
    return {**made, "job_id": (await run(owner, made["flow_id"]))["job_id"]}


async def committed_final(runtime: Runtime, job_id: int, seconds: float = 60) -> float:
    """When the test first saw ``job_id`` final in the database (polled every 20 ms)."""
    with anyio.fail_after(seconds):
        while True:
            job = await job_row(runtime, job_id)
            if job is not None and job.status in FINAL:
                return time.monotonic()
            await anyio.sleep(0.02)


async def stranger_params(runtime: Runtime, tmp_path: Path) -> StdioServerParameters:
    """A stdio server acting as user 3, who has no role on anything the owner made."""
    token = await mint_token(runtime, user_id=3)
    return server_params(runtime, tmp_path, "--token", token["raw_token"])


@pytest.mark.parametrize("era", ["legacy", "listen"])
async def test_a_job_run_by_a_worker_process_reaches_subscribers_of_other_processes(
    runtime, owner, tmp_path, workers, era
):
    made = await pending_flow(owner)
    job = f"datamachine://jobs/{made['job_id']}"
    flow = f"datamachine://flows/{made['flow_id']}"
    pipeline = f"datamachine://pipelines/{made['pipeline_id']}"
    stranger = await stranger_params(runtime, tmp_path)
    async with (
        subscribed(server_params(runtime, tmp_path), era, {job: job_status, flow: flow_last_run}, pipeline) as reader,
        subscribed(stranger, era, {}, job, flow, pipeline) as outsider,
    ):
        workers.start(concurrency=1)
        done = await committed_final(runtime, made["job_id"])
        learned = await reader.learns(job, "completed", WITHIN + 1)
        assert learned is not None, f"{era}: no job update after the worker finished it ({reader.heard})"
        assert learned - done <= WITHIN
        # the flow's last run state and the pipeline embedding the flow
        learned = await reader.learns(flow, "completed", WITHIN)
        assert learned is not None and learned - done <= WITHIN, reader.heard
        assert [at for at in reader.heard_at(pipeline) if done - 0.5 <= at <= done + WITHIN], reader.heard
        assert outsider.heard == []  # may read none of them: told nothing


@pytest.mark.parametrize("era", ["legacy", "listen"])
async def test_a_job_failed_by_another_server_process_reaches_subscribers(runtime, owner, tmp_path, era):
    job_id = (await pending_flow(owner))["job_id"]
    job = f"datamachine://jobs/{job_id}"
    stranger = await stranger_params(runtime, tmp_path)
    # the other server is up first: the change lands right after the subscriptions begin
    async with (
        Client(server_params(runtime, tmp_path), mode="legacy") as other,
        subscribed(server_params(runtime, tmp_path), era, {job: job_status}) as reader,
        subscribed(stranger, era, {}, job) as outsider,
    ):
        await call(other, "fail-job", {"job_id": job_id, "reason": "stopped elsewhere"})
        done = time.monotonic()
        learned = await reader.learns(job, "failed", WITHIN + 1)
        assert learned is not None, f"{era}: no update after fail-job in another process ({reader.heard})"
        assert learned - done <= WITHIN
        assert outsider.heard == []


@pytest.mark.parametrize("era", ["legacy", "listen"])
async def test_a_pipeline_created_or_deleted_by_another_process_changes_the_list(runtime, owner, tmp_path, era):
    async with (
        Client(server_params(runtime, tmp_path), mode="legacy") as other,
        subscribed(server_params(runtime, tmp_path), era, {}, "datamachine://pipelines") as reader,
    ):
        made = await call(other, "create-pipeline", {"pipeline_name": "Elsewhere"})
        await _heard_again(reader, "datamachine://pipelines", count=1)
        await call(other, "delete-pipeline", {"pipeline_id": made["pipeline_id"]})
        await _heard_again(reader, "datamachine://pipelines", count=2)


async def _heard_again(reader: Subscriber, uri: str, count: int) -> None:
    """The list URI was updated and resources/list_changed sent ``count`` times in all, within 2 s."""
    with anyio.move_on_after(WITHIN):
        while len(reader.heard_at(uri)) < count or len(reader.list_changes) < count:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    assert len(reader.heard_at(uri)) >= count and len(reader.list_changes) >= count, (reader.heard, reader.list_changes)


@pytest.mark.parametrize("era", ["legacy", MODERN])
async def test_http_sessions_hear_changes_made_by_another_process(runtime, owner, tmp_path, era):
    job_id = (await pending_flow(owner))["job_id"]
    uri = f"datamachine://jobs/{job_id}"
    token = (await mint_token(runtime, user_id=1))["raw_token"]
    heard: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            heard.append(str(message.params.uri))

    async with (
        Client(server_params(runtime, tmp_path), mode="legacy") as other,
        http_listening(runtime) as base,
        mcp_client(base, token, mode=era, message_handler=on_message) as client,
        anyio.create_task_group() as tg,
    ):
        if era == "legacy":
            await client.subscribe_resource(uri)
            await anyio.sleep(0.3)  # the client opens its GET stream for server messages
        else:
            await tg.start(_listen, client, uri, heard)
        await call(other, "fail-job", {"job_id": job_id})
        with anyio.fail_after(WITHIN):
            while uri not in heard:  # noqa: ASYNC110 - the client's own tasks fill it
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()


async def _listen(client: Client, uri: str, heard: list[str], *, task_status: Any) -> None:
    async with client.listen(resource_subscriptions=[uri]) as stream:
        task_status.started()
        async for event in stream:
            if isinstance(event, ResourceUpdated):
                heard.append(event.uri)
