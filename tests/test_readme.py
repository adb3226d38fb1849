"""The README documents what the code does: its tool list is generated, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from datamachine_mcp.abilities.registry import load_all
from datamachine_mcp.server.docs import render_tools

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _commands(readme: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]


def test_tool_list_matches_the_registry() -> None:
    text = README.read_text()
    assert render_tools() in text, "README tool list is stale: run `python -m datamachine_mcp.server.docs`"


def test_first_screen_has_exactly_two_setup_commands_and_ci_runs_the_test_command() -> None:
    readme = README.read_text()
    first_screen = readme.split("## ", 1)[0]
    commands = _commands(first_screen)
    assert len(commands) == 2, commands
    install_and_start, run_tests = commands
    assert install_and_start.endswith("datamachine-mcp")
    assert "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert run_tests in ci, ".ci/run must run the README's test command verbatim"


def test_every_non_core_tool_the_guide_uses_says_how_to_list_it() -> None:
    """The default list is core: where the guide uses another tool, the same paragraph says how to list it."""
    abilities = load_all()
    guide = README.read_text().split("\n## Tools", 1)[0]
    missing = []
    for paragraph in re.split(r"\n\s*\n", guide):
        named = {t for t in re.findall(r"`([a-z][a-z-]+)`", paragraph) if t in abilities and not abilities[t].core}
        tools = {t for group in re.findall(r"--tools ([a-z,-]+)", paragraph) for t in group.split(",")}
        toolsets = {t for group in re.findall(r"--toolsets ([a-z,-]+)", paragraph) for t in group.split(",")}
        missing += [t for t in sorted(named) if t not in tools and abilities[t].toolset not in toolsets]
    assert not missing, f"say how to list these where they are used: {missing}"
