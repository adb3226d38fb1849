"""Prompts (list, render, argument checks) and completion/complete scoped by the caller's access."""

from __future__ import annotations

import dataclasses
import re

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.server.prompts import BY_NAME
from tests.conftest import call, connect
from tests.jobs_support import USER2, echo_step, make_flow

pytestmark = pytest.mark.anyio

PROMPT = types.PromptReference
TEMPLATE = types.ResourceTemplateReference


async def test_prompts_list_with_described_arguments(owner):
    prompts = {p.name: p for p in (await owner.list_prompts()).prompts}
    assert {"feed-digest", "diagnose-flow", "review-approvals", "explain-job"} <= set(prompts)
    for prompt in prompts.values():
        assert prompt.title and prompt.description, prompt.name
        assert prompt.arguments, prompt.name
        assert all(a.description for a in prompt.arguments), prompt.name
    assert [(a.name, a.required) for a in prompts["diagnose-flow"].arguments] == [("flow_id", True)]
    assert [(a.name, a.required) for a in prompts["explain-job"].arguments] == [("job_id", True)]


RENDER = {
    "feed-digest": {"feed_url": "https://example.org/feed.xml", "schedule": "hourly"},
    "diagnose-flow": {"flow_id": "12: Feed digest"},  # the label a completion showed is accepted
    "review-approvals": {},
    "explain-job": {"job_id": "7"},
}


@pytest.mark.parametrize("name", list(RENDER))
async def test_prompts_render_messages_that_name_core_tools(owner, name):
    result = await owner.get_prompt(name, RENDER[name])
    texts = [m.content.text for m in result.messages if isinstance(m.content, types.TextContent)]
    assert texts and all(m.role == "user" for m in result.messages)
    abilities = load_abilities()
    named = {t for t in re.findall(r"`([a-z][a-z-]+)`", " ".join(texts)) if t in abilities or "-" in t}
    spec = BY_NAME[name]
    assert named == spec.uses | spec.follow_ups, named ^ (spec.uses | spec.follow_ups)
    assert named <= set(abilities), named - set(abilities)
    assert all(abilities[t].core for t in named), [t for t in named if not abilities[t].core]


async def test_prompt_arguments_are_filled_in_and_linked(owner):
    diagnose = await owner.get_prompt("diagnose-flow", {"flow_id": "12: Feed digest"})
    assert "flow_id 12" in diagnose.messages[0].content.text
    link = diagnose.messages[1].content
    assert isinstance(link, types.ResourceLink) and str(link.uri) == "datamachine://flows/12"
    digest = await owner.get_prompt("feed-digest", {"feed_url": "file:///x/feed.xml", "publish_handler": "webhook"})
    text = digest.messages[0].content.text
    assert "file:///x/feed.xml" in text and '"handler_slugs": ["webhook"]' in text and "daily" in text


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("diagnose-flow", {}, "diagnose-flow needs flow_id"),
        ("diagnose-flow", {"flow_id": "abc"}, "flow_id must be a positive id such as 12, not 'abc'"),
        ("explain-job", {"job_id": "0"}, "job_id must be a positive id"),
        ("explain-job", {"job_id": "3", "verbose": "yes"}, "explain-job has no argument verbose; it takes job_id"),
        ("no-such-prompt", {}, "Unknown prompt: no-such-prompt. Prompts: feed-digest"),
    ],
)
async def test_bad_prompt_requests_say_what_to_fix(owner, name, args, message):
    with pytest.raises(MCPError) as info:
        await owner.get_prompt(name, args)
    assert info.value.error.code == types.INVALID_PARAMS
    assert message in info.value.error.message


async def test_prompts_whose_tools_are_not_listed_are_not_offered(runtime):
    logs_only = dataclasses.replace(runtime, toolsets=frozenset({"logs", "system"}))
    async with connect(logs_only) as c:
        assert (await c.list_prompts()).prompts == []
        with pytest.raises(MCPError) as info:  # a hidden prompt says which tools it needs and how to list them
            await c.get_prompt("explain-job", {"job_id": "1"})
        assert info.value.error.message == (
            "Prompt explain-job needs tools this server does not list: get-jobs. "
            "Restart it with --tools get-jobs (env DATAMACHINE_TOOLS) or --toolsets all."
        )
        with pytest.raises(MCPError) as info:  # an unknown name lists only the prompts offered here
            await c.get_prompt("explain", {})
        assert info.value.error.message == "Unknown prompt: explain. Prompts: none in this server."
    with_jobs = dataclasses.replace(runtime, toolsets=frozenset({"core"}), tools=frozenset())
    async with connect(with_jobs) as c:
        assert {p.name for p in (await c.list_prompts()).prompts} == set(BY_NAME)


