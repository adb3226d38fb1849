"""Flows toolset, part 3: prompt queues of flow steps (docs/engine.md, Queues).

Queues live in the flow row (``prompt_queue`` on ai steps, ``config_patch_queue`` on fetch steps),
each entry ``{prompt, added_at}`` / ``{patch, added_at}``; ``queue_mode`` says how a run takes one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datamachine_mcp.abilities.access import Role
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_steps import FSID_DESC, lookup_flow_step, replace_step
from datamachine_mcp.abilities.pipeline_views import notify_flow
from datamachine_mcp.abilities.queue_similarity import JACCARD_THRESHOLD, best_match
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import OFFSET_DESC, PER_PAGE_DESC, Input, Output
from datamachine_mcp.engine.catalog import STEP_TYPES
from datamachine_mcp.storage.models import Flow
from datamachine_mcp.storage.timeutil import iso, utcnow

QueueMode = Literal["static", "drain", "loop"]


class QueueTarget(Input):
    flow_id: int = Field(ge=1, description="Flow of the step")
    flow_step_id: str = Field(max_length=300, description=FSID_DESC)


def _require_ai(entry: dict[str, Any]) -> None:
    if entry.get("step_type") != "ai":
        raise AbilityError(
            "invalid_queue_step",
            "Prompt queues exist only on ai steps",
            flow_step_id=entry.get("flow_step_id"),
            step_type=entry.get("step_type"),
        )


def _queue(entry: dict[str, Any]) -> list[dict[str, Any]]:
    queue = entry.get("prompt_queue")
    return [dict(item) for item in queue if isinstance(item, dict)] if isinstance(queue, list) else []


def _mode(entry: dict[str, Any]) -> str:
    mode = entry.get("queue_mode")
    return mode if mode in ("static", "drain", "loop") else "static"


async def _ai_queue(
    ctx: AbilityContext, inp: QueueTarget, *, write: bool
) -> tuple[Flow, dict[str, Any], list[dict[str, Any]]]:
    """The flow (locked, operator, when ``write``; else viewer), its ai step and that step's prompt queue."""
    role: Role = "operator" if write else "viewer"
    flow, entry, _ = await lookup_flow_step(ctx, inp.flow_step_id, inp.flow_id, role, mutating=write, lock=write)
    _require_ai(entry)
    return flow, entry, _queue(entry)


async def _store(ctx: AbilityContext, flow: Flow, entry: dict[str, Any], summary: str, change: str) -> None:
    replace_step(flow, entry)
    await ctx.audit(
        summary,
        target=("flow_step", entry["flow_step_id"]),
        changes=[change],
        agent_id=flow.agent_id,
        flow_id=flow.flow_id,
        pipeline_id=flow.pipeline_id,
    )
    notify_flow(ctx, flow)


class QueueEntry(Output):
    prompt: str = Field(description="The queued prompt")
    added_at: str | None = Field(description="When it was queued (ISO 8601 UTC)")


# --- queue-add --------------------------------------------------------------------------------


class QueueAddIn(QueueTarget):
    prompt: str = Field(max_length=20000, description="Prompt")
    skip_validation: bool = Field(False, description="Skip the duplicate check")


class QueueAddOut(Output):
    flow_id: int = Field(description="Flow id")
    flow_step_id: str = Field(description="Flow step id")
    queue_length: int = Field(description="Entries after adding")
    queue_mode: QueueMode = Field(description="How runs take entries: static, drain or loop")
    entry: QueueEntry = Field(description="The entry added")
    message: str = Field(description="Human-readable result")


