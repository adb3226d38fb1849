"""Serving MCP over stdio: nothing but the protocol on stdout, diagnostics on stderr.

The first answers come first: tools are listed from the tool cache without importing the ability
modules, and the in-process engine (worker, scheduler, maintenance) and the watch for other processes'
changes start once the session's first request after the handshake is answered (see
``DataMachineServer.serve``).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from mcp.server.stdio import stdio_server

from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.resources.registry import load_all as load_resources
from datamachine_mcp.server.app import DataMachineServer
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime, stdio_identity

if TYPE_CHECKING:
    from datamachine_mcp.engine.host import EngineHost

log = logging.getLogger("datamachine.server")

CONNECT_HINT = """\
datamachine-mcp speaks the Model Context Protocol on stdin/stdout; it is meant to be started by an MCP client.
Claude Desktop (claude_desktop_config.json):
  {{"mcpServers": {{"datamachine": {{"command": "datamachine-mcp", "args": ["--db", "{db}"]}}}}}}
Serving on this terminal now (database {db}); press Ctrl-D or Ctrl-C to stop.
"""


class _Engine:
    """The in-process engine host, started late and stopped (if it started) when the session ends."""

    def __init__(self, services: EngineServices, concurrency: int) -> None:
        self.services = services
        self.concurrency = concurrency
        self.host: EngineHost | None = None

    async def start(self) -> None:
        from datamachine_mcp.engine.host import EngineHost  # the engine and SQLAlchemy load here

        self.host = EngineHost(self.services, concurrency=self.concurrency)
        await self.host.start()

    async def stop(self) -> None:
        if self.host is not None:
            await self.host.stop()


async def serve_stdio(cfg: ProcessConfig) -> int:
    runtime = await open_runtime(cfg)
    engine: _Engine | None = None
    try:
        resolver = await stdio_identity(runtime, cfg)
        app = DataMachineServer(runtime, runtime.catalog, load_resources(), resolver)
        if cfg.worker:
            assert runtime.engine is not None  # open_runtime attaches one
            engine = _Engine(runtime.engine, cfg.concurrency)
        if sys.stdin.isatty():
            sys.stderr.write(CONNECT_HINT.format(db=runtime.db.describe()))
        async with stdio_server() as (read_stream, write_stream):
            await app.serve(read_stream, write_stream, start=engine.start if engine is not None else None)
    finally:
        if engine is not None:
            await engine.stop()
        await runtime.db.dispose()
    return 0
