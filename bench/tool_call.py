"""p50 round trip of ``get-agent`` over stdio vs a bare MCPServer echo tool, in the same run.

    python bench/tool_call.py [--calls 300]

Prints both latencies and the ratio (goal ≤ 1.5).
"""

from __future__ import annotations

import argparse
import time

import anyio
from _stdio import client, datamachine, echo_server, pct, temp_db


async def measure(params, name: str, arguments: dict, calls: int, setup=None) -> list[float]:
    async with client(params) as c:
        if setup is not None:
            await setup(c)
        for _ in range(30):  # warm up
            await c.call_tool(name, arguments)
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            result = await c.call_tool(name, arguments)
            samples.append(time.perf_counter() - t0)
            assert not result.is_error, result
        return samples


async def main(calls: int) -> None:
    async def create_agent(c) -> None:
        result = await c.call_tool("create-agent", {"agent_slug": "bench-bot"})
        assert not result.is_error, result

    ours = await measure(datamachine(temp_db()), "get-agent", {"agent_slug": "bench-bot"}, calls, create_agent)
    base = await measure(echo_server(), "echo", {"text": "hello"}, calls)
    p50_ours, p50_base = pct(ours, 0.5), pct(base, 0.5)
    print(
        f"get-agent over stdio:  p50 {p50_ours * 1000:.2f} ms   p95 {pct(ours, 0.95) * 1000:.2f} ms   ({calls} calls)"
    )
    print(
        f"bare MCPServer echo:   p50 {p50_base * 1000:.2f} ms   p95 {pct(base, 0.95) * 1000:.2f} ms   ({calls} calls)"
    )
    print(f"ratio (p50 get-agent / p50 echo): {p50_ours / p50_base:.2f}  (goal <= 1.5)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    anyio.run(main, parser.parse_args().calls)
