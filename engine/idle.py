"""The in-process engine while its database has no engine work: one light query a second.

A server's worker, scheduler and maintenance loops need SQLAlchemy and the engine's modules; a
server whose database has nothing for them to do need not hold either. ``LazyEngineHost`` watches a
SQLite file with one query per poll on a plain ``sqlite3`` connection and starts the full
``EngineHost`` once there is work (docs/engine.md, The engine while idle). The probe over-approximates:
a false "work" only loads the engine early; it never reports "none" while a loop has something to do.
It also records the worker heartbeat, so system-health-check sees this process's worker as active.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from datamachine_mcp.engine import status as st
from datamachine_mcp.storage.db import begin_immediate, configure_sqlite
from datamachine_mcp.storage.reads import sqlite_connection
from datamachine_mcp.storage.timeutil import iso, utcnow

if TYPE_CHECKING:
    from datamachine_mcp.engine.host import EngineHost
    from datamachine_mcp.engine.runtime import EngineServices

log = logging.getLogger("datamachine.engine")

LIVENESS_KEY = "worker_heartbeat"
LIVENESS_SECONDS = 15  # how often a worker refreshes its heartbeat
RETENTION_KEY = "maintenance_last_retention_at"  # stamped by each daily retention run
RETENTION_EVERY = timedelta(hours=24)

_ACTIVE = ", ".join(f"'{s}'" for s in st.ACTIVE)
# One row: any unfinished job (the worker claims pending ones, recovery watches leases, waits and batch
# parents); the earliest scheduled run (the scheduler fires it once due); a recurring flow without a next
# run (maintenance restores it); any item claim (maintenance sweeps inactive ones); the last retention run.
PROBE = f"""
SELECT
  EXISTS (SELECT 1 FROM datamachine_jobs WHERE status IN ({_ACTIVE})),
  (SELECT min(next_run_at) FROM datamachine_flows WHERE next_run_at IS NOT NULL),
  EXISTS (SELECT 1 FROM datamachine_flows WHERE next_run_at IS NULL
          AND json_extract(scheduling_config, '$.interval') NOT IN ('manual', 'one_time')),
  EXISTS (SELECT 1 FROM datamachine_processed_items WHERE status = 'claimed'),
  (SELECT updated_at FROM datamachine_settings WHERE key = '{RETENTION_KEY}')
"""


def _stamp(value: str | None) -> datetime | None:
    """A stored SQLite datetime (naive UTC text) as an aware datetime."""
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def work_reason(row: tuple[Any, ...], now: datetime) -> str | None:
    """Why the engine is needed now, given a ``PROBE`` row; None while there is nothing for it to do."""
    active, next_run, unscheduled, claims, retention = row
    if active:
        return "unfinished jobs"
    due = _stamp(next_run)
    if due is not None and due <= now:
        return "a due flow"
    if unscheduled:
        return "a recurring flow without a next run"
    if claims:
        return "item claims"
    last = _stamp(retention)
    if last is None or last <= now - RETENTION_EVERY:
        return "retention is due"
    return None


def merge_beats(beats: dict[str, Any] | None, worker_id: str, now: datetime) -> dict[str, str]:
    """The heartbeat map with this worker's beat at ``now``, beats older than an hour dropped."""
    oldest = iso(now - timedelta(hours=1))
    kept = {w: at for w, at in (beats or {}).items() if isinstance(at, str) and at >= oldest}
    kept[worker_id] = iso(now)
    return kept


def _sqlite_ts(value: datetime) -> str:
    """As SQLAlchemy stores an aware datetime on SQLite: naive UTC, six fraction digits."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


class LazyEngineHost:
    """The in-process engine, started at once on PostgreSQL (and SQLite in memory), and on a SQLite file
    once the probe finds work or this process wakes the engine (a job created here)."""

    def __init__(self, services: EngineServices, *, concurrency: int, poll_seconds: float = 1.0) -> None:
        self.services = services
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.host: EngineHost | None = None
        self._watch: asyncio.Task[None] | None = None
        self._writer: sqlite3.Connection | None = None
        self._beat_at: datetime | None = None

    async def start(self) -> None:
        db = self.services.db
        if db.dialect != "sqlite" or db.path is None:
            await self._start_host()
            return
        self._watch = asyncio.create_task(self._idle(), name="engine-idle")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        self._close_writer()
        if self.host is not None:
            await self.host.stop()

    async def _start_host(self) -> None:
        from datamachine_mcp.engine.host import EngineHost  # the engine and SQLAlchemy load here

        self.host = EngineHost(self.services, concurrency=self.concurrency)
        await self.host.start()

    async def _idle(self) -> None:
        while True:
            try:
                reason = self.probe()
            except Exception:
                log.exception("engine idle probe failed; starting the engine")
                reason = "the probe failed"
            if reason is not None:
                log.debug("starting the engine: %s", reason)
                self._close_writer()
                await self._start_host()
                return
            await self._record_liveness()
            await self.services.wait_for_wake(self.poll_seconds)

    def probe(self) -> str | None:
        with sqlite_connection(self.services.db) as conn:
            row = conn.execute(PROBE).fetchone()
        return work_reason(row, utcnow())

    async def _record_liveness(self) -> None:
        now = utcnow()
        if self._beat_at is not None and (now - self._beat_at).total_seconds() < LIVENESS_SECONDS:
            return
        self._beat_at = now
        db = self.services.db
        lock = db.write_lock
        assert lock is not None and db.path is not None
        try:
            async with lock:
                if self._writer is None:
                    self._writer = sqlite3.connect(str(db.path), isolation_level=None, check_same_thread=False)
                    configure_sqlite(self._writer, write=True)
                conn = self._writer
                await begin_immediate(conn, db.busy_timeout_ms)
                try:
                    found = conn.execute("SELECT value FROM datamachine_settings WHERE key = ?", (LIVENESS_KEY,))
                    row = found.fetchone()
                    current = json.loads(row[0]) if row and row[0] else None
                    beats = merge_beats(current if isinstance(current, dict) else None, self.services.worker_id, now)
                    conn.execute(
                        "INSERT INTO datamachine_settings (key, value, is_secret, updated_at) VALUES (?, ?, 0, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                        (LIVENESS_KEY, json.dumps(beats), _sqlite_ts(now)),
                    )
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
        except Exception:
            log.debug("could not record worker liveness", exc_info=True)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
