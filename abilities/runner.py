"""Calling an ability: visibility, validation, one transaction, errors, audit of denials.

This is transport-neutral: the MCP server, the CLI and tests all call ``invoke``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from datamachine_mcp.abilities.context import AbilityContext, ProgressFn, Runtime
from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.abilities.input_forms import Loc, client_forms
from datamachine_mcp.abilities.principal import Principal, level_visible
from datamachine_mcp.abilities.registry import Ability
from datamachine_mcp.engine.errors import CodedError

log = logging.getLogger("datamachine.abilities")

MAX_OBJECT_INPUT = 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    """The result of one call: ``output`` on success, ``error`` ``{code, message, data}`` otherwise."""

    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        if self.error is not None:
            return error_text(self.error)
        return json.dumps(self.output, ensure_ascii=False, separators=(",", ":"))


def refusal(err: CodedError) -> dict[str, Any]:
    """What a client is shown of a coded error: ``{code, message, data}``, as text ``"<code>: <message>"``.

    The one translation of a CodedError: tool results, resource reads and refused requests all use it.
    """
    return err.payload()


def error_text(error: dict[str, Any]) -> str:
    return f"{error['code']}: {error['message']}"


def visible(ability: Ability, principal: Principal) -> bool:
    return level_visible(principal, ability.level, ability.toolset)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(input)"


def _error_entry(e: Any, hints: dict[Loc, list[str]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"field": _field(e["loc"]), "message": e["msg"].rstrip(".")}
    if e["type"] == "extra_forbidden":
        entry["message"] = "unknown field"
        found = hints.get(tuple(e["loc"]))
        if found:
            entry["message"] += f" (did you mean {' or '.join(found)}?)"
            entry["suggestions"] = found
    return entry


def validation_error(ability: Ability, exc: ValidationError, hints: dict[Loc, list[str]] | None = None) -> AbilityError:
    errors = [_error_entry(e, hints or {}) for e in exc.errors(include_url=False)]
    first = exc.errors(include_url=False)[0]
    top = str(first["loc"][0]) if first["loc"] else ""
    code = "invalid_input"
    # A missing mapped field is still invalid_input; a mapped field that is present but invalid
    # (including a missing key inside it) uses the mapped code.
    missing = first["type"] == "missing" and len(first["loc"]) == 1 and top not in ability.missing_uses_code
    if top in ability.error_fields and not missing:
        code = ability.error_fields[top]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return AbilityError(code, f"Invalid input for {ability.slug}: {summary}{more}.", errors=errors)


def parse_input(ability: Ability, arguments: dict[str, Any]) -> Any:
    # "6" for an integer and JSON text for an object/array are read first (input_forms); the rest is
    # strict JSON-mode validation against exactly the published schema.
    forms = client_forms(ability.input_model, arguments)
    for name, value in forms.arguments.items():
        if isinstance(value, dict | list):
            size = len(json.dumps(value, separators=(",", ":")).encode())
            if size > MAX_OBJECT_INPUT:
                raise AbilityError(
                    "input_too_large",
                    f"{name} is {size} bytes of JSON; the limit is {MAX_OBJECT_INPUT} bytes (1 MiB).",
                    field=name,
                    bytes=size,
                )
    try:
        return ability.input_model.model_validate_json(json.dumps(forms.arguments), strict=True)
    except ValidationError as exc:
        raise validation_error(ability, exc, forms.hints) from None


async def _record_denial(runtime: Runtime, ability: Ability, principal: Principal, err: AccessDenied) -> None:
    log.warning("%s denied for user %s: %s", ability.slug, principal.user_id, err.message)
    context: dict[str, Any] = {
        "audit": True,
        "ability": ability.slug,
        "reason_code": err.code,
        "required_role": err.required_role,
        "effective_role": err.effective_role,
        **principal.actor(),
    }
    if err.target is not None:
        context["target"] = err.target
    try:
        from datamachine_mcp.storage.logs import write_log  # SQLAlchemy: not needed to list tools

        async with runtime.db.write() as session:
            await write_log(
                session,
                "warning",
                f"{ability.slug} denied: {err.code}",
                context,
                agent_id=err.agent_id if err.agent_id is not None else principal.agent_id,
                user_id=principal.user_id,
                audit=True,
            )
    except Exception:  # the refusal itself must still reach the caller
        log.exception("could not record the denial of %s", ability.slug)


async def invoke(
    runtime: Runtime,
    ability: Ability,
    arguments: dict[str, Any] | None,
    principal: Principal,
    *,
    request_id: str | None = None,
    progress: ProgressFn | None = None,
    client: Any = None,
    record_denials: bool = True,
) -> Outcome:
    """Run one ability call as ``principal`` and report its outcome. Never raises.

    ``record_denials=False`` is for the server's own probes (may this subscriber see that URI?): a
    refusal there is an answer, not a caller's attempt, and is not written to the audit trail.
    """
    try:
        if not visible(ability, principal):
            raise AccessDenied(
                "permission_denied",
                f"{ability.slug} is not available to this session: it needs "
                + ("a global administrator" if ability.level == "global_admin" else f"the {ability.level} level")
                + " and a token scope that allows it. Call whoami to see what this session may do.",
                required_role=ability.level,
                effective_role=None,
            )
        parsed = parse_input(ability, arguments or {})
        if ability.transaction == "manual":
            ctx = AbilityContext(runtime, ability, principal, None, request_id, progress, client)
            output = ability.dump_output(await ability.handler(ctx, parsed))
        elif ability.read_only:  # its transaction opens on first use: a session, or a light read
            ctx = AbilityContext(runtime, ability, principal, None, request_id, progress, client, lazy=True)
            try:
                output = ability.dump_output(await ability.handler(ctx, parsed))
            finally:
                await ctx.close()
        else:
            async with runtime.db.write() as session:
                ctx = AbilityContext(runtime, ability, principal, session, request_id, progress, client)
                result = await ability.handler(ctx, parsed)
                output = ability.dump_output(result)
                await session.flush()
        await ctx.flush_events()
        return Outcome(output=output)
    except AccessDenied as err:
        if record_denials:
            await _record_denial(runtime, ability, principal, err)
        return Outcome(error=refusal(err))
    except CodedError as err:  # abilities' own, and the engine's config, plan and schedule errors
        log.info("%s failed: %s", ability.slug, err.code)
        return Outcome(error=refusal(err))
    except Exception:
        log.exception("unexpected error in %s", ability.slug)
        return Outcome(
            error={
                "code": "internal_error",
                "message": "An unexpected error occurred; it was logged on the server and nothing was changed.",
                "data": {},
            }
        )
