"""The sampling bridge: AI steps answered by the connected MCP client's model.

See docs/engine.md, The AI step and Affinity.
"""

from __future__ import annotations

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError, NoBackChannelError

from datamachine_mcp.engine.errors import StepError, classify
from datamachine_mcp.engine.providers import AIRequest
from datamachine_mcp.server.sampling import SamplingBridge
from tests.conftest import call, connect
from tests.jobs_support import engine, job_row, make_flow, settings, wait_until  # noqa: F401 (fixture)

pytestmark = pytest.mark.anyio

REQUEST = AIRequest(model="hint", user="Summarise this", system="Be brief.", max_tokens=32)
SAMPLING = types.ClientCapabilities(sampling=types.SamplingCapability())


def ai_flow_steps() -> list[dict]:
    return [
        {
            "step_type": "system_task",
            "flow_step_settings": {"task_type": "echo", "params": {"text": "payload"}},
        },
        {"step_type": "ai", "provider": "sampling", "model": "client-model", "system_prompt": "Summarise."},
    ]


async def test_an_ai_step_samples_through_the_connected_client(runtime, engine):  # noqa: F811
    seen: list[types.CreateMessageRequestParams] = []

    async def sample(_context, params):
        seen.append(params)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="A summary."), model="client-llm"
        )

    async with connect(runtime, sampling_callback=sample) as client:
        flow = await make_flow(client, ai_flow_steps())
        out = await call(client, "run-flow", {"flow_id": flow["flow_id"], "wait_seconds": 20})
        assert out["job"]["status"] == "completed", out["job"]
        packet = out["job"]["packets"][0]
        assert packet["type"] == "ai_response" and packet["data"]["body"] == "A summary."
        assert packet["metadata"]["provider"] == "sampling" and packet["metadata"]["model"] == "client-llm"
        row = await job_row(runtime, out["job_id"])
        assert row.affinity == runtime.engine.worker_id  # sampling jobs stay in the process holding the session
    params = seen[0]
    assert params.system_prompt == "Summarise." and params.model_preferences.hints[0].name == "client-model"
    assert params.messages[0].content.text.startswith("Title: echo")


async def test_without_a_sampling_client_the_step_is_retried_as_unavailable(runtime, engine):  # noqa: F811
    async with connect(runtime) as client:  # no sampling capability
        await settings(client, retry_base_seconds=60)
        flow = await make_flow(client, ai_flow_steps())
        out = await call(client, "run-flow", {"wait_seconds": 0, "flow_id": flow["flow_id"]})

        async def retried() -> bool:
            row = await job_row(runtime, out["job_id"])
            return row.status == "pending" and bool(row.engine_data.get("retry"))

        await wait_until(retried)
    row = await job_row(runtime, out["job_id"])
    retry = row.engine_data["retry"]
    assert retry["history"][0]["error"] == "sampling_unavailable" and retry["last_class"] == "upstream"
    assert row.attempts == 1


# --- the bridge on its own ------------------------------------------------------------------------


class StubSession:
    def __init__(self, name: str, *, sampling: bool = True, error: Exception | None = None) -> None:
        self.name = name
        self.client_capabilities = SAMPLING if sampling else types.ClientCapabilities()
        self.error = error
        self.requests: list = []

    async def send_request(self, request, result_type, request_read_timeout_seconds=None, metadata=None):
        self.requests.append((request, request_read_timeout_seconds))
        if self.error is not None:
            raise self.error
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=f"from {self.name}"), model=self.name
        )


async def test_bridge_prefers_the_origin_session_then_the_users_latest():
    bridge = SamplingBridge(timeout=5)
    old, other_user, plain, latest = (
        StubSession("old"),
        StubSession("other"),
        StubSession("plain", sampling=False),
        StubSession("latest"),
    )
    bridge.remember(1, old, user_id=1, session_id="sess-old")
    bridge.remember(2, other_user, user_id=2)
    bridge.remember(3, latest, user_id=1)
    bridge.remember(4, plain, user_id=1)
    assert (await bridge.complete(REQUEST, user_id=1)).text == "from latest"
    assert (await bridge.complete(REQUEST, user_id=1, origin_session_id="sess-old")).text == "from old"
    assert (await bridge.complete(REQUEST, user_id=2)).text == "from other"
    request, timeout = latest.requests[0]
    assert timeout == 5 and request.params.system_prompt == "Be brief." and request.params.max_tokens == 32
    err = await _fails(bridge.complete(REQUEST, user_id=3), "sampling_unavailable")
    assert classify(err) == (True, "upstream")


async def test_bridge_skips_closed_and_back_channel_less_sessions():
    bridge = SamplingBridge(timeout=5)
    closed = StubSession("closed", error=MCPError(code=types.CONNECTION_CLOSED, message="Connection closed"))
    no_channel = StubSession("modern", error=NoBackChannelError("sampling/createMessage"))
    good = StubSession("good")
    bridge.remember(1, good, user_id=1)
    bridge.remember(2, no_channel, user_id=1)
    bridge.remember(3, closed, user_id=1)
    assert (await bridge.complete(REQUEST, user_id=1)).text == "from good"
    assert bridge.candidates(origin_session_id=None, user_id=1) == [(2, no_channel), (1, good)]  # closed forgotten
    bridge.forget(1)
    await _fails(bridge.complete(REQUEST, user_id=1), "sampling_unavailable")


async def test_bridge_maps_timeouts_refusals_and_empty_replies():
    timeout = StubSession("slow", error=MCPError(code=types.REQUEST_TIMEOUT, message="timed out"))
    err = await _fails(SamplingBridge(timeout=1).complete(REQUEST, session=timeout), "sampling_timeout")
    assert classify(err) == (True, "upstream")
    refused = StubSession("no", error=MCPError(code=-1, message="User rejected"))
    err = await _fails(SamplingBridge().complete(REQUEST, session=refused, timeout=1), "sampling_rejected")
    assert classify(err) == (False, None)
    await _fails(SamplingBridge().complete(REQUEST, session=StubSession("x", sampling=False)), "sampling_unavailable")

    class Empty(StubSession):
        async def send_request(self, *args, **kwargs):
            return types.CreateMessageResult(
                role="assistant", content=types.TextContent(type="text", text=" "), model="m"
            )

    await _fails(SamplingBridge(timeout=1).complete(REQUEST, session=Empty("e")), "empty_ai_response")


async def _fails(coro, code: str) -> StepError:
    with pytest.raises(StepError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value
