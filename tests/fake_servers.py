"""Scriptable local HTTP servers for handler and provider tests (the outside world, faked).

``serve()`` starts a :class:`FakeServer` on 127.0.0.1 with an ephemeral port in a background
thread (stdlib ``ThreadingHTTPServer``), independent of the test's event loop. Per path you
either *script* responses (served in order, the last one repeating) or *route* to a function of
the recorded request. Every request is recorded (method, path, headers, body).

Also here: ``make_snapshot`` (a settings snapshot from the defaults, no database) and
``make_context`` (a ``HandlerContext`` for a handler call).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from datamachine_mcp.engine.handlers.base import HandlerContext
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.storage.settings_schema import SETTING_KEYS, Snapshot, default_value

Body = bytes | str | dict | list | None


@dataclass
class FakeResponse:
    status: int = 200
    body: Body = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the response starts
    omit_length: bool = False  # no Content-Length: the body ends when the connection closes

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        body = self.body
        if isinstance(body, dict | list):
            headers.setdefault("Content-Type", "application/json")
            return json.dumps(body).encode(), headers
        if isinstance(body, str):
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            return body.encode("utf-8"), headers
        return body or b"", headers


@dataclass
class RecordedRequest:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[RecordedRequest], FakeResponse]


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._scripts: dict[str, list[FakeResponse]] = {}
        self._routes: dict[str, Handler] = {}
        self._lock = threading.Lock()
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded = RecordedRequest(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                response = server._respond(recorded)
                if response.delay:
                    time.sleep(response.delay)
                payload, headers = response.encoded()
                try:
                    self.send_response(response.status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    if not response.omit_length:
                        self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                except OSError:  # the client gave up (timeouts, size caps)
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

            def log_message(self, format: str, *args: Any) -> None:  # silence
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.handle_error = lambda request, client_address: None
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -- scripting ------------------------------------------------------------------------------

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def script(self, path: str, *responses: FakeResponse) -> str:
        """Serve ``responses`` in order at ``path`` (the last one repeats); returns the URL."""
        with self._lock:
            self._scripts[path] = list(responses)
        return self.url(path)

    def route(self, path: str, handler: Handler) -> str:
        with self._lock:
            self._routes[path] = handler
        return self.url(path)

    def to(self, path: str) -> list[RecordedRequest]:
        """Requests received at ``path`` (without query)."""
        return [r for r in self.requests if r.route == path]

    def _respond(self, request: RecordedRequest) -> FakeResponse:
        with self._lock:
            self.requests.append(request)
            for key in (request.path, request.route):
                if key in self._routes:
                    handler = self._routes[key]
                    break
                queue = self._scripts.get(key)
                if queue:
                    return queue.pop(0) if len(queue) > 1 else queue[0]
            else:
                return FakeResponse(404, {"error": f"no scripted response for {request.path}"})
        return handler(request)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@contextmanager
def serve() -> Iterator[FakeServer]:
    server = FakeServer().start()
    try:
        yield server
    finally:
        server.stop()


def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- settings and handler contexts ------------------------------------------------------------


def make_snapshot(data_dir: Path, **overrides: Any) -> Snapshot:
    values = {key: default_value(key) for key in SETTING_KEYS}
    for key, value in overrides.items():
        assert key in values, key
        values[key] = value
    return Snapshot(values, {}, data_dir)


def make_context(
    snap: Snapshot,
    outbound: Outbound,
    *,
    step_type: str = "fetch",
    dry_run: bool = False,
    engine_data: dict[str, Any] | None = None,
    job_id: int | None = 41,
    flow_id: int | None = 7,
    pipeline_id: int | None = 2,
    flow_step_id: str | None = "2_5f0c7a3e-1b2c-4d5e-8f90-123456789abc_7",
) -> HandlerContext:
    return HandlerContext(
        job_id=job_id,
        flow_id=flow_id,
        pipeline_id=pipeline_id,
        flow_step_id=flow_step_id,
        step_type=step_type,
        dry_run=dry_run,
        engine_data=dict(engine_data or {}),
        outbound=outbound,
        files_roots=snap.files_roots(),
        settings=snap,
        version="9.9.9-test",
    )
