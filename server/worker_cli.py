"""``datamachine-mcp worker``: the engine (worker, scheduler, maintenance) without an MCP transport.

SIGTERM or SIGINT stops it gracefully: it stops claiming, hands running jobs back and leaves no
lease behind, within a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from datamachine_mcp.engine.host import EngineHost
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime

log = logging.getLogger("datamachine.worker")
STOP_GRACE_SECONDS = 10.0


async def run_worker(cfg: ProcessConfig) -> int:
    runtime = await open_runtime(cfg)
    engine = runtime.engine
    assert engine is not None  # open_runtime attaches one
    host = EngineHost(engine, concurrency=cfg.concurrency)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await host.start()
        log.info("worker %s running on %s (concurrency %s)", engine.worker_id, runtime.db.describe(), cfg.concurrency)
        await stop.wait()
        log.info("stopping: handing running jobs back")
    finally:
        await host.stop(grace=STOP_GRACE_SECONDS)
        await runtime.db.dispose()
    return 0
