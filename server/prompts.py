"""Prompts: guided tasks a user starts from the client (slash commands), each naming the core tools to call.

A prompt costs nothing in the tool list. Each is declared once here: its arguments (with the completion
source that suggests their values) and the messages it renders. Rendering only fills in text; the tools the
model then calls check access as always.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import mcp_types as types
from mcp.shared.exceptions import MCPError

from datamachine_mcp.abilities.uris import FLOW, JOB


@dataclass(frozen=True)
class Argument:
    name: str
    description: str
    required: bool = False
    completion: str | None = None  # completion source (server/completions.py); None = free text


@dataclass(frozen=True)
class PromptSpec:
    name: str
    title: str
    description: str
    render: Callable[[dict[str, str], frozenset[str]], list[types.PromptMessage]]
    arguments: tuple[Argument, ...] = field(default_factory=tuple)
    # The tools its messages tell the model to call (a test checks the text names exactly these): the
    # prompt is offered only where ``uses`` are all listed; a ``follow_ups`` tool is named only when listed,
    # so a read-only or narrowed session still gets the prompts it can carry out.
    uses: frozenset[str] = frozenset()
    follow_ups: frozenset[str] = frozenset()

    def prompt(self) -> types.Prompt:
        return types.Prompt(
            name=self.name,
            title=self.title,
            description=self.description,
            arguments=[
                types.PromptArgument(name=a.name, description=a.description, required=a.required)
                for a in self.arguments
            ],
        )


def _user(text: str) -> types.PromptMessage:
    return types.PromptMessage(role="user", content=types.TextContent(type="text", text=text))


def _link(uri: str, name: str) -> types.PromptMessage:
    return types.PromptMessage(
        role="user", content=types.ResourceLink(uri=uri, name=name, mime_type="application/json")
    )


def positive_id(args: dict[str, str], name: str) -> int:
    """An id argument: digits, optionally followed by the label a completion showed ("12: Feed digest")."""
    raw = (args.get(name) or "").strip()
    head = raw.split(":", 1)[0].strip()
    if not head.isdigit() or int(head) < 1:
        raise MCPError(code=types.INVALID_PARAMS, message=f"{name} must be a positive id such as 12, not {raw!r}.")
    return int(head)


def _either(offer: frozenset[str], *tools: str) -> str:
    """ "`a` or `b`" over the listed ``tools`` ("" when none is listed)."""
    return " or ".join(f"`{t}`" for t in tools if t in offer)


def _feed_digest(args: dict[str, str], offer: frozenset[str]) -> list[types.PromptMessage]:
    feed = args.get("feed_url", "").strip() or "(ask me for the feed URL)"
    publish = args.get("publish_handler", "").strip() or "files"
    schedule = args.get("schedule", "").strip() or "daily"
    return [
        _user(
            f"Build a feed digest with Data Machine, step by step, and tell me what each step did.\n"
            f"Feed: {feed}. Publish with: {publish}. Schedule: {schedule}.\n\n"
            "1. Call `whoami` to see who you act as.\n"
            f"2. Call `get-handlers` and `get-handler-config-fields` for `rss` and `{publish}` to learn their "
            "fields; ask me for any required value you do not have (e.g. the output directory).\n"
            "3. Call `create-pipeline` with `validate_only: true` and a workflow of two steps: "
            f'{{"step_type": "fetch", "handler_slugs": ["rss"]}} and {{"step_type": "publish", '
            f'"handler_slugs": ["{publish}"]}}, each with its `handler_configs`; fix what it reports, then call '
            "it again without validate_only. Note the pipeline_id and flow_id.\n"
            "4. Call `run-flow` with the flow_id and `wait_seconds: 30`. If it returns before the job is final, "
            "follow it with `wait-for-job`; then show me what was published (`get-jobs` with the job_id).\n"
            f"5. Call `schedule-flow` with `{schedule}`, and tell me how to pause it (`pause-flow`)."
        )
    ]


def _diagnose_flow(args: dict[str, str], offer: frozenset[str]) -> list[types.PromptMessage]:
    flow_id = positive_id(args, "flow_id")
    fix = "5. Explain the cause in plain words and propose the fix"
    if "update-flow-step" in offer:
        again = _either(offer, "retry-job", "run-flow")
        fix += " (usually `update-flow-step`), then, once I agree, apply it"
        fix += f" and {again} (the failed job, or the flow again)." if again else "."
    else:
        fix += "; this session cannot apply it, so tell me what to change."
    return [
        _user(
            f"Flow {flow_id} is not doing what I expect. Find out why and propose a fix; change nothing "
            "without asking me.\n\n"
            f"1. Call `get-flows` with flow_id {flow_id}: its steps, handler configs, schedule and last run.\n"
            f"2. Call `get-jobs` with flow_id {flow_id} (and status failed) for its recent jobs, then `get-jobs` "
            "with the job_id of the latest failure for its engine data and packets.\n"
            f"3. Call `read-logs` with flow_id {flow_id} (min_level warning) for errors.\n"
            "4. Compare each step's handler config with `get-handler-config-fields`.\n" + fix
        ),
        _link(FLOW.format(flow_id=flow_id), f"flow-{flow_id}"),
    ]


def _review_approvals(args: dict[str, str], offer: frozenset[str]) -> list[types.PromptMessage]:
    flow_id = positive_id(args, "flow_id") if args.get("flow_id", "").strip() else None
    scope = f" for flow {flow_id}" if flow_id else ""
    listing = f"`list-pending-actions` with flow_id {flow_id}" if flow_id else "`list-pending-actions`"
    return [
        _user(
            f"Review the approvals waiting for a decision{scope}.\n\n"
            f"1. Call {listing} to see them.\n"
            "2. For each one, show me its flow, step description and preview in a few lines.\n"
            "3. Ask me to accept or reject each (with a reason), then call `resolve-pending-action` with its "
            "action_id and my decision. Never decide on my behalf.\n"
            "4. Summarise what was accepted, what was rejected, and which jobs resumed (`get-jobs`)."
        )
    ]


def _explain_job(args: dict[str, str], offer: frozenset[str]) -> list[types.PromptMessage]:
    job_id = positive_id(args, "job_id")
    cases = [
        (_either(offer, "wait-for-job"), "if it is still running"),
        (_either(offer, "retry-job", "fail-job"), "if it failed or is stuck"),
        (_either(offer, "resolve-pending-action"), "if it waits for an approval"),
    ]
    nexts = ", ".join(f"{tools} {when}" for tools, when in cases if tools)
    return [
        _user(
            f"Explain job {job_id} to me: what ran, what came out, and what to do next.\n\n"
            f"1. Call `get-jobs` with job_id {job_id}: status, steps, engine data and packets.\n"
            f"2. Call `read-logs` with job_id {job_id} for what happened along the way.\n"
            "3. Explain in plain words: which flow and steps ran, how many items, what was published, and why "
            "it ended as it did.\n"
            f"4. Suggest the next step{': ' + nexts if nexts else ' in words'}."
        ),
        _link(JOB.format(job_id=job_id), f"job-{job_id}"),
    ]


PROMPTS: tuple[PromptSpec, ...] = (
    PromptSpec(
        name="feed-digest",
        title="Build a feed digest",
        description="Step by step: a flow that fetches a feed and publishes each new item, run once, then scheduled.",
        render=_feed_digest,
        uses=frozenset(
            {"whoami", "get-handlers", "get-handler-config-fields", "create-pipeline", "run-flow", "wait-for-job"}
            | {"get-jobs", "schedule-flow", "pause-flow"}
        ),
        arguments=(
            Argument("feed_url", "RSS or Atom feed: an https:// URL or a file:// path in the files root", True),
            Argument("publish_handler", "Where items go (default files)", completion="publish_handler"),
            Argument("schedule", "How often it runs: hourly, daily, a cron expression (default daily)"),
        ),
    ),
    PromptSpec(
        name="diagnose-flow",
        title="Diagnose a failing flow",
        description="Find out why a flow fails or finds nothing, from its jobs, logs and step configs.",
        render=_diagnose_flow,
        uses=frozenset({"get-flows", "get-jobs", "read-logs", "get-handler-config-fields"}),
        follow_ups=frozenset({"update-flow-step", "retry-job", "run-flow"}),
        arguments=(Argument("flow_id", "The flow to diagnose", True, completion="flow_id"),),
    ),
    PromptSpec(
        name="review-approvals",
        title="Review pending approvals",
        description="Go through the jobs waiting at an approval step and decide each with the user.",
        render=_review_approvals,
        uses=frozenset({"list-pending-actions", "resolve-pending-action", "get-jobs"}),
        arguments=(Argument("flow_id", "Only this flow's approvals (default: all you can see)", completion="flow_id"),),
    ),
    PromptSpec(
        name="explain-job",
        title="Explain a job",
        description="What a job ran, what it produced, why it ended as it did, and what to do next.",
        render=_explain_job,
        uses=frozenset({"get-jobs", "read-logs"}),
        follow_ups=frozenset({"wait-for-job", "retry-job", "fail-job", "resolve-pending-action"}),
        arguments=(Argument("job_id", "The job to explain", True, completion="job_id"),),
    ),
)
BY_NAME = {p.name: p for p in PROMPTS}
BY_TOOL_ANY = frozenset().union(*(p.uses | p.follow_ups for p in PROMPTS))  # every tool a prompt may name


def offered(tools: Iterable[str]) -> list[PromptSpec]:
    """The prompts whose needed tools are all listed in this process."""
    listed = set(tools)
    return [p for p in PROMPTS if p.uses <= listed]


def render(
    name: str, arguments: dict[str, str] | None, offer: Iterable[str] | None = None, *, read_only: bool = False
) -> types.GetPromptResult:
    """The prompt's messages; ``offer`` (the listed tools) hides prompts this process cannot serve."""
    spec = BY_NAME.get(name)
    listed = set(BY_TOOL_ANY if offer is None else offer)
    if spec is not None and not spec.uses <= listed:
        needed = ",".join(sorted(spec.uses - listed))
        raise MCPError(
            code=types.INVALID_PARAMS,
            message=f"Prompt {name} needs tools this server does not list: {needed}. "
            f"Restart it with --tools {needed} (env DATAMACHINE_TOOLS) or --toolsets all"
            + (", without --read-only." if read_only else "."),
        )
    if spec is None:
        names = ", ".join(p.name for p in offered(listed)) or "none in this server"
        raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown prompt: {name}. Prompts: {names}.")
    args = {k: v for k, v in (arguments or {}).items() if isinstance(v, str)}
    missing = [a.name for a in spec.arguments if a.required and not args.get(a.name, "").strip()]
    if missing:
        raise MCPError(code=types.INVALID_PARAMS, message=f"{spec.name} needs {', '.join(missing)}.")
    unknown = sorted(set(args) - {a.name for a in spec.arguments})
    if unknown:
        raise MCPError(
            code=types.INVALID_PARAMS,
            message=f"{spec.name} has no argument {', '.join(unknown)}; "
            f"it takes {', '.join(a.name for a in spec.arguments)}.",
        )
    return types.GetPromptResult(description=spec.description, messages=spec.render(args, frozenset(listed)))