@ability(
    "queue-add",
    toolset="flows",
    level="operator",
    description=("Append a prompt to an ai flow step's queue."),
)
async def queue_add(ctx: AbilityContext, inp: QueueAddIn) -> QueueAddOut:
    flow, entry, queue = await _ai_queue(ctx, inp, write=True)
    prompt = inp.prompt.strip()
    if not prompt:
        raise AbilityError("prompt_required", "prompt is required: give a non-empty prompt to queue.")
    if not inp.skip_validation:
        match = best_match(prompt, queue)
        if match is not None:
            reason = (
                f'Rejected: "{prompt}" is {match["similarity"] * 100:.0f}% similar to queued item '
                f'"{match["prompt"]}" (index {match["index"]}).'
            )
            raise AbilityError(
                "duplicate_rejected",
                reason,
                reason=reason,
                match=match,
                source="queue",
                strategy="jaccard",
                threshold=JACCARD_THRESHOLD,
            )
    added = {"prompt": prompt, "added_at": iso(utcnow())}
    queue.append(added)
    await _store(
        ctx,
        flow,
        {**entry, "prompt_queue": queue},
        f"prompt queued on step {entry['flow_step_id']} (queue length {len(queue)})",
        "prompt_queue",
    )
    return QueueAddOut.model_validate(
        {
            "flow_id": flow.flow_id,
            "flow_step_id": entry["flow_step_id"],
            "queue_length": len(queue),
            "queue_mode": _mode(entry),
            "entry": added,
            "message": f"Prompt added at index {len(queue) - 1}; the queue holds {len(queue)} item(s).",
        }
    )


# --- queue-list -------------------------------------------------------------------------------


class QueueListIn(QueueTarget):
    per_page: int = Field(50, ge=1, le=200, description=PER_PAGE_DESC)
    offset: int = Field(0, ge=0, description=OFFSET_DESC)


class IndexedEntry(Output):
    index: int = Field(description="0-based position (0 = head, taken first)")
    prompt: str = Field(description="The queued prompt")
    added_at: str | None = Field(description="When it was queued (ISO 8601 UTC)")


class QueueListOut(Output):
    flow_id: int = Field(description="Flow id")
    flow_step_id: str = Field(description="Flow step id")
    queue: list[IndexedEntry] = Field(description="Entries, head first")
    queue_mode: QueueMode = Field(description="static, drain or loop")
    total: int = Field(description="Entries in the queue")
    per_page: int = Field(description="Page size used")
    offset: int = Field(description="Offset used")


@ability(
    "queue-list",
    toolset="flows",
    level="viewer",
    read_only=True,
    idempotent=True,
    description="List an ai flow step's queued prompts.",
)
async def queue_list(ctx: AbilityContext, inp: QueueListIn) -> QueueListOut:
    flow, entry, queue = await _ai_queue(ctx, inp, write=False)
    page = [
        {"index": i, "prompt": str(item.get("prompt", "")), "added_at": item.get("added_at")}
        for i, item in enumerate(queue)
    ][inp.offset : inp.offset + inp.per_page]
    return QueueListOut.model_validate(
        {
            "flow_id": flow.flow_id,
            "flow_step_id": entry["flow_step_id"],
            "queue": page,
            "queue_mode": _mode(entry),
            "total": len(queue),
            "per_page": inp.per_page,
            "offset": inp.offset,
        }
    )


# --- queue-remove -----------------------------------------------------------------------------


class QueueRemoveIn(QueueTarget):
    index: int = Field(ge=0, description="0-based index (0 = head)")


class QueueRemoveOut(Output):
    flow_id: int = Field(description="Flow id")
    flow_step_id: str = Field(description="Flow step id")
    removed_prompt: QueueEntry = Field(description="The entry removed")
    queue_length: int = Field(description="Entries left")
    message: str = Field(description="Human-readable result")