async def test_a_read_only_session_offers_the_prompts_it_can_carry_out(runtime):
    """Read-only: explain-job and diagnose-flow are offered; their text names only tools that are listed."""
    read_only = dataclasses.replace(runtime, read_only=True)
    async with connect(read_only) as c:
        listed = {t.name for t in (await c.list_tools()).tools}
        assert {p.name for p in (await c.list_prompts()).prompts} == {"diagnose-flow", "explain-job"}
        for name, args in (("diagnose-flow", {"flow_id": "3"}), ("explain-job", {"job_id": "7"})):
            text = (await c.get_prompt(name, args)).messages[0].content.text
            named = set(re.findall(r"`([a-z][a-z-]+-[a-z-]+)`", text))
            assert named and named <= listed, named - listed
        assert "`wait-for-job` if it is still running" in text and "retry-job" not in text
        with pytest.raises(
            MCPError,
            match=r"does not list: create-pipeline,pause-flow,run-flow,schedule-flow\..* without --read-only\.",
        ):
            await c.get_prompt("feed-digest", {"feed_url": "https://example.org/feed.xml"})
        with pytest.raises(MCPError, match=r"Unknown prompt: digest\. Prompts: diagnose-flow, explain-job\."):
            await c.get_prompt("digest", {})


# --- completions --------------------------------------------------------------------------------


async def _values(client, ref, argument: str, value: str = "") -> list[str]:
    return (await client.complete(ref, {"name": argument, "value": value})).completion.values


async def test_completions_offer_only_what_the_caller_may_read(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "owner-bot"})
    mine = await make_flow(owner, [echo_step()], name="Owner digest")
    async with connect(runtime, USER2) as user2:
        await call(user2, "create-agent", {"agent_slug": "second-bot"})
        theirs = await make_flow(user2, [echo_step()], name="Second digest")
        job = await call(user2, "run-flow", {"flow_id": theirs["flow_id"], "wait_seconds": 0})

        flows = await _values(user2, PROMPT(name="diagnose-flow"), "flow_id")
        assert flows == [f"{theirs['flow_id']}: Second digest"]
        assert await _values(user2, TEMPLATE(uri="datamachine://flows/{flow_id}"), "flow_id") == [
            str(theirs["flow_id"])
        ]
        assert await _values(user2, TEMPLATE(uri="datamachine://pipelines/{pipeline_id}"), "pipeline_id") == [
            str(theirs["pipeline_id"])
        ]
        jobs = await _values(user2, PROMPT(name="explain-job"), "job_id")
        assert jobs == [f"{job['job_id']}: pending, Second digest"]
        assert await _values(user2, TEMPLATE(uri="datamachine://agents/{agent_slug}"), "agent_slug") == ["second-bot"]
    # the owner (a global administrator) reads both, newest first, and can narrow by name or id
    every = await _values(owner, PROMPT(name="diagnose-flow"), "flow_id")
    assert every == [f"{theirs['flow_id']}: Second digest", f"{mine['flow_id']}: Owner digest"]
    assert await _values(owner, PROMPT(name="diagnose-flow"), "flow_id", "owner") == [
        f"{mine['flow_id']}: Owner digest"
    ]
    assert await _values(owner, TEMPLATE(uri="datamachine://flows/{flow_id}"), "flow_id", str(mine["flow_id"])) == [
        str(mine["flow_id"])
    ]
    slugs = await _values(owner, TEMPLATE(uri="datamachine://agents/{agent_slug}"), "agent_slug", "own")
    assert slugs == ["owner-bot"]


async def test_completions_for_handlers_levels_and_unknown_arguments(owner):
    publish = await _values(owner, PROMPT(name="feed-digest"), "publish_handler")
    assert "files" in publish and "rss" not in publish
    assert await _values(owner, PROMPT(name="feed-digest"), "publish_handler", "wo") == ["wordpress"]
    levels = await _values(owner, TEMPLATE(uri="datamachine://logs{?level,agent_id,job_id,per_page,offset}"), "level")
    assert levels == ["debug", "info", "warning", "error", "critical"]
    # free-text arguments, variables a template does not have, unknown prompts: nothing to suggest
    assert await _values(owner, PROMPT(name="feed-digest"), "feed_url", "http") == []
    assert await _values(owner, TEMPLATE(uri="datamachine://jobs/{job_id}"), "flow_id") == []
    assert await _values(owner, PROMPT(name="nope"), "flow_id") == []
