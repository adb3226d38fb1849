"""Changes committed by other processes, found once per process and handed to the notifications.

A process announces its own changes when it commits them. Those of another process (a
``datamachine-mcp worker``, another stdio or HTTP server on the same database) are found here, with
one query per second however many sessions subscribed:

* The query reads the current ``updated_at`` of every subscribed job, flow and pipeline (primary-key
  lookups), the newest change and the count of each subscribed pipeline's flows, and the count and
  newest change of all pipelines (the pipeline list). Whatever differs from the previous pass is
  announced, deletions included. Comparing values, not "newer than the newest seen", also catches a
  commit whose timestamp was taken before another's.
* On PostgreSQL the ids also arrive at once through ``LISTEN datamachine_changes`` (migration 0005);
  while that connection is up the poll pauses, and it resumes from its last pass when it drops.

A change made in this process can be announced twice (at its commit, then found here): a
notification only says "read it again".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.reads import sqlite_connection
from datamachine_mcp.storage.timeutil import utcnow

log = logging.getLogger("datamachine.server")

WATCH_SECONDS = 1.0
# A subscription's first pass announces a row changed this long before it began (clock and commit lag):
# a spare notification is harmless, a lost one is not.
FIRST_PASS_MARGIN = timedelta(seconds=1)
CHUNK = 5000  # ids per IN list (well under SQLite's and asyncpg's bound-parameter limits)

JOBS = "datamachine://jobs/"
FLOWS = "datamachine://flows/"
PIPELINES = "datamachine://pipelines"
LIST = ("L", 0)  # the pipeline list

Key = tuple[str, int]  # ("j", job_id), ("f", flow_id), ("p", pipeline_id), ("e", flows of pipeline_id), LIST
State = tuple[datetime | None, int]  # (newest updated_at, row count)


class Announcer(Protocol):
    """What the watch needs of the process's notifications."""

    def watched(self) -> dict[str, datetime]: ...

    async def resource_updated(self, uri: str) -> None: ...

    async def resources_list_changed(self) -> None: ...

    async def jobs_changed(self, job_ids: Iterable[int]) -> None: ...

    async def flows_changed(self, flows: Iterable[tuple[int, int]]) -> None: ...


def _ids(uri: str, prefix: str) -> int | None:
    tail = uri[len(prefix) :] if uri.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def keys_of(watched: dict[str, datetime], started: datetime) -> dict[Key, datetime]:
    """The rows worth reading for the watched URIs, each with when it began to be watched."""
    out: dict[Key, datetime] = {LIST: started}
    for uri, since in watched.items():
        if (job_id := _ids(uri, JOBS)) is not None:
            keys: tuple[Key, ...] = (("j", job_id),)
        elif (flow_id := _ids(uri, FLOWS)) is not None:
            keys = (("f", flow_id),)
        elif (pipeline_id := _ids(uri, PIPELINES + "/")) is not None:
            keys = (("p", pipeline_id), ("e", pipeline_id))
        else:
            continue  # the pipeline list is always read; other resources change only in-process
        for key in keys:
            out[key] = min(since, out.get(key, since))
    return out


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def poll_query(keys: Iterable[Key]) -> tuple[str, dict[str, list[int]]]:
    """One query for every key: rows ``(kind, id, newest updated_at, count)``; a missing row is gone.
    Its text has an ``IN :name`` list per chunk of ids; the lists are returned beside it."""
    by_kind: dict[str, list[int]] = {"j": [], "f": [], "p": []}
    for kind, ident in keys:
        if kind in by_kind:
            by_kind[kind].append(ident)
    parts = ["SELECT 'L' AS kind, 0 AS id, max(updated_at) AS stamp, count(*) AS n FROM datamachine_pipelines"]
    templates = {
        "j": ["SELECT 'j', job_id, updated_at, 1 FROM datamachine_jobs WHERE job_id IN :{name}"],
        "f": ["SELECT 'f', flow_id, updated_at, 1 FROM datamachine_flows WHERE flow_id IN :{name}"],
        "p": [
            "SELECT 'p', pipeline_id, updated_at, 1 FROM datamachine_pipelines WHERE pipeline_id IN :{name}",
            "SELECT 'e', pipeline_id, max(updated_at), count(*) FROM datamachine_flows "
            "WHERE pipeline_id IN :{name} GROUP BY pipeline_id",
        ],
    }
    values: dict[str, list[int]] = {}
    for kind, ids in by_kind.items():
        for n, chunk in enumerate(_chunks(sorted(ids))):
            name = f"{kind}{n}"
            values[name] = chunk
            parts += [t.format(name=name) for t in templates[kind]]
    return " UNION ALL ".join(parts), values


def poll_statement(keys: Iterable[Key]) -> Any:
    """``poll_query`` as a SQLAlchemy statement (its lists expanding bound parameters)."""
    from sqlalchemy import bindparam, text

    sql, values = poll_query(keys)
    stmt = text(sql).bindparams(*(bindparam(n, expanding=True) for n in values))
    return stmt.bindparams(**values) if values else stmt


