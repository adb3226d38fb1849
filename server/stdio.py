"""Serving MCP over stdio: nothing but the protocol on stdout, diagnostics on stderr.

The first answers come first: tools are listed from the tool cache without importing the ability
modules, and the in-process engine (worker, scheduler, maintenance) and the watch for other processes'
changes start once the session's first request after the handshake is answered (see
``DataMachineServer.serve``); on a SQLite file the engine's loops wait for work (``engine.idle``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import mcp_types as types
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from datamachine_mcp.engine.idle import LazyEngineHost
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


def bad_line_reply(exc: Exception) -> SessionMessage | None:
    """The JSON-RPC error for a line the transport could not read as a message, or None (no answer).

    Not JSON (including nesting deeper than the parser allows and lone surrogate escapes): -32700
    with id null. JSON but not a JSON-RPC message: -32600, with the id when one can be read. Blank
    lines and malformed responses get no answer (a response is never answered).
    """
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else []
    if not errors:
        return None
    if errors[0]["type"] == "json_invalid":
        if isinstance(errors[0].get("input"), str) and not errors[0]["input"].strip():
            return None
        error = types.ErrorData(code=types.PARSE_ERROR, message=f"Parse error: {errors[0]['msg']}")
        return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=None, error=error))
    parsed = next((e["input"] for e in errors if isinstance(e.get("input"), dict)), None)
    if isinstance(parsed, dict) and "method" not in parsed and ("result" in parsed or "error" in parsed):
        return None
    ident = parsed.get("id") if isinstance(parsed, dict) else None
    if isinstance(ident, bool) or not isinstance(ident, int | str):
        ident = None
    message = "Invalid Request: not a JSON-RPC 2.0 request or notification"
    error = types.ErrorData(code=types.INVALID_REQUEST, message=message)
    return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=ident, error=error))


class _AnsweringBadLines:
    """The transport's read stream with the lines it could not parse answered and left out (the SDK's
    stdio reader passes them on as exceptions, which the session would only log: the client would
    wait for an answer forever). It reads in the session's own task: no extra hop per message."""

    def __init__(self, source: Any, write_stream: Any) -> None:
        self._source = source
        self._write = write_stream

    @property
    def last_context(self) -> Any:
        """The sender's context of the message last received (the session restores it)."""
        return getattr(self._source, "last_context", None)

    async def receive(self) -> SessionMessage:
        while True:
            item = await self._source.receive()
            if not isinstance(item, Exception):
                return item
            log.warning("unreadable message on stdin: %s", item.__class__.__name__)
            reply = bad_line_reply(item)
            if reply is not None:
                try:
                    await self._write.send(reply)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    raise anyio.EndOfStream from None

    def __aiter__(self) -> _AnsweringBadLines:
        return self

    async def __anext__(self) -> SessionMessage:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._source.aclose()

    async def __aenter__(self) -> _AnsweringBadLines:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def serve_answering_bad_lines(
    app: DataMachineServer, read_stream: Any, write_stream: Any, start: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Serve ``app``, answering the lines the transport could not read as messages; ``start``: see
    ``DataMachineServer.serve``."""
    await app.serve(_AnsweringBadLines(read_stream, write_stream), write_stream, start=start)


async def serve_stdio(cfg: ProcessConfig) -> int:
    runtime = await open_runtime(cfg)
    engine: LazyEngineHost | None = None
    try:
        resolver = await stdio_identity(runtime, cfg)
        app = DataMachineServer(runtime, runtime.catalog, load_resources(), resolver)
        if cfg.worker:
            assert runtime.engine is not None  # open_runtime attaches one
            engine = LazyEngineHost(runtime.engine, concurrency=cfg.concurrency)
        if sys.stdin.isatty():
            sys.stderr.write(CONNECT_HINT.format(db=runtime.db.describe()))
        async with stdio_server() as (read_stream, write_stream):
            start = engine.start if engine is not None else None
            await serve_answering_bad_lines(app, read_stream, write_stream, start)
    finally:
        if engine is not None:
            await engine.stop()
        await runtime.db.dispose()
    return 0
