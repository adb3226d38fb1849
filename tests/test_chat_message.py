"""send-chat-message against local OpenAI/Anthropic fakes and a sampling client."""

from __future__ import annotations

import threading
import time

import anyio
import mcp_types as types
import pytest

from datamachine_mcp.abilities.access import Principal
from tests.conftest import call, connect, fail, log_rows, table_rows
from tests.fake_servers import FakeResponse, RecordedRequest, serve
from tests.feeds import completion
from tests.jobs_support import denied, grant, settings, wait_until

pytestmark = pytest.mark.anyio

USER2 = Principal(user_id=2, transport="http")
ANTHROPIC_OK = {
    "id": "msg_1",
    "type": "message",
    "model": "claude-local",
    "content": [{"type": "text", "text": "Bonjour."}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 7, "output_tokens": 3},
}


@pytest.fixture
def ai():
    with serve() as server:
        yield server


async def use_fakes(owner, ai, **extra) -> None:
    """Point openai and anthropic at the fake server (no API key needed for a non-default base URL)."""
    await settings(
        owner,
        ai_providers={"openai": {"base_url": ai.url("/v1")}, "anthropic": {"base_url": ai.url("/anthropic")}},
        **extra,
    )


async def _true(value: bool) -> bool:
    return value


async def new_session(client, **args) -> str:
    return (await call(client, "create-chat-session", args))["session_id"]


async def send(client, session_id, message="Hello there", **extra):
    return await call(client, "send-chat-message", {"session_id": session_id, "message": message, **extra})


async def test_reply_is_saved_with_history_system_prompt_and_title(runtime, owner, ai):
    await use_fakes(owner, ai)
    ai.script("/v1/chat/completions", FakeResponse(200, completion("Hi! How can I help?", model="m-2026")))
    agent = (
        await call(
            owner,
            "create-agent",
            {"agent_slug": "helper", "agent_config": {"system_prompt": "Be brief.", "default_provider": "openai"}},
        )
    )["agent_id"]
    sid = await new_session(owner, agent_id=agent, model="m1")
    out = await send(owner, sid, "  Hello   there,\n  assistant  ", max_tokens=50, temperature=0.5)
    assert out["provider"] == "openai" and out["model"] == "m1" and out["message_count"] == 2
    assert out["token_usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert out["title"] == "Hello there, assistant"
    reply = out["reply"]
    assert reply["role"] == "assistant" and reply["content"] == "Hi! How can I help?"
    assert reply["metadata"]["provider"] == "openai" and reply["metadata"]["model"] == "m-2026"
    assert reply["metadata"]["token_usage"]["total_tokens"] == 15 and reply["metadata"]["timestamp"].endswith("Z")
    body = ai.to("/v1/chat/completions")[0].json()
    assert body["model"] == "m1" and body["max_tokens"] == 50 and body["temperature"] == 0.5
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello   there,\n  assistant"},
    ]
    session = await call(owner, "get-chat-session", {"session_id": sid})
    assert [m["role"] for m in session["conversation"]] == ["user", "assistant"]
    assert session["provider"] == "openai" and session["model"] == "m1"
    assert session["metadata"]["message_count"] == 2 and session["metadata"]["last_activity"] == session["updated_at"]
    assert session["expires_at"] > session["updated_at"]
    audits = [r for r in await log_rows(runtime) if r["context"].get("ability") == "send-chat-message"]
    assert len(audits) == 1 and "Hello" not in str(audits[0]) and "How can I help" not in str(audits[0])
    # The next turn sends the history (user, assistant, system; not tool messages), then the new message.
    await call(
        owner,
        "update-chat-session",
        {
            "session_id": sid,
            "append_messages": [{"role": "tool", "content": "tool output"}, {"role": "system", "content": "Note."}],
        },
    )
    ai.script("/v1/chat/completions", FakeResponse(200, completion("Second.")))
    out = await send(owner, sid, "And now?")
    assert out["message_count"] == 6 and out["title"] == "Hello there, assistant"
    body = ai.to("/v1/chat/completions")[1].json()
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", "Be brief."),
        ("user", "Hello   there,\n  assistant"),
        ("assistant", "Hi! How can I help?"),
        ("system", "Note."),
        ("user", "And now?"),
    ]
    assert "temperature" not in body and body["max_tokens"] == 1024