def sqlite_poll(db: Database, keys: Iterable[Key]) -> Sequence[Any]:
    """``poll_query`` on a pooled ``sqlite3`` connection: the once-a-second poll of an idle process
    neither loads nor pays for SQLAlchemy."""
    sql, values = poll_query(keys)
    args: list[int] = []

    def expand(match: re.Match[str]) -> str:
        ids = values[match.group(1)]
        args.extend(ids)
        return "IN (" + ", ".join("?" * len(ids)) + ")"

    with sqlite_connection(db) as conn:
        return conn.execute(_LIST.sub(expand, sql), args).fetchall()


_LIST = re.compile(r"IN :([a-z][0-9]+)")


def _stamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite hands back the stored text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ChangeWatch:
    """The process's watch over one database (``Notifications.watch_other_processes`` runs it)."""

    def __init__(
        self,
        notifications: Announcer,
        db: Database,
        *,
        every: float = WATCH_SECONDS,
        ready: asyncio.Event | None = None,
    ) -> None:
        self._notifications = notifications
        self._db = db
        self._every = every
        self._ready = ready  # set once the baseline is read: changes from then on are announced
        self._started = utcnow()
        self._last: dict[Key, State | None] = {}
        self._wake = asyncio.Event()
        self._heard: list[str] = []  # NOTIFY payloads not handled yet
        self._listening = False
        self._catch_up = False

    async def run(self) -> None:
        """Watch until cancelled."""
        if self._db.dialect != "postgresql":
            await self._loop()
            return
        from datamachine_mcp.engine.pg_listen import CHANGES_CHANNEL, shared_listener

        listener = shared_listener(self._db.url)
        async with listener.follow(CHANGES_CHANNEL, self._on_notify, on_connect=self._on_listen, on_lost=self._on_lost):
            await self._loop()

    async def _loop(self) -> None:
        await self.poll()  # the baseline: a change from now on differs from it
        if self._ready is not None:
            self._ready.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._every)
            self._wake.clear()
            heard, self._heard = self._heard, []
            for payload in heard:
                await self._announce_payload(payload)
            if self._listening and not self._catch_up:
                continue
            self._catch_up = False
            await self.poll()

    # --- PostgreSQL LISTEN ----------------------------------------------------------------------

    def _on_notify(self, payload: str) -> None:
        self._heard.append(payload)
        self._wake.set()

    def _on_listen(self) -> None:
        self._listening = True
        self._catch_up = True  # what changed while nobody listened
        self._wake.set()

    def _on_lost(self) -> None:
        self._listening = False
        self._wake.set()

    async def _announce_payload(self, payload: str) -> None:
        """``<kind>:<id>,<id>,…`` from the triggers of migration 0005."""
        kind, _, ids = payload.partition(":")
        try:
            if kind == "j":
                await self._notifications.jobs_changed(int(i) for i in ids.split(","))
            elif kind == "f":
                pairs = [pair.split("/") for pair in ids.split(",")]
                await self._notifications.flows_changed((int(f), int(p)) for f, p in pairs)
            elif kind in ("p", "P"):
                for pipeline_id in ids.split(","):
                    await self._notifications.resource_updated(f"{PIPELINES}/{int(pipeline_id)}")
                await self._notifications.resource_updated(PIPELINES)
                if kind == "P":  # created or deleted
                    await self._notifications.resources_list_changed()
        except ValueError:
            log.debug("ignored a malformed change notification %r", payload)

    # --- polling --------------------------------------------------------------------------------

    async def poll(self) -> None:
        """One pass: read the watched rows, announce what differs from the previous pass."""
        keys = keys_of(self._notifications.watched(), self._started)
        try:
            if self._db.is_sqlite and self._db.path is not None:
                rows = sqlite_poll(self._db, keys)
            else:
                async with self._db.read() as session:
                    rows = (await session.execute(poll_statement(keys))).all()
        except Exception:
            log.debug("change watch query failed", exc_info=True)
            return
        now: dict[Key, State] = {(kind, int(ident)): (_stamp(stamp), int(n)) for kind, ident, stamp, n in rows}
        for key, since in keys.items():
            state = now.get(key)
            if key in self._last:
                before = self._last[key]
                changed = before != state
            else:  # first pass for this key: changed only if after it began to be watched
                before = None
                changed = state is not None and state[0] is not None and state[0] >= since - FIRST_PASS_MARGIN
            self._last[key] = state
            if changed:
                await self._announce(key, before, state)
        for key in set(self._last) - set(keys):
            del self._last[key]

    async def _announce(self, key: Key, before: State | None, after: State | None) -> None:
        kind, ident = key
        if kind == "j":
            await self._notifications.jobs_changed([ident])
        elif kind == "f":
            await self._notifications.resource_updated(f"{FLOWS}{ident}")
        elif kind in ("p", "e"):
            await self._notifications.resource_updated(f"{PIPELINES}/{ident}")
        else:
            await self._notifications.resource_updated(PIPELINES)
            if before is not None and after is not None and before[1] != after[1]:
                await self._notifications.resources_list_changed()  # pipelines created or deleted
