"""``datamachine-mcp serve --http [HOST:]PORT``: the HTTP listener as a process, served by uvicorn.

The socket is bound before anything else (a taken port is a start-up error, and port 0 picks a free one
whose number the start-up line reports); SIGTERM or SIGINT stops it gracefully: no new connections,
requests in flight get a few seconds, open streams are drained, then the engine hands its running jobs
back and the database is closed. The process then exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import uvicorn
from starlette.types import ASGIApp

from datamachine_mcp.server.bootstrap import ProcessConfig, StartupError, open_runtime
from datamachine_mcp.server.http_app import MCP_PATH, HttpOptions, build_app
from datamachine_mcp.server.http_guards import HeadTimeoutH11, security_settings

log = logging.getLogger("datamachine.http")

DEFAULT_HOST = "127.0.0.1"
GRACEFUL_SECONDS = 5  # what requests and streams still open at SIGTERM get before they are cancelled
KEEP_ALIVE_SECONDS = 15  # an idle kept-alive connection is closed after this
MAX_CONNECTIONS = 1000  # beyond this, new requests get 503 at once
WILDCARD_HOSTS = ("0.0.0.0", "::")


def parse_listen(value: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` → (host, port); the host defaults to 127.0.0.1."""
    text = value.strip()
    host, port_text = DEFAULT_HOST, text
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        host = host or DEFAULT_HOST
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise StartupError(f"--http {value!r}: give PORT or HOST:PORT, e.g. 8765 or 0.0.0.0:8765")
    return host, int(port_text)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a kept-alive response written in two parts waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {url_host(host)}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, announcing when it listens and exiting normally after a signal (uvicorn re-raises
    the signal once it has shut down, which would end the process with the signal's status)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None], *, signals: bool) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._signals = signals

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self._signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        # Bound-method handlers, as uvicorn installs them: SSE responses look for them to drain on exit.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def listener(app: ASGIApp, on_started: Callable[[], None] = lambda: None, *, signals: bool = True) -> uvicorn.Server:
    """uvicorn serving ``app`` with this listener's protocol and limits (``serve`` it on a bound socket)."""
    config = uvicorn.Config(
        app,
        http=HeadTimeoutH11,
        lifespan="on",
        log_config=None,
        access_log=log.isEnabledFor(logging.INFO),
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        limit_concurrency=MAX_CONNECTIONS,
        server_header=False,
    )
    return _Server(config, on_started, signals=signals)


async def serve_http(cfg: ProcessConfig, listen: str) -> int:
    if cfg.token or cfg.agent:
        raise StartupError("--token and --agent apply to stdio; over HTTP each request's bearer token decides")
    host, port = parse_listen(listen)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    public = (cfg.public_base_url or f"http://{url_host(host)}:{port}").rstrip("/")
    try:
        runtime = await open_runtime(replace(cfg, public_base_url=public))
    except BaseException:
        sock.close()
        raise
    try:
        options = HttpOptions(
            security=security_settings(host, port, public, cfg.allow_origins),
            worker=cfg.worker,
            concurrency=cfg.concurrency,
        )
        app = build_app(runtime, options)

        def started() -> None:
            engine = f"worker on (concurrency {cfg.concurrency})" if cfg.worker else "no worker (--no-worker)"
            sys.stderr.write(
                f"datamachine-mcp: serving MCP at http://{url_host(host)}:{port}{MCP_PATH} "
                f"(database {runtime.db.describe()}; public URL {public}; {engine})\n"
            )
            if host in WILDCARD_HOSTS and cfg.public_base_url is None:
                sys.stderr.write(
                    "datamachine-mcp: listening on every interface: set --public-url to the address clients and "
                    "webhook senders use (requests naming another host are refused)\n"
                )
            sys.stderr.flush()

        await listener(app, started).serve(sockets=[sock])
    finally:
        sock.close()
        await runtime.db.dispose()
    return 0
