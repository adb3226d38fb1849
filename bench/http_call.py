"""p50 round trip of a tool call over ``serve --http`` vs a bare MCPServer echo tool over the SDK's own streamable
HTTP app (no authentication), both real processes on 127.0.0.1, in the same run.

    python bench/http_call.py [--calls 300]

Ours is ``whoami`` with a bearer token, verified on every request, in both protocol eras. Prints the latencies
and the ratios against the bare echo (what token checks, guards and the tool itself cost over the transport).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from contextlib import AsyncExitStack

import anyio
import httpx
import httpx2
from _stdio import ROOT, pct, temp_db
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

MODERN = "2026-07-28"
CLI = [sys.executable, "-m", "datamachine_mcp.server.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(env: dict[str, str]) -> str:
    """Migrate the benchmark's database and mint a token for user 1 (the local owner's CLI)."""
    run_env = {**os.environ, **env}
    subprocess.run([*CLI, "migrate"], env=run_env, cwd=ROOT, capture_output=True, check=True)
    made = subprocess.run(
        [*CLI, "token", "create", "--user", "1"], env=run_env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return made.stdout.strip()


async def until_up(url: str) -> None:
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(60):
            while True:
                try:
                    await http.get(url)
                    return
                except httpx.TransportError:
                    await anyio.sleep(0.1)


def connect(stack: AsyncExitStack, url: str, token: str | None, mode: str) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers)
    stack.push_async_callback(http.aclose)
    return Client(streamable_http_client(url, http_client=http), mode=mode)


async def measure(targets: list[tuple[Client, str, dict]], calls: int) -> list[list[float]]:
    """Calls interleaved one by one across the targets, so load on a shared machine hits them alike."""
    for client, name, arguments in targets:
        for _ in range(30):  # warm up
            await client.call_tool(name, arguments)
    samples: list[list[float]] = [[] for _ in targets]
    for _ in range(calls):
        for (client, name, arguments), times in zip(targets, samples, strict=True):
            t0 = time.perf_counter()
            result = await client.call_tool(name, arguments)
            times.append(time.perf_counter() - t0)
            assert not result.is_error, result
    return samples


async def main(calls: int) -> None:
    db = temp_db()
    env = {"DATAMACHINE_DB": str(db), "DATAMACHINE_DATA_DIR": str(db.parent)}
    token = prepare(env)
    ours_port, echo_port = free_port(), free_port()
    ours, echo = f"http://127.0.0.1:{ours_port}/mcp", f"http://127.0.0.1:{echo_port}/mcp"
    async with (
        await anyio.open_process(
            [*CLI, "--no-worker", "--tools", "update-settings"],
            env={**os.environ, **env, "DATAMACHINE_HTTP": f"127.0.0.1:{ours_port}"},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as server,
        await anyio.open_process(
            [sys.executable, str(ROOT / "bench" / "_echo_server.py"), "http", str(echo_port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as bare,
    ):
        try:
            await until_up(f"http://127.0.0.1:{ours_port}/health")
            await until_up(echo)
            async with AsyncExitStack() as stack:
                owner = await stack.enter_async_context(connect(stack, ours, token, "legacy"))
                # the default 120 calls a minute per token would throttle the benchmark itself
                await owner.call_tool("update-settings", {"settings": {"http_rate_limit_per_minute": 0}})
                targets = [
                    (await stack.enter_async_context(connect(stack, echo, None, "legacy")), "echo", {"text": "hi"}),
                    (owner, "whoami", {}),
                    (await stack.enter_async_context(connect(stack, ours, token, MODERN)), "whoami", {}),
                ]
                base, legacy, modern = await measure(targets, calls)
        finally:
            server.terminate()
            bare.terminate()
    p50_base = pct(base, 0.5)
    for label, samples in (
        ("bare MCPServer echo", base),
        ("whoami, 2025-11-25", legacy),
        ("whoami, 2026-07-28", modern),
    ):
        p50 = pct(samples, 0.5)
        print(
            f"{label:22} p50 {p50 * 1000:6.2f} ms   p95 {pct(samples, 0.95) * 1000:6.2f} ms   "
            f"ratio to echo {p50 / p50_base:.2f}   ({calls} calls)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    anyio.run(main, parser.parse_args().calls)
