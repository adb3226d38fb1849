"""AI providers against OpenAI- and Anthropic-compatible fakes on 127.0.0.1."""

from __future__ import annotations

import anyio
import pytest

from datamachine_mcp.engine.errors import StepError, classify
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.providers import AIRequest, ai_slots, complete, provider_settings
from tests.fake_servers import FakeResponse, make_snapshot, serve

pytestmark = pytest.mark.anyio

REQUEST = AIRequest(
    model="test-model", system="You are terse.", user="Summarise: hello", max_tokens=64, temperature=0.2
)

OPENAI_OK = {
    "id": "chatcmpl-1",
    "model": "test-model-2026",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello summary"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
}
ANTHROPIC_OK = {
    "id": "msg_1",
    "type": "message",
    "model": "claude-test",
    "content": [
        {"type": "text", "text": "Part one. "},
        {"type": "tool_use", "id": "t", "name": "x", "input": {}},
        {"type": "text", "text": "Part two."},
    ],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 12, "output_tokens": 7},
}


@pytest.fixture
def server():
    with serve() as s:
        yield s


@pytest.fixture
async def out(tmp_path):
    async with Outbound(make_snapshot(tmp_path), "9.9.9-test") as outbound:
        yield outbound


async def fail(code, coro) -> StepError:
    with pytest.raises(StepError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


# -- openai ------------------------------------------------------------------------------------


async def test_openai_compatible_completion_with_usage(server, out):
    server.script("/v1/chat/completions", FakeResponse(200, OPENAI_OK))
    response = await complete("openai", REQUEST, base_url=server.url("/v1/"), api_key="sk-test", outbound=out)
    assert response.text == "Hello summary"
    assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (10, 5, 15)
    assert response.token_usage == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert response.finish_reason == "stop" and response.model == "test-model-2026"
    (request,) = server.requests
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["user-agent"] == "datamachine-mcp/9.9.9-test"
    assert request.json() == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarise: hello"},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
    }


async def test_openai_without_key_for_a_local_server(server, out):
    body = {"choices": [{"message": {"content": "ok"}, "finish_reason": "length"}]}  # no usage, no model
    server.script("/v1/chat/completions", FakeResponse(200, body))
    bare = AIRequest(model="local", user="hi")
    response = await complete("openai", bare, base_url=server.url("/v1"), api_key=None, outbound=out)
    assert (response.text, response.total_tokens, response.model, response.finish_reason) == (
        "ok",
        0,
        "local",
        "length",
    )
    (request,) = server.requests
    assert "authorization" not in request.headers
    assert request.json() == {"model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1024}


async def test_openai_default_base_needs_a_key(out):
    for base in (None, "https://api.openai.com/v1", "https://api.openai.com/v1/"):
        err = await fail(
            "provider_not_configured", complete("openai", REQUEST, base_url=base, api_key=None, outbound=out)
        )
        assert classify(err) == (False, None)


async def test_unknown_provider(out):
    await fail("provider_not_configured", complete("sampling", REQUEST, base_url=None, api_key=None, outbound=out))


async def test_openai_empty_completion_is_retryable(server, out):
    server.script(
        "/v1/chat/completions",
        FakeResponse(200, {"choices": [{"message": {"content": "  \n"}, "finish_reason": "stop"}]}),
        FakeResponse(200, {"choices": []}),
        FakeResponse(200, {"choices": [{"message": {"content": None}}]}),
    )
    for _ in range(3):
        err = await fail(
            "empty_ai_response", complete("openai", REQUEST, base_url=server.url("/v1"), api_key="k", outbound=out)
        )
        assert classify(err) == (True, "upstream")
        assert err.to_dict()["class"] == "upstream"


async def test_openai_http_errors(server, out):
    url = server.url("/v1")
    server.script(
        "/v1/chat/completions",
        FakeResponse(429, {"error": {"message": "Rate limit reached", "type": "requests"}}, {"Retry-After": "20"}),
        FakeResponse(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}),
        FakeResponse(400, {"error": {"message": "The server is overloaded, try again", "code": "overloaded"}}),
        FakeResponse(400, {"error": {"message": "max_tokens is too large"}}),
        FakeResponse(200, "<html>proxy page</html>"),
    )
    rate = await fail("http_rate_limited", complete("openai", REQUEST, base_url=url, api_key="k", outbound=out))
    assert rate.retry_after == 20.0 and "Rate limit reached" in rate.message
    assert classify(rate) == (True, "rate_limit")
    assert rate.diagnostics["provider"] == "openai"
    auth = await fail("http_auth_failed", complete("openai", REQUEST, base_url=url, api_key="k", outbound=out))
    assert classify(auth) == (False, None) and "Incorrect API key" in auth.message
    busy = await fail("http_rejected", complete("openai", REQUEST, base_url=url, api_key="k", outbound=out))
    assert classify(busy) == (True, "upstream")  # provider message heuristic (rule 5 of Retryable classification)
    bad = await fail("http_rejected", complete("openai", REQUEST, base_url=url, api_key="k", outbound=out))
    assert classify(bad) == (False, None)
    await fail("invalid_response", complete("openai", REQUEST, base_url=url, api_key="k", outbound=out))


