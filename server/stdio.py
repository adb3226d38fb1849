"""Serving MCP over stdio: nothing but the protocol on stdout, diagnostics on stderr."""

from __future__ import annotations

import logging
import sys

from mcp.server.stdio import stdio_server

from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.engine.host import EngineHost
from datamachine_mcp.resources.registry import load_all as load_resources
from datamachine_mcp.server.app import DataMachineServer
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime, stdio_identity

log = logging.getLogger("datamachine.server")

CONNECT_HINT = """\
datamachine-mcp speaks the Model Context Protocol on stdin/stdout; it is meant to be started by an MCP client.
Claude Desktop (claude_desktop_config.json):
  {{"mcpServers": {{"datamachine": {{"command": "datamachine-mcp", "args": ["--db", "{db}"]}}}}}}
Serving on this terminal now (database {db}); press Ctrl-D or Ctrl-C to stop.
"""


async def serve_stdio(cfg: ProcessConfig) -> int:
    runtime = await open_runtime(cfg)
    host: EngineHost | None = None
    try:
        resolver = await stdio_identity(runtime, cfg)
        app = DataMachineServer(runtime, load_abilities(), load_resources(), resolver)
        if cfg.worker:
            assert runtime.engine is not None  # open_runtime attaches one
            host = EngineHost(runtime.engine, concurrency=cfg.concurrency)
            await host.start()
        if sys.stdin.isatty():
            sys.stderr.write(CONNECT_HINT.format(db=runtime.db.describe()))
        async with stdio_server() as (read_stream, write_stream):
            await app.serve(read_stream, write_stream)
    finally:
        if host is not None:
            await host.stop()
        await runtime.db.dispose()
    return 0
