"""Idle memory of a stdio server: datamachine-mcp (default configuration) vs a bare MCPServer.

    python bench/memory.py [--runs 5] [--idle 3]

Each run starts a fresh process, completes initialize + ``tools/list``, waits ``--idle`` seconds and
reads the server's resident set size (VmRSS in /proc/<pid>/status). Ours runs as a user starts it:
the core tool list and the in-process worker. Runs alternate between the two servers; prints medians
and the ratio (goal <= 1.3). The first run on the new database also runs the daily retention, which
loads the engine: its figure is the max, the others show the engine waiting for work (docs/engine.md,
The engine while idle).
"""

from __future__ import annotations

import argparse

import anyio
from _stdio import children, client, compile_package, datamachine, echo_server, median, rss_kib, temp_db


async def idle_rss(params, idle: float) -> float:
    before = children()
    async with client(params) as c:
        assert (await c.list_tools()).tools
        (pid,) = children() - before
        await anyio.sleep(idle)
        return float(rss_kib(pid))


async def main(runs: int, idle: float) -> None:
    compile_package()
    db = temp_db()
    default = datamachine(db, toolsets=None)
    await idle_rss(default, 0)  # creates and migrates the database once
    ours: list[float] = []
    base: list[float] = []
    for _ in range(runs):
        ours.append(await idle_rss(default, idle))
        base.append(await idle_rss(echo_server(), idle))
    m_ours, m_base = median(ours), median(base)
    print(f"datamachine-mcp: median {m_ours / 1024:.1f} MiB  (min {min(ours) / 1024:.1f}, max {max(ours) / 1024:.1f})")
    print(f"bare MCPServer:  median {m_base / 1024:.1f} MiB  (min {min(base) / 1024:.1f}, max {max(base) / 1024:.1f})")
    print(f"ratio (datamachine / bare): {m_ours / m_base:.2f}  ({runs} runs each, {idle:g} s idle; goal <= 1.3)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=3.0)
    args = parser.parse_args()
    anyio.run(main, args.runs, args.idle)