async def test_history_is_capped_at_the_latest_100_messages(owner, ai):
    await use_fakes(owner, ai)
    ai.script("/v1/chat/completions", FakeResponse(200, completion("ok")))
    sid = await new_session(owner, provider="openai", model="m")
    batch = [{"role": "user", "content": f"m{i}"} for i in range(100)]
    await call(owner, "update-chat-session", {"session_id": sid, "append_messages": batch})
    await call(owner, "update-chat-session", {"session_id": sid, "append_messages": batch[:5]})
    await send(owner, sid, "last")
    messages = ai.to("/v1/chat/completions")[0].json()["messages"]
    assert len(messages) == 101 and messages[0]["content"] == "m5" and messages[-1]["content"] == "last"


async def test_provider_and_model_resolution_order(owner, ai):
    await use_fakes(owner, ai, default_provider="anthropic", default_model="settings-model")
    ai.script("/v1/chat/completions", FakeResponse(200, completion("from openai")))
    ai.script("/anthropic/v1/messages", FakeResponse(200, ANTHROPIC_OK))
    # settings defaults
    sid = await new_session(owner)
    out = await send(owner, sid)
    assert (out["provider"], out["model"]) == ("anthropic", "settings-model")
    assert out["reply"]["content"] == "Bonjour." and out["token_usage"]["total_tokens"] == 10
    assert ai.to("/anthropic/v1/messages")[-1].json()["model"] == "settings-model"
    # agent default beats settings, agent chat mode beats agent default, per field
    config = {
        "default_provider": "openai",
        "default_model": "agent-default",
        "mode_models": {"chat": {"model": "chat-mode"}, "pipeline": {"model": "pipeline-mode"}},
    }
    agent = (await call(owner, "create-agent", {"agent_slug": "resolver", "agent_config": config}))["agent_id"]
    sid = await new_session(owner, agent_id=agent)
    out = await send(owner, sid)
    assert (out["provider"], out["model"]) == ("openai", "chat-mode")
    # the session's own values (stored by the first call) beat the agent's
    await call(owner, "update-agent", {"agent_id": agent, "agent_config": {**config, "default_provider": "anthropic"}})
    out = await send(owner, sid)
    assert out["provider"] == "openai"
    # the input beats everything, and is stored on the session
    out = await send(owner, sid, provider="anthropic", model="input-model")
    assert (out["provider"], out["model"]) == ("anthropic", "input-model")
    session = await call(owner, "get-chat-session", {"session_id": sid})
    assert (session["provider"], session["model"]) == ("anthropic", "input-model")


async def test_anthropic_key_and_history_shape(owner, ai):
    await use_fakes(owner, ai)
    await settings(owner, ai_providers={"anthropic": {"api_key": "sk-ant"}})
    ai.script("/anthropic/v1/messages", FakeResponse(200, ANTHROPIC_OK))
    agent = (await call(owner, "create-agent", {"agent_slug": "a2", "agent_config": {"system_prompt": "Sys."}}))[
        "agent_id"
    ]
    sid = await new_session(owner, agent_id=agent, provider="anthropic", model="claude")
    await call(
        owner, "update-chat-session", {"session_id": sid, "append_messages": [{"role": "system", "content": "Extra."}]}
    )
    await send(owner, sid, "Salut")
    request = ai.to("/anthropic/v1/messages")[0]
    assert request.headers["x-api-key"] == "sk-ant"
    body = request.json()
    assert body["system"] == "Sys.\n\nExtra." and body["messages"] == [{"role": "user", "content": "Salut"}]


