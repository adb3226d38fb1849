"""Time from process start to the first ``tools/list`` answer: datamachine-mcp vs a bare MCPServer.

    python bench/startup.py [--runs 7]

Each run starts a fresh process (the datamachine database already exists and is migrated, as on any
start after the first). Prints medians and the ratio (goal ≤ 1.5).
"""

from __future__ import annotations

import argparse
import time

import anyio
from _stdio import client, datamachine, echo_server, median, temp_db


async def first_list(params) -> float:
    t0 = time.perf_counter()
    async with client(params) as c:
        tools = await c.list_tools()
        elapsed = time.perf_counter() - t0
        assert tools.tools
    return elapsed


async def main(runs: int) -> None:
    db = temp_db()
    await first_list(datamachine(db))  # creates and migrates the database once
    ours, base = [], []
    for _ in range(runs):
        ours.append(await first_list(datamachine(db)))
        base.append(await first_list(echo_server()))
    m_ours, m_base = median(ours), median(base)
    print(f"datamachine-mcp: median {m_ours * 1000:.0f} ms  (min {min(ours) * 1000:.0f}, max {max(ours) * 1000:.0f})")
    print(f"bare MCPServer:  median {m_base * 1000:.0f} ms  (min {min(base) * 1000:.0f}, max {max(base) * 1000:.0f})")
    print(f"ratio (datamachine / bare): {m_ours / m_base:.2f}  (goal <= 1.5)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    anyio.run(main, parser.parse_args().runs)
