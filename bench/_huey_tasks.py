"""The trivial 2-step job for huey (bench/peers.py): step 1 hands its result to step 2 (a pipeline), each
step a queued, persisted task. The database path comes from PEERS_HUEY_DB."""

from __future__ import annotations

import os
import time

from huey import SqliteHuey

huey = SqliteHuey(filename=os.environ.get("PEERS_HUEY_DB", "/tmp/peers-huey.db"))


@huey.task()
def step1(n: int) -> tuple:
    return (n, time.time())  # a tuple result becomes step 2's positional arguments


@huey.task()
def step2(n: int, started: float) -> list:
    return [started, time.time()]
