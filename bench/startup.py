"""Time from process start to the first ``tools/list`` answer: datamachine-mcp vs a bare MCPServer.

    python bench/startup.py [--runs 7]

Each run starts a fresh process (the datamachine database already exists and is migrated, as on any
start after the first); runs alternate between the servers. Ours is measured twice: in its default
configuration (the core tool list, the in-process worker) and listing every tool (``--toolsets all``).
Prints medians of the wall time and, steadier on a busy machine, of the CPU time the server process used
until its answer arrived; ratios against the bare server (goal <= 1.3).
"""

from __future__ import annotations

import argparse
import time

import anyio
from _stdio import children, client, compile_package, cpu_seconds, datamachine, echo_server, median, temp_db


async def first_list(params) -> tuple[float, float]:
    before = children()
    t0 = time.perf_counter()
    async with client(params) as c:
        tools = await c.list_tools()
        elapsed = time.perf_counter() - t0
        (pid,) = children() - before
        cpu = cpu_seconds(pid)
        assert tools.tools
    return elapsed, cpu


async def main(runs: int) -> None:
    compile_package()
    db = temp_db()
    servers = {
        "datamachine-mcp (core)": datamachine(db, toolsets=None),
        "datamachine-mcp (all)": datamachine(db),
        "bare MCPServer": echo_server(),
    }
    await first_list(servers["datamachine-mcp (core)"])  # creates and migrates the database once
    wall: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(runs):
        for name, params in servers.items():
            elapsed, used = await first_list(params)
            wall[name].append(elapsed)
            cpu[name].append(used)
    base_wall, base_cpu = median(wall["bare MCPServer"]), median(cpu["bare MCPServer"])
    print(f"{runs} runs each, interleaved; medians (min-max)")
    for name in servers:
        w, c = median(wall[name]), median(cpu[name])
        print(
            f"{name:24} wall {w * 1000:5.0f} ms ({min(wall[name]) * 1000:.0f}-{max(wall[name]) * 1000:.0f})"
            f"  ratio {w / base_wall:.2f}   cpu {c * 1000:5.0f} ms  ratio {c / base_cpu:.2f}"
        )
    print("goal: wall ratio <= 1.3")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    anyio.run(main, parser.parse_args().runs)