async def test_configuration_errors_save_nothing(runtime, owner, ai):
    sid = await new_session(owner)
    before = await table_rows(runtime)
    await fail(owner, "send-chat-message", {"session_id": sid, "message": "  \n "}, "message_required")
    await fail(owner, "send-chat-message", {"session_id": "nope", "message": "hi"}, "session_not_found")
    err = await fail(owner, "send-chat-message", {"session_id": sid, "message": "hi"}, "provider_not_configured")
    assert err["data"] == {"provider": None}
    err = await fail(
        owner,
        "send-chat-message",
        {"session_id": sid, "message": "hi", "provider": "openai"},
        "provider_not_configured",
    )
    assert err["data"] == {"provider": "openai"} and "model" in err["message"]
    # openai at its default base URL needs a key
    err = await fail(
        owner,
        "send-chat-message",
        {"session_id": sid, "message": "hi", "provider": "openai", "model": "gpt"},
        "provider_not_configured",
    )
    assert err["data"] == {"provider": "openai"}
    for bad, field in (
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 32001}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"provider": "mistral"}, "provider"),
        ({"model": "m" * 101}, "model"),
        ({"colour": "red"}, "colour"),
        ({"message": 5}, "message"),
    ):
        err = await fail(owner, "send-chat-message", {"session_id": sid, "message": "hi", **bad}, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field
    await fail(owner, "send-chat-message", {"message": "hi"}, "invalid_input")
    assert await table_rows(runtime) == before
    assert ai.requests == []
    # an unknown provider stored on the session
    await call(owner, "update-chat-session", {"session_id": sid, "provider": "mistral", "model": "x"})
    before = await table_rows(runtime)
    err = await fail(owner, "send-chat-message", {"session_id": sid, "message": "hi"}, "provider_not_configured")
    assert err["data"] == {"provider": "mistral"}
    assert await table_rows(runtime) == before


@pytest.mark.parametrize(
    ("response", "code", "retryable"),
    [
        (FakeResponse(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}), "http_rate_limited", True),
        (FakeResponse(401, {"error": {"message": "bad key"}}), "http_auth_failed", False),
        (FakeResponse(503, "unavailable"), "http_upstream_error", True),
        (FakeResponse(200, completion("   ")), "empty_ai_response", True),
        (FakeResponse(200, "not json"), "invalid_response", False),
    ],
)
async def test_provider_errors_surface_with_provider_and_retryable(runtime, owner, ai, response, code, retryable):
    await use_fakes(owner, ai)
    ai.script("/v1/chat/completions", response)
    sid = await new_session(owner, provider="openai", model="m")
    before = await table_rows(runtime)
    err = await fail(owner, "send-chat-message", {"session_id": sid, "message": "hi"}, code)
    assert err["data"]["provider"] == "openai" and err["data"]["retryable"] is retryable
    if code == "http_rate_limited":
        assert err["data"]["retry_after"] == 7
    assert await table_rows(runtime) == before


