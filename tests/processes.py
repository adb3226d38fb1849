"""``datamachine-mcp`` as real child processes (``serve --http``, ``worker``), on a test's database file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"serving MCP at (http://[^\s]+)/mcp")


class Process:
    """One child process; its stdout and stderr go to a log file the test can read."""

    def __init__(self, runtime: Any, tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        db = str(runtime.db.path) if runtime.db.path is not None else runtime.db.url
        self.log_path = tmp_path / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "datamachine_mcp.server.cli",
                    *args,
                    "--db",
                    db,
                    "--data-dir",
                    str(runtime.data_dir),
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for(self, pattern: re.Pattern[str], seconds: float = 60) -> re.Match[str]:
        with anyio.fail_after(seconds):
            while True:
                found = pattern.search(self.log())
                if found:
                    return found
                if self.proc.poll() is not None:
                    raise AssertionError(f"process exited ({self.proc.returncode}):\n{self.log()}")
                await anyio.sleep(0.1)

    async def stop(self, seconds: float = 20) -> int:
        """SIGTERM, then the exit status (killed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + seconds
        while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - no awaitable exit
            await anyio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"process did not stop within {seconds} s:\n{self.log()}")
        return self.proc.returncode


async def http_server(
    runtime: Any, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[Process, str]:
    """``serve --http 127.0.0.1:0`` on the runtime's database; returns the process and its base URL."""
    proc = Process(runtime, tmp_path, "serve", "serve", "--http", "127.0.0.1:0", *args, env=env)
    found = await proc.wait_for(STARTED)
    return proc, found.group(1)
