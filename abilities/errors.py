"""Ability errors: the coded error (a stable snake_case code, one sentence that names the fix, data)
and the permission refusal that leaves an audit trace."""

from __future__ import annotations

from typing import Any

from datamachine_mcp.engine.errors import CodedError

# Abilities raise the engine's coded error under this name. Catching it catches every coded error,
# including the engine's ConfigError, PlanError and ScheduleError: the runner turns any of them into
# an ``is_error`` tool result whose text is ``"<code>: <message>"`` and whose structured content is
# ``{code, message, data}``.
AbilityError = CodedError


class AccessDenied(CodedError):
    """A permission refusal (``permission_denied`` or ``agent_access_denied``).

    Unlike other errors it leaves a trace: one ``warning`` log row written in its own transaction
    after the call's transaction rolled back (docs/access.md, Denial rows).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        required_role: str | None,
        effective_role: str | None,
        agent: str | None = None,
        target: dict[str, Any] | None = None,
        agent_id: int | None = None,
        **data: Any,
    ) -> None:
        extra: dict[str, Any] = {"required_role": required_role, "effective_role": effective_role, **data}
        if agent is not None:
            extra["agent"] = agent
        super().__init__(code, message, **extra)
        self.required_role = required_role
        self.effective_role = effective_role
        self.target = target
        self.agent_id = agent_id


def not_found(kind: str, ident: Any, field: str | None = None) -> AbilityError:
    """``<kind>_not_found`` with the id in data, e.g. ``flow_not_found: Flow 7 not found.``"""
    key = field or f"{kind}_id"
    label = kind.replace("_", " ").capitalize()
    return AbilityError(f"{kind}_not_found", f"{label} {ident} not found.", **{key: ident})
