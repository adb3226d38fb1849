"""Questions an ability asks the user before it runs (MCP elicitation), declared with ``ask=`` on ``@ability``.

The server asks before the runner opens any transaction, so nothing is held while the user thinks, and a
declined or cancelled question writes nothing. A ``confirmation`` guards a destructive tool: it is asked
unless the call says ``confirm: true``, and a client that cannot ask gets the tool's behaviour as before.
A ``decision`` fills required input the model left out (e.g. accept or reject an approval); a client that
cannot ask gets ``unsupported``'s error instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datamachine_mcp.abilities.context import AbilityContext

CONFIRM_FIELD = "confirm"


@dataclass(frozen=True)
class Question:
    kind: str  # "confirmation" or "decision"
    message: Callable[[Any], str]  # the question, from the parsed input
    needed: Callable[[Any], bool]  # whether this call must ask
    answer: Callable[[dict[str, Any]], dict[str, Any]]  # accepted form content -> arguments to add
    # The form: primitive JSON-schema properties (empty for a yes/no confirmation) and the required ones.
    properties: dict[str, dict[str, Any]] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    unsupported: tuple[str, str] | None = None  # (code, message) when the client cannot be asked
    # What the user needs to decide, read in a short read transaction (None: the caller may not see
    # it, or it is gone); shown below the question, never in the refusal that quotes it.
    details: Callable[[AbilityContext, Any], Awaitable[str | None]] | None = None

    def requested_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object", "properties": self.properties}
        if self.required:
            schema["required"] = list(self.required)
        return schema


def confirmation(message: Callable[[Any], str]) -> Question:
    """Ask "are you sure?" before a destructive call; ``confirm: true`` in the call skips it."""
    return Question(
        kind="confirmation",
        message=message,
        needed=lambda inp: not getattr(inp, CONFIRM_FIELD, False),
        answer=lambda content: {CONFIRM_FIELD: True},
    )


def decision(
    message: Callable[[Any], str],
    *,
    missing: str,
    properties: dict[str, dict[str, Any]],
    required: tuple[str, ...],
    unsupported: tuple[str, str],
    details: Callable[[AbilityContext, Any], Awaitable[str | None]] | None = None,
) -> Question:
    """Ask the user for input the call left out (``missing`` is None); the form's fields become arguments."""
    names = tuple(properties)
    return Question(
        kind="decision",
        message=message,
        needed=lambda inp: getattr(inp, missing, None) is None,
        answer=lambda content: {k: content[k] for k in names if content.get(k) not in (None, "")},
        properties=properties,
        required=required,
        unsupported=unsupported,
        details=details,
    )
