"""Asking the user before a call runs: the ability's declared question (abilities/questions.py) as MCP elicitation.

Handshake-era clients that declared elicitation get an ``elicitation/create`` request during the call.
2026-era clients get an ``input_required`` result carrying the question and retry the call with the answer;
the ``request_state`` that proves the question was asked is sealed by the SDK's boundary with this process's
secret key (``RequestStateBoundary``), so any process of the deployment can take the retry. Nothing is
asked, and no transaction is open, before the input is valid and the tool is visible to the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.request_state import InvalidRequestState, RequestStateBoundary, RequestStateSecurity
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from datamachine_mcp.abilities.context import AbilityContext, Runtime
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.principal import Principal
from datamachine_mcp.abilities.registry import Ability
from datamachine_mcp.abilities.runner import parse_input, visible
from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.storage.crypto import ENVELOPE_KEY, SecretBox, SecretUnavailable

log = logging.getLogger("datamachine.server")

ANSWER = "answer"  # the key of our one input request
STATE_KIND = "mcp-request-state"


@dataclass(frozen=True)
class Refused:
    """The user (or the client) said no: nothing runs, nothing is written."""

    error: CodedError


class BoxCodec:
    """Request-state sealing with the deployment's secret key: every process that shares it can unseal."""

    def __init__(self, box: SecretBox) -> None:
        self._box = box

    def seal(self, payload: bytes) -> str:
        return str(self._box.encrypt(payload.decode("ascii"), STATE_KIND)[ENVELOPE_KEY])

    def unseal(self, token: str) -> bytes:
        try:
            return str(self._box.decrypt({ENVELOPE_KEY: token}, STATE_KIND)).encode("ascii")
        except (SecretUnavailable, UnicodeError) as exc:
            raise InvalidRequestState("seal") from exc


def state_boundary(box: SecretBox, server_name: str) -> RequestStateBoundary:
    return RequestStateBoundary(RequestStateSecurity(codec=BoxCodec(box)), default_audience=server_name)


def _can_ask(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Form elicitation declared (a bare ``elicitation: {}`` predates modes and means form)."""
    caps = ctx.session.client_capabilities
    elicitation = caps.elicitation if caps is not None else None
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


def _state(ability: Ability) -> str:
    return f"asked:{ability.slug}"


async def settle(
    ctx: ServerRequestContext[Any, Any],
    params: types.CallToolRequestParams,
    ability: Ability,
    principal: Principal,
    runtime: Runtime | None = None,
) -> dict[str, Any] | Refused | types.InputRequiredResult:
    """The arguments to run the call with, after asking the user what the ability's question needs.

    Returns the arguments unchanged when nothing needs asking (or when the input is invalid or the tool
    not visible: the runner then answers as always), a ``Refused`` when the user declined or cancelled
    or a required answer cannot be asked for, or a 2026-era ``input_required`` result to send back.
    """
    arguments = dict(params.arguments or {})
    question = ability.ask
    if question is None or not visible(ability, principal):
        return arguments
    try:
        parsed = parse_input(ability, arguments)
    except AbilityError:
        return arguments
    if not question.needed(parsed):
        return arguments
    if not _can_ask(ctx):
        if question.unsupported is None:
            return arguments  # a confirmation: the tool behaves as before
        return Refused(AbilityError(*question.unsupported))
    message = question.message(parsed)
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        answer = _answer_on_retry(params, ability)
        if answer is None:
            asked = await _with_details(runtime, ability, principal, parsed, message)
            request = types.ElicitRequest(
                params=types.ElicitRequestFormParams(message=asked, requested_schema=question.requested_schema())
            )
            return types.InputRequiredResult(input_requests={ANSWER: request}, request_state=_state(ability))
    else:
        try:
            asked = await _with_details(runtime, ability, principal, parsed, message)
            answer = await ctx.session.elicit_form(
                message=asked, requested_schema=question.requested_schema(), related_request_id=ctx.request_id
            )
        except Exception:  # the client failed to ask: do nothing rather than guess the answer
            log.warning("%s: elicitation failed", ability.slug, exc_info=True)
            return Refused(
                AbilityError(
                    "elicitation_failed",
                    "The client could not ask the user, so nothing was changed. Ask them yourself, then call again "
                    + ("with confirm: true." if question.kind == "confirmation" else "with their answer."),
                )
            )
    return _apply(ability, arguments, message, answer)


async def _with_details(
    runtime: Runtime | None, ability: Ability, principal: Principal, parsed: Any, message: str
) -> str:
    """The question followed by what the user needs to decide it, when the ability says how to read it.

    A failure to read the details only shortens the question: the call itself checks access and answers."""
    question = ability.ask
    if question is None or question.details is None or runtime is None:
        return message
    ctx = AbilityContext(runtime, ability, principal, None)
    try:
        async with ctx.reading():
            details = await question.details(ctx, parsed)
    except CodedError:
        return message
    except Exception:
        log.warning("%s: could not read the question's details", ability.slug, exc_info=True)
        return message
    return f"{message}\n\n{details}" if details else message


def _answer_on_retry(params: types.CallToolRequestParams, ability: Ability) -> types.ElicitResult | None:
    """The user's answer, when this is the retry of a call whose question we asked (state verified)."""
    if params.request_state != _state(ability) or not params.input_responses:
        return None
    raw = params.input_responses.get(ANSWER)
    if raw is None:
        return None
    try:
        return types.ElicitResult.model_validate(raw.model_dump(by_alias=True, mode="json", exclude_none=True))
    except ValueError:
        return None


def _apply(
    ability: Ability, arguments: dict[str, Any], message: str, answer: types.ElicitResult
) -> dict[str, Any] | Refused:
    question = ability.ask
    assert question is not None
    if answer.action == "decline":
        return Refused(
            AbilityError("declined_by_user", f"The user declined ({message}). Nothing was changed.", tool=ability.slug)
        )
    if answer.action != "accept":
        return Refused(
            AbilityError(
                "cancelled_by_user", f"The user cancelled ({message}). Nothing was changed.", tool=ability.slug
            )
        )
    content = dict(answer.content or {})
    missing = [name for name in question.required if content.get(name) in (None, "")]
    if missing:
        return Refused(
            AbilityError(
                "invalid_answer", f"The answer left out {', '.join(missing)}. Nothing was changed.", fields=missing
            )
        )
    log.info("%s: the user accepted %r", ability.slug, message)
    return {**arguments, **question.answer(content)}
