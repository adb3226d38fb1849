"""The HTTP service and the always-on worker as a user runs them: real ``datamachine-mcp`` processes.

* ``serve --http``: the start-up line on stderr, a tool call with a token minted by ``token create``,
  SIGTERM stopping it with exit status 0.
* The MCP Inspector CLI (a third-party client, Node) calls a tool over HTTP with an Authorization header.
* ``worker --db <file>`` alone (no MCP server anywhere) fires an every-minute cron schedule.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

import anyio
import httpx
import pytest
from sqlalchemy import select, update

from datamachine_mcp.server.bootstrap import StartupError
from datamachine_mcp.server.http_serve import GRACEFUL_SECONDS, parse_listen
from datamachine_mcp.storage.models import Flow, Job
from datamachine_mcp.storage.timeutil import utcnow
from tests import node_tools
from tests.conftest import call, mint_token
from tests.http_support import mcp_client
from tests.jobs_support import echo_step, make_flow, wait_until
from tests.processes import ROOT, Process, http_server

pytestmark = pytest.mark.anyio


async def test_serve_http_announces_itself_serves_a_token_and_stops_on_sigterm(runtime, tmp_path):
    token = await anyio.run_process(
        [
            *(sys.executable, "-m", "datamachine_mcp.server.cli", "token", "create", "--user", "1"),
            *("--db", str(runtime.db.path), "--data-dir", str(runtime.data_dir), "--label", "remote"),
        ],
        cwd=ROOT,
    )
    raw = token.stdout.decode().strip()
    proc, base = await http_server(runtime, tmp_path, "--public-url", "https://dm.example.com/")
    try:
        line = proc.log()
        assert f"serving MCP at {base}/mcp" in line and "public URL https://dm.example.com" in line
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/health")).json() == {"status": "ok"}
        async with mcp_client(base, raw) as client:
            me = (await client.call_tool("whoami", {})).structured_content
            assert me["transport"] == "http" and me["token_prefix"] == raw[: len(me["token_prefix"])]
            await client.subscribe_resource("datamachine://jobs/1")  # the client holds a stream open
            await anyio.sleep(0.5)
            started = time.monotonic()
            status = await proc.stop()
            stopped_in = time.monotonic() - started
    finally:
        await proc.stop()
    assert status == 0, proc.log()
    assert stopped_in < GRACEFUL_SECONDS + 5  # open streams are drained, not waited for
    assert "Traceback" not in proc.log()


async def test_the_inspector_cli_calls_a_tool_over_http_with_a_header(runtime, tmp_path):
    inspector = node_tools.tool("mcp-inspector")
    raw = (await mint_token(runtime, user_id=1))["raw_token"]
    proc, base = await http_server(runtime, tmp_path, "--no-worker")
    try:
        done = await anyio.run_process(
            [
                *(inspector, "--cli", f"{base}/mcp", "--transport", "http"),
                *("--header", f"Authorization: Bearer {raw}", "--method", "tools/call", "--tool-name", "whoami"),
            ],
            env=node_tools.node_env({"MCP_CATALOG_PATH": str(tmp_path / "catalog.json")}),
            check=False,
        )
    finally:
        await proc.stop()
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    result = json.loads(out)
    assert result["structuredContent"]["transport"] == "http" and not result.get("isError")


async def test_a_worker_alone_fires_an_every_minute_schedule(runtime, owner, tmp_path):
    made = await make_flow(owner, [echo_step(tick=True)], name="Minutely")
    await call(owner, "schedule-flow", {"flow_id": made["flow_id"], "interval_or_timestamp": "* * * * *"})
    # the minute's slot is due now (rather than waiting for the next minute to begin)
    async with runtime.db.write() as session:
        await session.execute(
            update(Flow).where(Flow.flow_id == made["flow_id"]).values(next_run_at=utcnow() - timedelta(seconds=1))
        )
    worker = Process(runtime, tmp_path, "worker", "worker", "--log-level", "info")
    try:

        async def fired() -> bool:
            async with runtime.db.read() as session:
                jobs = (await session.execute(select(Job).where(Job.flow_key == made["flow_id"]))).scalars().all()
            return any(j.run_trigger == "schedule" and j.status == "completed" for j in jobs)

        await wait_until(fired, 45, 0.2)
    finally:
        assert await worker.stop() == 0, worker.log()
    async with runtime.db.read() as session:
        flow = await session.get(Flow, made["flow_id"])
    assert flow is not None and flow.next_run_at is not None and flow.next_run_at > utcnow()  # the next minute


def test_serve_http_refuses_a_taken_port_with_exit_status_2(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "datamachine_mcp.server.cli", "serve", "--http", str(port)],
            cwd=ROOT,
            env={"DATAMACHINE_DB": str(tmp_path / "dm.db"), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("8765", ("127.0.0.1", 8765)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9000", ("::1", 9000)),
        (":0", ("127.0.0.1", 0)),
    ],
)
def test_listen_addresses(given, expected):
    assert parse_listen(given) == expected


@pytest.mark.parametrize("given", ["", "host", "127.0.0.1:http", "127.0.0.1:70000", "[::1]"])
def test_bad_listen_addresses_are_refused_with_the_form_to_use(given):
    with pytest.raises(StartupError, match="give PORT or HOST:PORT"):
        parse_listen(given)


@pytest.mark.parametrize("given", ["notaurl", "dm.example.com", "ftp://dm.example.com", "https://", "http://h:port"])
def test_a_public_url_that_is_not_an_absolute_http_url_stops_the_server(tmp_path, given):
    for args, extra_env in (
        (["serve", "--http", "127.0.0.1:0", "--public-url", given], {}),
        (["worker"], {"DATAMACHINE_PUBLIC_URL": given}),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "datamachine_mcp.server.cli", *args],
            cwd=ROOT,
            env={"DATAMACHINE_DB": str(tmp_path / "dm.db"), "PATH": "/usr/bin:/bin", **extra_env},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr == (
            "datamachine-mcp: --public-url (env DATAMACHINE_PUBLIC_URL) must be an absolute http(s) URL such as "
            f"https://dm.example.com, not {given!r}\n"
        )
