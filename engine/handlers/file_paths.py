"""The ``files`` handler's path checks: a directory inside ``files_allowed_roots`` (by ``realpath``), a
relative file name that stays inside it; an escape is ``path_not_allowed``."""

from __future__ import annotations

import os
from pathlib import Path

from datamachine_mcp.engine.errors import StepError


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def allowed_directory(directory: str, roots: list[Path]) -> Path:
    """The real path of ``directory`` if it lies inside one of ``roots`` (else ``path_not_allowed``)."""
    if not directory or "\x00" in directory or not os.path.isabs(directory):
        raise StepError("path_not_allowed", f"directory must be an absolute path (got {directory!r})")
    real = Path(os.path.realpath(directory))
    for root in roots:
        if inside(real, Path(os.path.realpath(root))):
            return real
    raise StepError(
        "path_not_allowed",
        f"{directory} is outside files_allowed_roots ({', '.join(str(r) for r in roots) or 'none'})",
        diagnostics={"directory": directory, "files_allowed_roots": [str(r) for r in roots]},
    )


def relative_target(directory: Path, name: str) -> Path:
    """``directory / name`` for a relative name that stays inside ``directory`` (else ``path_not_allowed``)."""
    if not name or os.path.isabs(name) or name.startswith("/") or ".." in name or "\x00" in name or "\\" in name:
        raise StepError(
            "path_not_allowed",
            f"The file name {name!r} is not allowed (absolute, '..', NUL or '\\\\')",
            diagnostics={"file_name": name},
        )
    if name.endswith("/"):
        raise StepError("handler_config_invalid", f"The file name {name!r} names a directory")
    target = directory / name
    if not inside(Path(os.path.realpath(target)), directory):
        raise StepError(
            "path_not_allowed", f"The file name {name!r} resolves outside {directory}", diagnostics={"file_name": name}
        )
    return target
