"""The wheel ships every package of the five layers (they are listed by hand for the namespace mapping)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("server", "abilities", "resources", "engine", "storage")


def test_every_python_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        "datamachine_mcp." + ".".join(path.parent.relative_to(ROOT).parts)
        for layer in LAYERS
        for path in (ROOT / layer).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    missing = sorted(on_disk - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert sorted(listed - on_disk) == [], "pyproject.toml lists packages that do not exist"
    assert {f"datamachine_mcp.{layer}": layer for layer in LAYERS} == config["package-dir"]