async def test_session_changed_during_the_call_is_a_conflict(runtime, owner, ai):
    await use_fakes(owner, ai)
    release = threading.Event()

    def slow(_request: RecordedRequest) -> FakeResponse:
        release.wait(10)
        return FakeResponse(200, completion("late"))

    ai.route("/v1/chat/completions", slow)
    sid = await new_session(owner, provider="openai", model="m")
    outcome: dict = {}

    async def sending() -> None:
        outcome["err"] = await fail(owner, "send-chat-message", {"session_id": sid, "message": "first"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(sending)
        await wait_until(lambda: _true(bool(ai.requests)))
        # No transaction is held during the provider call, so this write goes through at once.
        await call(
            owner, "update-chat-session", {"session_id": sid, "append_messages": [{"role": "user", "content": "x"}]}
        )
        release.set()
    assert outcome["err"]["code"] == "session_conflict" and outcome["err"]["data"] == {"message_count": 1}
    session = await call(owner, "get-chat-session", {"session_id": sid})
    assert [m["content"] for m in session["conversation"]] == ["x"]


async def test_concurrent_requests_respect_ai_max_concurrent_requests(owner, ai):
    await use_fakes(owner, ai, ai_max_concurrent_requests=1)
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    def counting(_request: RecordedRequest) -> FakeResponse:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.3)
        with lock:
            state["now"] -= 1
        return FakeResponse(200, completion("ok"))

    ai.route("/v1/chat/completions", counting)
    sids = [await new_session(owner, provider="openai", model="m") for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for sid in sids:
            tg.start_soon(send, owner, sid)
    assert len(ai.requests) == 3 and state["max"] == 1


async def test_agent_must_be_readable_and_active(runtime, owner, ai):
    await use_fakes(owner, ai)
    ai.script("/v1/chat/completions", FakeResponse(200, completion("ok")))
    agent = (await call(owner, "create-agent", {"agent_slug": "shared-bot"}))["agent_id"]
    await grant(owner, agent, 2, "viewer")
    async with connect(runtime, USER2) as user2:
        sid = await new_session(user2, agent_id=agent, provider="openai", model="m")
        assert (await send(user2, sid))["message_count"] == 2
        # another user's session is not found (not even for the global admin owner without user_id)
        await fail(owner, "send-chat-message", {"session_id": sid, "message": "hi"}, "session_not_found")
        await call(owner, "revoke-agent-access", {"agent_id": agent, "user_id": 2})
        await denied(runtime, user2, "send-chat-message", {"session_id": sid, "message": "hi"})
        await grant(owner, agent, 2, "viewer")
        await call(owner, "update-agent", {"agent_id": agent, "status": "inactive"})
        before = await table_rows(runtime)
        await fail(user2, "send-chat-message", {"session_id": sid, "message": "hi"}, "agent_inactive")
        assert await table_rows(runtime) == before
    assert len(ai.requests) == 1


# --- the sampling provider: the calling client's model ---------------------------------------------


async def test_sampling_uses_the_calling_clients_model(runtime):
    seen: list[types.CreateMessageRequestParams] = []

    async def sample(_context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        seen.append(params)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="Sampled reply"), model="client-llm"
        )

    async with connect(runtime, sampling_callback=sample) as client:
        agent = (await call(client, "create-agent", {"agent_slug": "s", "agent_config": {"system_prompt": "Sys."}}))[
            "agent_id"
        ]
        sid = await new_session(client, agent_id=agent, provider="sampling", model="hint-model")
        out = await send(client, sid, "Hi", max_tokens=64, temperature=0.1)
        assert out["reply"]["content"] == "Sampled reply" and out["provider"] == "sampling"
        assert out["reply"]["metadata"]["model"] == "client-llm"
        assert out["token_usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        params = seen[0]
        assert params.system_prompt == "Sys." and params.max_tokens == 64 and params.temperature == 0.1
        assert [(m.role, m.content.text) for m in params.messages] == [("user", "Hi")]
        assert params.model_preferences.hints[0].name == "hint-model"
        await send(client, sid, "Again")
        assert [(m.role, m.content.text) for m in seen[1].messages] == [
            ("user", "Hi"),
            ("assistant", "Sampled reply"),
            ("user", "Again"),
        ]


async def test_sampling_unavailable_or_refused(runtime, owner):
    sid = await new_session(owner, provider="sampling", model="m")
    before = await table_rows(runtime)
    err = await fail(owner, "send-chat-message", {"session_id": sid, "message": "hi"}, "sampling_unavailable")
    assert err["data"] == {"provider": "sampling", "retryable": True}
    assert await table_rows(runtime) == before

    async def refuse(_context, _params):
        return types.ErrorData(code=-1, message="User rejected sampling request")

    async with connect(runtime, sampling_callback=refuse) as client:
        err = await fail(client, "send-chat-message", {"session_id": sid, "message": "hi"}, "sampling_rejected")
        assert err["data"]["retryable"] is False and "rejected" in err["message"]
    assert await table_rows(runtime) == before