@ability(
    "queue-remove",
    toolset="flows",
    level="operator",
    destructive=True,
    description="Remove one prompt from a flow step's queue.",
)
async def queue_remove(ctx: AbilityContext, inp: QueueRemoveIn) -> QueueRemoveOut:
    flow, entry, queue = await _ai_queue(ctx, inp, write=True)
    if inp.index >= len(queue):
        raise AbilityError(
            "queue_index_out_of_range",
            f"Index {inp.index} is out of range. Queue has {len(queue)} item(s).",
            index=inp.index,
            queue_length=len(queue),
        )
    removed = queue.pop(inp.index)
    await _store(
        ctx,
        flow,
        {**entry, "prompt_queue": queue},
        f"prompt at index {inp.index} removed from step {entry['flow_step_id']} ({len(queue)} left)",
        "prompt_queue",
    )
    return QueueRemoveOut.model_validate(
        {
            "flow_id": flow.flow_id,
            "flow_step_id": entry["flow_step_id"],
            "removed_prompt": {"prompt": str(removed.get("prompt", "")), "added_at": removed.get("added_at")},
            "queue_length": len(queue),
            "message": f"Removed the prompt at index {inp.index}; {len(queue)} item(s) left.",
        }
    )


# --- queue-clear ------------------------------------------------------------------------------


class QueueClearOut(Output):
    flow_id: int = Field(description="Flow id")
    flow_step_id: str = Field(description="Flow step id")
    cleared_count: int = Field(description="Entries removed")
    message: str = Field(description="Human-readable result")


@ability(
    "queue-clear",
    toolset="flows",
    level="operator",
    destructive=True,
    idempotent=True,
    description="Empty a flow step's prompt queue.",
)
async def queue_clear(ctx: AbilityContext, inp: QueueTarget) -> QueueClearOut:
    flow, entry, queue = await _ai_queue(ctx, inp, write=True)
    count = len(queue)
    if count:
        await _store(
            ctx,
            flow,
            {**entry, "prompt_queue": []},
            f"prompt queue of step {entry['flow_step_id']} cleared ({count} item(s))",
            "prompt_queue",
        )
    return QueueClearOut(
        flow_id=flow.flow_id,
        flow_step_id=entry["flow_step_id"],
        cleared_count=count,
        message=f"Cleared {count} item(s) from the queue." if count else "The queue was already empty.",
    )


# --- queue-mode -------------------------------------------------------------------------------


class QueueModeIn(QueueTarget):
    mode: QueueMode = Field(description="static, drain or loop")


class QueueModeOut(Output):
    flow_id: int = Field(description="Flow id")
    flow_step_id: str = Field(description="Flow step id")
    queue_mode: QueueMode = Field(description="Mode after the call")
    previous_mode: QueueMode = Field(description="Mode before the call")
    message: str = Field(description="Human-readable result")


@ability(
    "queue-mode",
    toolset="flows",
    level="operator",
    idempotent=True,
    description=("Set how a flow step consumes its queue."),
)
async def queue_mode(ctx: AbilityContext, inp: QueueModeIn) -> QueueModeOut:
    flow, entry, _ = await lookup_flow_step(ctx, inp.flow_step_id, inp.flow_id, "operator", mutating=True, lock=True)
    spec = STEP_TYPES.get(entry.get("step_type", ""))
    if spec is None or spec.queue_slot is None:
        raise AbilityError(
            "invalid_queue_step",
            f"Queue modes apply to ai and fetch steps; step {entry.get('flow_step_id')} is a "
            f"{entry.get('step_type')} step.",
            flow_step_id=entry.get("flow_step_id"),
            step_type=entry.get("step_type"),
        )
    previous = _mode(entry)
    if previous != inp.mode or entry.get("queue_mode") != inp.mode:
        await _store(
            ctx,
            flow,
            {**entry, "queue_mode": inp.mode},
            f"queue mode of step {entry['flow_step_id']} set to {inp.mode} (was {previous})",
            "queue_mode",
        )
        message = f"Queue mode set to {inp.mode} (was {previous})."
    else:
        message = f"Queue mode already {inp.mode}; nothing changed."
    return QueueModeOut(
        flow_id=flow.flow_id,
        flow_step_id=entry["flow_step_id"],
        queue_mode=inp.mode,
        previous_mode=previous,
        message=message,
    )
