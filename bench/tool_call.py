"""Round trip of ``get-agent`` over stdio vs a bare MCPServer echo tool, interleaved in one run.

    python bench/tool_call.py [--calls 300] [--tool get-agent]

Both servers run at once; the calls alternate (one of ours, one echo), so a busy machine slows both
alike. Prints the medians (p50), p95 and the ratio of the medians (goal <= 1.3). ``--tool whoami``
measures a call that reads no database.
"""

from __future__ import annotations

import argparse
import time
from contextlib import AsyncExitStack

import anyio
from _stdio import children, client, compile_package, cpu_seconds, datamachine, echo_server, pct, temp_db

ARGUMENTS = {"get-agent": {"agent_slug": "bench-bot"}, "whoami": {}}


async def timed(c, name: str, arguments: dict) -> float:
    t0 = time.perf_counter()
    result = await c.call_tool(name, arguments)
    elapsed = time.perf_counter() - t0
    assert not result.is_error, result
    return elapsed


async def main(calls: int, tool: str) -> None:
    compile_package()
    async with AsyncExitStack() as stack:
        before = children()
        ours = await stack.enter_async_context(client(datamachine(temp_db())))
        (our_pid,) = children() - before
        before = children()
        base = await stack.enter_async_context(client(echo_server()))
        (base_pid,) = children() - before
        created = await ours.call_tool("create-agent", {"agent_slug": "bench-bot"})
        assert not created.is_error, created
        await anyio.sleep(2)  # let the in-process engine start (it does after the first answers)
        for _ in range(30):  # warm up
            await timed(ours, tool, ARGUMENTS[tool])
            await timed(base, "echo", {"text": "hello"})
        mine, echo = [], []
        cpu = {pid: cpu_seconds(pid) for pid in (our_pid, base_pid)}
        for _ in range(calls):
            mine.append(await timed(ours, tool, ARGUMENTS[tool]))
            echo.append(await timed(base, "echo", {"text": "hello"}))
        cpu = {pid: (cpu_seconds(pid) - used) / calls for pid, used in cpu.items()}
    p50_ours, p50_base = pct(mine, 0.5), pct(echo, 0.5)
    print(f"{tool} over stdio:  p50 {p50_ours * 1000:.2f} ms   p95 {pct(mine, 0.95) * 1000:.2f} ms   ({calls} calls)")
    print(f"bare MCPServer echo:  p50 {p50_base * 1000:.2f} ms   p95 {pct(echo, 0.95) * 1000:.2f} ms   ({calls} calls)")
    print(f"ratio (p50 {tool} / p50 echo): {p50_ours / p50_base:.2f}  (goal <= 1.3)")
    print(
        f"server CPU per call: {cpu[our_pid] * 1000:.2f} ms vs {cpu[base_pid] * 1000:.2f} ms "
        f"(includes the in-process engine's idle polling)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--tool", choices=sorted(ARGUMENTS), default="get-agent")
    args = parser.parse_args()
    anyio.run(main, args.calls, args.tool)
