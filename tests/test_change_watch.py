"""The cross-process change watch (docs/architecture.md, Notifications) against a real database.

Rows are changed with plain SQL through the test's own connection, which announces nothing: to the
watch they are another process's commits. Subscribers are real MCP clients of an in-process server.
"""

from __future__ import annotations

import time
from datetime import timedelta

import anyio
import mcp_types as types
import pytest
from mcp import Client
from sqlalchemy import delete, text, update

from datamachine_mcp.server.change_watch import ChangeWatch
from datamachine_mcp.storage.models import Job
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import make_server
from tests.jobs_support import echo_step, make_flow, run
from tests.test_resources import Inbox

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.backends,
    pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed"),
]

WITHIN = 2.0


async def pending_jobs(owner: Client, n: int) -> list[int]:
    made = await make_flow(owner, [echo_step(done=True)], name="Watched")
    return [(await run(owner, made["flow_id"]))["job_id"] for _ in range(n)]


async def stamp(runtime, job_id: int, at) -> None:
    async with runtime.db.write() as session:
        await session.execute(update(Job).where(Job.job_id == job_id).values(updated_at=at))


def updated(inbox: Inbox) -> list[str]:
    return [str(n.params.uri) for n in inbox.of(types.ResourceUpdatedNotification)]


async def heard(inbox: Inbox, uri: str, times: int, seconds: float = WITHIN) -> float:
    """Seconds until ``uri`` had been announced ``times`` times (fails after ``seconds``)."""
    start = time.monotonic()
    with anyio.fail_after(seconds):
        while updated(inbox).count(uri) < times:  # noqa: ASYNC110 - the client's receive loop fills it
            await anyio.sleep(0.01)
    return time.monotonic() - start


async def test_a_commit_stamped_before_the_newest_seen_is_still_announced(runtime, owner):
    first, second = await pending_jobs(owner, 2)
    for job_id in (first, second):  # changed long before the subscription: its first pass is quiet
        await stamp(runtime, job_id, utcnow() - timedelta(hours=1))
    app = make_server(runtime)
    inbox = Inbox()
    async with Client(app.server, mode="legacy", message_handler=inbox) as client:
        for job_id in (first, second):
            await client.subscribe_resource(f"datamachine://jobs/{job_id}")
        watch = ChangeWatch(app.notifications, runtime.db)
        await watch.poll()  # the baseline
        now = utcnow()
        await stamp(runtime, second, now)
        await watch.poll()
        await heard(inbox, f"datamachine://jobs/{second}", 1)
        # a transaction that took its timestamp earlier but committed later (it waited for a lock)
        await stamp(runtime, first, now - timedelta(seconds=5))
        await watch.poll()
        await heard(inbox, f"datamachine://jobs/{first}", 1)
        # deleted by another process (retention, clear-jobs): its subscriber is told too
        async with runtime.db.write() as session:
            await session.execute(delete(Job).where(Job.job_id == second))
        await watch.poll()
        await heard(inbox, f"datamachine://jobs/{second}", 2)
        await anyio.sleep(0.3)
        await watch.poll()  # nothing changed since: nothing more
        await anyio.sleep(0.3)
    assert updated(inbox).count(f"datamachine://jobs/{first}") == 1
    assert updated(inbox).count(f"datamachine://jobs/{second}") == 2


LISTENING = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND query LIKE 'LISTEN%datamachine_changes%' AND pid <> pg_backend_pid()"
)


async def listener_pid(runtime) -> int | None:
    async with runtime.db.read() as session:
        return (await session.execute(text(LISTENING))).scalar()


async def test_changes_arrive_within_two_seconds_even_while_listen_is_down(runtime, owner, db_backend):
    (job_id,) = await pending_jobs(owner, 1)
    uri = f"datamachine://jobs/{job_id}"
    app = make_server(runtime)
    inbox = Inbox()
    async with (
        Client(app.server, mode="legacy", message_handler=inbox) as client,
        anyio.create_task_group() as tg,
    ):
        await client.subscribe_resource(uri)
        tg.start_soon(app.notifications.watch_other_processes, runtime.db)
        if db_backend == "postgresql":
            with anyio.fail_after(10):
                while await listener_pid(runtime) is None:  # noqa: ASYNC110 - another process state
                    await anyio.sleep(0.05)
        else:
            await anyio.sleep(0.2)  # the watch's baseline pass
        await stamp(runtime, job_id, utcnow())
        first = await heard(inbox, uri, 1)
        if db_backend == "postgresql":
            assert first < 0.5  # NOTIFY, not the poll
            pid = await listener_pid(runtime)
            async with runtime.db.write() as session:
                await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await anyio.sleep(0.3)  # past the 250 ms coalescing window
            await stamp(runtime, job_id, utcnow())  # nobody LISTENs now: the poll finds it
            await heard(inbox, uri, 2)
            with anyio.fail_after(20):  # the connection comes back (after a pause) and serves again
                while (again := await listener_pid(runtime)) is None or again == pid:  # noqa: ASYNC110
                    await anyio.sleep(0.2)
            await anyio.sleep(0.3)
            await stamp(runtime, job_id, utcnow())
            assert await heard(inbox, uri, 3) < 0.5
        tg.cancel_scope.cancel()