async def test_provider_timeout(server, out):
    server.script("/v1/chat/completions", FakeResponse(200, OPENAI_OK, delay=2.0))
    err = await fail(
        "http_timeout", complete("openai", REQUEST, base_url=server.url("/v1"), api_key="k", outbound=out, timeout=0.3)
    )
    assert classify(err) == (True, "transport")


async def test_providers_may_use_local_servers_when_private_networks_are_off(server, tmp_path):
    server.script("/v1/chat/completions", FakeResponse(200, OPENAI_OK))
    snap = make_snapshot(tmp_path, outbound_allow_private_networks=False)
    async with Outbound(snap, "1") as strict:
        response = await complete("openai", REQUEST, base_url=server.url("/v1"), api_key=None, outbound=strict)
    assert response.text == "Hello summary"


# -- anthropic ---------------------------------------------------------------------------------


async def test_anthropic_messages_with_usage(server, out):
    server.script("/v1/messages", FakeResponse(200, ANTHROPIC_OK))
    response = await complete(
        "anthropic", REQUEST, base_url=server.base_url + "/", api_key="ak-test", version="2024-01-01", outbound=out
    )
    assert response.text == "Part one. Part two."
    assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (12, 7, 19)
    assert response.finish_reason == "end_turn" and response.model == "claude-test"
    (request,) = server.requests
    assert request.headers["x-api-key"] == "ak-test"
    assert request.headers["anthropic-version"] == "2024-01-01"
    assert "authorization" not in request.headers
    assert request.json() == {
        "model": "test-model",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Summarise: hello"}],
        "system": "You are terse.",
        "temperature": 0.2,
    }


async def test_anthropic_defaults_and_key_requirement(server, out):
    server.script("/v1/messages", FakeResponse(200, ANTHROPIC_OK))
    await complete("anthropic", AIRequest(model="m", user="u"), base_url=server.base_url, api_key=None, outbound=out)
    (request,) = server.requests
    assert request.headers["anthropic-version"] == "2023-06-01" and "x-api-key" not in request.headers
    assert request.json() == {"model": "m", "max_tokens": 1024, "messages": [{"role": "user", "content": "u"}]}
    await fail("provider_not_configured", complete("anthropic", REQUEST, base_url=None, api_key=None, outbound=out))


async def test_anthropic_errors(server, out):
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    server.script(
        "/v1/messages",
        FakeResponse(529, overloaded),
        FakeResponse(
            429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}, {"Retry-After": "3"}
        ),
        FakeResponse(200, {"content": [{"type": "tool_use", "id": "t"}], "stop_reason": "tool_use"}),
        FakeResponse(200, {"content": [], "stop_reason": "end_turn"}),
    )
    kwargs = {"base_url": server.base_url, "api_key": "k", "outbound": out}
    err = await fail("http_upstream_error", complete("anthropic", REQUEST, **kwargs))
    assert err.http_status == 529 and classify(err) == (True, "upstream")
    assert err.diagnostics["error_type"] == "overloaded_error"
    err = await fail("http_rate_limited", complete("anthropic", REQUEST, **kwargs))
    assert err.retry_after == 3.0 and classify(err) == (True, "rate_limit")
    for _ in range(2):
        err = await fail("empty_ai_response", complete("anthropic", REQUEST, **kwargs))
        assert classify(err) == (True, "upstream")


def test_provider_settings(tmp_path):
    snap = make_snapshot(tmp_path)
    assert provider_settings(snap, "anthropic") == {"base_url": "https://api.anthropic.com", "version": "2023-06-01"}
    assert provider_settings(snap, "openai") == {"base_url": "https://api.openai.com/v1", "version": None}


# -- concurrency -------------------------------------------------------------------------------


async def test_ai_slots_limit_requests_in_flight(server, out):
    server.script("/v1/chat/completions", FakeResponse(200, OPENAI_OK, delay=0.2))
    in_flight = 0
    peak = 0

    async def one() -> None:
        nonlocal in_flight, peak
        async with ai_slots(2):
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await complete("openai", REQUEST, base_url=server.url("/v1"), api_key="k", outbound=out)
            finally:
                in_flight -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert peak == 2 and len(server.requests) == 5
    assert ai_slots(3) is ai_slots(3)  # one process-wide limiter, resized
    assert ai_slots(4).total_tokens == 4


def test_a_port_number_in_the_message_is_not_a_retry_hint():
    """A 401 from a server on port 50429 is not a rate limit: the heuristic reads words, not URLs."""
    error = StepError(
        "http_auth_failed",
        "POST http://127.0.0.1:50429/v1/chat/completions answered 401",
        http_status=401,
        provider="openai",
    )
    assert classify(error) == (False, None)
    assert classify(error.to_dict() | {"provider": "openai"}) == (False, None)
