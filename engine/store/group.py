"""Group commit: the step commits of several jobs that finish at the same moment share one transaction.

A worker running several jobs at once submits each step commit here. Submissions made while no group is
being written start one on the next loop turn, and every submission made meanwhile joins it, so N
concurrent jobs cost one BEGIN/COMMIT (one fsync on PostgreSQL) instead of N. A commit whose guard misses
(its lease was lost) fails alone: its writes are undone to a savepoint when it had written before its
guarded update, and its queued log rows are dropped. If the group fails as a whole, each member is
committed again on its own, so one bad commit never takes the others with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from datamachine_mcp.engine.store import JobStore
from datamachine_mcp.engine.store.base import GuardMissed, StoreTx

Work = Callable[[StoreTx], Awaitable[Any]]


class GroupCommitter:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._pending: list[tuple[Work, bool, asyncio.Future[Any]]] = []
        self._draining = False

    async def submit(self, work: Work, *, isolate: bool = False) -> Any:
        """Run ``work(tx)`` in the next group's transaction; returns its result once committed.

        ``isolate``: the work may write before its guarded update, so a guard miss must roll back to a
        savepoint (plain commits, whose guarded update is their first write, need none).
        ``work`` must be repeatable: it may run a second time on its own after a failed group.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((work, isolate, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._drain()))
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                if len(batch) == 1:
                    await self._alone(*batch[0])
                else:
                    await self._group(batch)
        finally:
            self._draining = False

    async def _alone(self, work: Work, _isolate: bool, future: asyncio.Future[Any]) -> None:
        try:
            async with self.store.transaction() as tx:
                result = await work(tx)
        except BaseException as exc:  # handed to the submitter
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)

    async def _group(self, batch: list[tuple[Work, bool, asyncio.Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            async with self.store.transaction() as tx:
                for work, isolate, _ in batch:
                    outcomes.append(await self._member(tx, work, isolate))
        except Exception:
            for member in batch:  # the group failed as a whole: each on its own
                await self._alone(*member)
            return
        for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    @staticmethod
    async def _member(tx: StoreTx, work: Work, isolate: bool) -> tuple[bool, Any]:
        logs = tx.log_mark()
        if not isolate:
            try:
                return True, await work(tx)
            except GuardMissed as lost:
                tx.log_reset(logs)
                return False, lost
        name = await tx.savepoint()
        try:
            value = await work(tx)
        except GuardMissed as lost:
            await tx.rollback_to(name)
            tx.log_reset(logs)
            return False, lost
        await tx.release_savepoint(name)
        return True, value
