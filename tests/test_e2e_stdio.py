"""End to end over a real stdio subprocess (``python -m datamachine_mcp.server.cli``) with its in-process worker, against
local fake servers on 127.0.0.1: an RSS feed, an OpenAI-compatible model and a webhook receiver.

Every process gets XDG_DATA_HOME and DATAMACHINE_DATA_DIR inside tmp_path; the files roots are
``<data>/files``. The database is inspected read-only with sqlite3 for row counts the tools do not show.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.conftest import call, fail
from tests.fake_servers import FakeResponse, RecordedRequest, serve
from tests.feeds import RSS_HEADERS, completion, ident, rss
from tests.jobs_support import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


class Node:
    """One server process: its MCP client, database and data directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = tmp_path / "dm.db"
        self.data = tmp_path / "data"
        self.inbox = self.data / "files" / "in"
        self.outbox = self.data / "files" / "out"
        self.outbox.mkdir(parents=True, exist_ok=True)

    def params(self) -> StdioServerParameters:
        env = {
            "XDG_DATA_HOME": str(self.tmp / "xdg"),
            "DATAMACHINE_DATA_DIR": str(self.data),
            "PYTHONUNBUFFERED": "1",
        }
        return StdioServerParameters(
            command=sys.executable,
            args=["-m", "datamachine_mcp.server.cli", "--db", str(self.db), "--toolsets", "all"],
            env=env,
        )

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        async with Client(self.params(), mode="legacy") as client:
            yield client

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)) as conn:
            return conn.execute(sql, args).fetchall()

    def processed(self, flow_id: int) -> list[tuple[str, str]]:
        return self.rows(
            "SELECT item_identifier, status FROM datamachine_processed_items WHERE flow_key = ? ORDER BY id", flow_id
        )

    def written(self) -> list[Path]:
        return sorted(p for p in self.outbox.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope, so one server process can serve several tests


@pytest.fixture(scope="module")
def world():
    with serve() as server:
        yield server


@pytest.fixture(scope="module")
async def shared(tmp_path_factory) -> AsyncIterator[tuple[Node, Client]]:
    """One server process for the scenarios that need no restart (starting one costs seconds)."""
    node = Node(tmp_path_factory.mktemp("e2e"))
    async with node.client() as client:
        await call(client, "update-settings", {"settings": {"retry_base_seconds": 1}})
        yield node, client


class Env:
    """A test's view of the shared process: its own output directory, feed path and model endpoint."""

    def __init__(self, node: Node, client: Client, world, name: str) -> None:
        self.node, self.client, self.world, self.name = node, client, world, name
        self.outbox = node.outbox / name
        self.outbox.mkdir()
        self.model = f"/{name}/v1/chat/completions"

    def feed(self, *items: Any) -> str:
        return self.world.script(f"/{self.name}/feed.xml", FakeResponse(200, rss(*items), RSS_HEADERS))

    def answers(self, *responses: FakeResponse) -> None:
        self.world.script(self.model, *responses)

    def model_requests(self) -> list[RecordedRequest]:
        return self.world.to(self.model)

    def written(self) -> list[Path]:
        return sorted(p for p in self.outbox.rglob("*") if p.is_file())

    async def use_model(self) -> None:
        """Point the openai provider at this test's model endpoint (no key needed off api.openai.com)."""
        base = self.world.url(f"/{self.name}/v1")
        await call(self.client, "update-settings", {"settings": {"ai_providers": {"openai": {"base_url": base}}}})


@pytest.fixture
async def env(shared, world, request) -> Env:
    node, client = shared
    out = Env(node, client, world, request.node.name.split("[")[0].removeprefix("test_")[:40])
    await out.use_model()
    return out


def feed_step(url: str, max_items: int = 1) -> dict[str, Any]:
    return {
        "step_type": "fetch",
        "handler_slugs": ["rss"],
        "handler_configs": {"rss": {"feed_url": url, "max_items": max_items}},
    }


AI_STEP = {"step_type": "ai", "provider": "openai", "model": "local-model", "system_prompt": "Summarise in one line."}


def files_step(directory: Path, template: str = "{slug}.md") -> dict[str, Any]:
    return {
        "step_type": "publish",
        "handler_slugs": ["files"],
        "handler_configs": {"files": {"directory": str(directory), "filename_template": template}},
    }


async def pipeline(client: Client, steps: list[dict[str, Any]], name: str = "E2E") -> dict[str, Any]:
    return await call(client, "create-pipeline", {"pipeline_name": name, "workflow": {"steps": steps}})


async def run(client: Client, flow_id: int, wait: float = 30, **extra: Any) -> dict[str, Any]:
    return await call(client, "run-flow", {"flow_id": flow_id, "wait_seconds": wait, **extra})


async def job(client: Client, job_id: int) -> dict[str, Any]:
    return (await call(client, "get-jobs", {"job_id": job_id}))["jobs"][0]


# --- the pipeline, twice ---------------------------------------------------------------------------


async def test_rss_ai_files_pipeline_runs_and_the_second_run_finds_nothing_new(env):
    url = env.feed(("one", "First story"))
    env.answers(FakeResponse(200, completion("A one-line summary.")))
    client, node = env.client, env.node
    flow = await pipeline(client, [feed_step(url), AI_STEP, files_step(env.outbox)])
    first = await run(client, flow["flow_id"])
    assert first["job"]["status"] == "completed", first["job"]
    (written,) = env.written()
    text = written.read_text()
    assert written.name == "first-story.md" and "A one-line summary." in text
    assert f'item_identifier: "{ident("one")}"' in text and f"job_id: {first['job_id']}" in text
    model_request = env.model_requests()[0].json()
    assert model_request["model"] == "local-model"
    assert model_request["messages"][0] == {"role": "system", "content": "Summarise in one line."}
    assert "Title: First story" in model_request["messages"][1]["content"]
    assert node.processed(flow["flow_id"]) == [(ident("one"), "processed")]
    detail = await job(client, first["job_id"])
    assert detail["engine_data"]["token_usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}

    second = await run(client, flow["flow_id"])
    assert second["job"]["status"] == "completed_no_items"
    assert len(env.written()) == 1 and len(env.model_requests()) == 1
    assert node.processed(flow["flow_id"]) == [(ident("one"), "processed")]
    assert len(env.world.to(f"/{env.name}/feed.xml")) == 2


async def test_three_new_items_fan_out_to_three_children(env):
    items = [("a", "Alpha"), ("b", "Beta"), ("c", "Gamma")]
    url = env.feed(*items)
    env.answers(FakeResponse(200, completion("Summary.")))
    client = env.client
    flow = await pipeline(client, [feed_step(url, max_items=0), AI_STEP, files_step(env.outbox)])
    parent = await run(client, flow["flow_id"], wait=40)
    assert parent["job"]["status"] == "completed", parent["job"]
    assert parent["job"]["child_counts"] == {"total": 3, "completed": 3}
    detail = (await job(client, parent["job_id"]))["engine_data"]
    assert detail["batch_results"] == {"completed": 3, "failed": 0, "skipped": 0, "cancelled": 0, "total": 3}
    # the children's AI usage is the batch's: 3 calls of 10 + 5 tokens
    usage = {"prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45}
    assert detail["token_usage"] == usage
    assert (await call(client, "get-run-metrics", {"job_id": parent["job_id"]}))["metrics"]["token_usage"] == usage
    children = (await call(client, "get-jobs", {"parent_job_id": parent["job_id"]}))["jobs"]
    assert sorted(c["label"] for c in children) == ["Alpha", "Beta", "Gamma"]
    assert {c["run_trigger"] for c in children} == {"batch"}
    assert {c["base_status"] for c in children} == {"completed"}
    assert [p.name for p in env.written()] == ["alpha.md", "beta.md", "gamma.md"]
    assert sorted(env.node.processed(flow["flow_id"])) == sorted((ident(i), "processed") for i, _ in items)
    assert len(env.model_requests()) == 3


# --- retries and release of items ------------------------------------------------------------------


async def test_rate_limited_provider_is_retried_with_backoff(env):
    url = env.feed(("r", "Retry me"))
    env.answers(
        FakeResponse(429, {"error": {"message": "Rate limit reached"}}),
        FakeResponse(200, completion("After the retry.")),
    )
    client = env.client
    flow = await pipeline(client, [feed_step(url), AI_STEP, files_step(env.outbox)])
    out = await run(client, flow["flow_id"], wait=30)
    assert out["job"]["status"] == "completed", out["job"]
    retry = (await job(client, out["job_id"]))["engine_data"]["retry"]
    assert retry["total_retries"] == 1
    (entry,) = retry["history"]
    assert entry["class"] == "rate_limit" and entry["error"] == "http_rate_limited"
    assert entry["delay_seconds"] == 1  # retry_base_seconds, shrunk to 1 for the test
    assert len(env.model_requests()) == 2
    assert "After the retry." in env.written()[0].read_text()
    assert env.node.processed(flow["flow_id"]) == [(ident("r"), "processed")]


async def test_failing_provider_fails_the_job_and_releases_its_items(env):
    url = env.feed(("f", "Fragile"))
    down = FakeResponse(500, {"error": {"message": "internal error"}})
    env.answers(down, down, down, down, FakeResponse(200, completion("Finally.")))
    client, node = env.client, env.node
    flow = await pipeline(client, [feed_step(url), AI_STEP, files_step(env.outbox)])
    failed = await run(client, flow["flow_id"], wait=30)
    assert failed["job"]["status"] == "failed - http_upstream_error", failed["job"]
    assert failed["job"]["attempts"] == 3 and len(env.model_requests()) == 3
    assert failed["job"]["error"]["message"].endswith("(after 3 attempts)")
    assert node.processed(flow["flow_id"]) == []  # the claim was released, not dead-lettered
    assert env.written() == []
    # A later run takes the item again (meets the 4th failure, retries once, succeeds).
    later = await run(client, flow["flow_id"], wait=30)
    assert later["job"]["status"] == "completed", later["job"]
    assert len(env.model_requests()) == 5
    assert node.processed(flow["flow_id"]) == [(ident("f"), "processed")]
    assert len(env.written()) == 1


async def test_idempotency_key_returns_the_same_job(env):
    url = env.feed(("i", "Once"))
    client = env.client
    flow = await pipeline(client, [feed_step(url), files_step(env.outbox)])
    first = await call(
        client, "run-flow", {"wait_seconds": 0, "flow_id": flow["flow_id"], "idempotency_key": "deploy-42"}
    )
    again = await call(
        client, "run-flow", {"flow_id": flow["flow_id"], "idempotency_key": "deploy-42", "wait_seconds": 20}
    )
    assert again["job_id"] == first["job_id"] and again["replayed"] is True and first["replayed"] is False
    assert again["job"]["status"] == "completed"
    jobs = await call(client, "get-jobs", {"flow_id": flow["flow_id"]})
    assert jobs["total"] == 1 and len(env.written()) == 1


# --- cancelling and approving ----------------------------------------------------------------------


async def test_cancel_during_a_long_step_abandons_it(env):
    """cancel-job while the model call hangs: the job ends cancelled, the worker's heartbeat finds its
    lease gone and drops the step, nothing is published and the item is released for a later run."""
    url = env.feed(("slow", "Slow story"))
    env.answers(FakeResponse(200, completion("Too late."), delay=12))
    client, node = env.client, env.node
    await call(client, "update-settings", {"settings": {"lease_ttl_seconds": 15}})  # heartbeat every 3.75 s
    flow = await pipeline(client, [feed_step(url), AI_STEP, files_step(env.outbox)])
    started = await call(client, "run-flow", {"wait_seconds": 0, "flow_id": flow["flow_id"]})

    async def model_called() -> bool:
        return bool(env.model_requests())

    await wait_until(model_called, seconds=20)
    cancelled = await call(client, "cancel-job", {"job_id": started["job_id"], "reason": "operator said stop"})
    assert cancelled["changed"] is True and cancelled["new_status"] == "cancelled - operator said stop"
    assert node.processed(flow["flow_id"]) == []  # released at once
    # Past the model's answer: the abandoned step committed nothing and wrote nothing.
    final = await call(client, "wait-for-job", {"job_id": started["job_id"], "timeout_seconds": 0})
    await anyio.sleep(14)
    after = await job(client, started["job_id"])
    assert after["status"] == "cancelled - operator said stop" and final["final"] is True
    assert env.written() == [] and node.processed(flow["flow_id"]) == []
    lost = node.rows(
        "SELECT count(*) FROM datamachine_logs WHERE job_id = ? AND message LIKE '%lease lost%'", after["job_id"]
    )
    assert lost[0][0] == 1
    # The item is free: a later run (with a prompt model) takes it.
    env.answers(FakeResponse(200, completion("On time.")))
    again = await run(client, flow["flow_id"])
    assert again["job"]["status"] == "completed", again["job"]
    assert len(env.written()) == 1


def approval_step(on_reject: str) -> dict[str, Any]:
    return {
        "step_type": "approval",
        "flow_step_settings": {"description": "Check before publishing", "on_reject": on_reject},
    }


async def gated_run(env: Env, item: str, on_reject: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Run feed → approval → files until the job waits; returns (flow, pending action, job status)."""
    url = env.world.script(f"/{env.name}/{item}.xml", FakeResponse(200, rss((item, f"Story {item}")), RSS_HEADERS))
    flow = await pipeline(env.client, [feed_step(url), approval_step(on_reject), files_step(env.outbox)], name=item)
    started = await call(env.client, "run-flow", {"wait_seconds": 0, "flow_id": flow["flow_id"]})
    waited = await call(
        env.client, "wait-for-job", {"job_id": started["job_id"], "timeout_seconds": 20, "stop_on_waiting": True}
    )
    assert waited["job"]["base_status"] == "waiting", waited["job"]
    actions = await call(env.client, "list-pending-actions", {"flow_id": flow["flow_id"]})
    (action,) = actions["actions"]
    assert action["description"] == "Check before publishing" and action["preview"]["title"] == f"Story {item}"
    return flow, action, waited["job"]["status"]


async def test_approval_gate_approve_reject_skip_and_reject_fail(env):
    client, node = env.client, env.node
    # accepted: the job resumes after the gate and publishes
    flow, action, _ = await gated_run(env, "yes", "skip")
    decided = await call(client, "resolve-pending-action", {"action_id": action["action_id"], "decision": "accepted"})
    done = await call(client, "wait-for-job", {"job_id": decided["job_id"], "timeout_seconds": 20})
    assert done["job"]["status"] == "completed" and [p.name for p in env.written()] == ["story-yes.md"]
    assert node.processed(flow["flow_id"]) == [(ident("yes"), "processed")]
    second = await fail(client, "resolve-pending-action", {"action_id": action["action_id"], "decision": "rejected"})
    assert second["code"] == "pending_action_already_resolved" and second["data"]["status"] == "accepted"
    # rejected with on_reject skip: agent_skipped, the item stays processed (not proposed again)
    flow, action, _ = await gated_run(env, "skip", "skip")
    decided = await call(
        client,
        "resolve-pending-action",
        {"action_id": action["action_id"], "decision": "rejected", "note": "off-topic"},
    )
    assert decided["job_status"] == "agent_skipped - approval_rejected"
    assert node.processed(flow["flow_id"]) == [(ident("skip"), "processed")]
    # rejected with on_reject fail: failed, the item is released
    flow, action, _ = await gated_run(env, "fail", "fail")
    decided = await call(client, "resolve-pending-action", {"action_id": action["action_id"], "decision": "rejected"})
    assert decided["job_status"] == "failed - approval_rejected"
    assert node.processed(flow["flow_id"]) == []
    assert [p.name for p in env.written()] == ["story-yes.md"]  # only the accepted item was published
    recorded = await call(client, "get-pending-action", {"action_id": action["action_id"]})
    assert recorded["action"]["status"] == "rejected" and recorded["action"]["decided_by_user_id"] == 1


# --- publishing safely -----------------------------------------------------------------------------


async def test_webhook_publish_is_signed_and_verified_by_the_receiver(env):
    url = env.feed(("w", "Signed news"))
    secret = "shared-secret"
    verified: list[dict[str, Any]] = []

    def receiver(request: RecordedRequest) -> FakeResponse:
        stamp = request.headers.get("x-datamachine-timestamp", "")
        expected = hmac.new(secret.encode(), stamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("x-datamachine-signature", "")):
            return FakeResponse(401, {"error": "bad signature"})
        verified.append(json.loads(request.body))
        return FakeResponse(200, {"ok": True})

    hook = env.world.route(f"/{env.name}/hook", receiver)
    client = env.client
    publish = {
        "step_type": "publish",
        "handler_slugs": ["webhook"],
        "handler_configs": {"webhook": {"url": hook, "secret": secret}},
    }
    flow = await pipeline(client, [feed_step(url), publish])
    stored = await call(client, "get-flow-steps", {"flow_id": flow["flow_id"]})
    assert secret not in json.dumps(stored)  # stored encrypted, read back masked
    out = await run(client, flow["flow_id"])
    assert out["job"]["status"] == "completed", out["job"]
    (body,) = verified
    assert body["event"] == "datamachine.publish" and body["job_id"] == out["job_id"]
    assert body["packet"]["data"]["title"] == "Signed news"
    assert body["engine"]["item_identifier"] == ident("w")
    (request,) = env.world.to(f"/{env.name}/hook")
    assert request.headers["x-datamachine-delivery"] == body["delivery_id"]
    result = out["job"]["packets"][0]["data"]["results"][0]
    assert result["handler"] == "webhook" and result["status_code"] == 200


async def test_files_publish_refuses_path_escapes(env, tmp_path):
    url = env.feed(("x", "Escape attempt"))
    client = env.client
    # A template that escapes literally is refused when the config is saved (invalid_handler_config, in
    # workflow mode as in update-flow-step), and nothing changes.
    bad = {"pipeline_name": "Bad", "workflow": {"steps": [feed_step(url), files_step(env.outbox, "../{slug}.md")]}}
    err = await fail(client, "create-pipeline", bad, "invalid_handler_config")
    assert err["data"]["step"] == 1 and err["data"]["field_errors"][0]["field"] == "filename_template"
    flow = await pipeline(client, [feed_step(url), files_step(env.outbox)])
    publish_id = flow["flow_step_ids"][1]
    update = {"flow_step_id": publish_id, "handler_config": {"filename_template": "../{slug}.md"}}
    err = await fail(client, "update-flow-step", update, "invalid_handler_config")
    assert err["data"]["field_errors"][0]["field"] == "filename_template"
    # One the save check cannot see: a symlink inside the directory that leads outside the roots.
    outside = tmp_path / "outside"
    outside.mkdir()
    (env.outbox / "link").symlink_to(outside, target_is_directory=True)
    update["handler_config"] = {"filename_template": "link/{slug}.md"}
    await call(client, "update-flow-step", update)
    out = await run(client, flow["flow_id"])
    assert out["job"]["status"] == "failed - path_not_allowed", out["job"]
    assert out["job"]["error"]["reason"] == "path_not_allowed"
    assert list(outside.iterdir()) == [] and [p for p in env.written() if not p.is_symlink()] == []
    assert env.node.processed(flow["flow_id"]) == []  # not retryable; the item was released


# --- the README walk-through, as written ------------------------------------------------------------


def shell_output(script: str, env: dict[str, str]) -> str:
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def read(path: Path) -> str:
    return path.read_text()


def write(path: Path, text: str) -> None:
    path.write_text(text)


async def test_readme_first_flow_walkthrough_works_as_written(tmp_path):
    """Follows README "Run your first flow" literally: its shell block, then its tool calls."""
    section = (ROOT / "README.md").read_text().split("## Run your first flow", 1)[1].split("\n## ", 1)[0]
    shell = "\n".join(line.strip() for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines())
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "xdg"), "PATH": os.environ.get("PATH", "")}
    root = shell_output(shell, env).strip().splitlines()[-1]
    assert root == str(tmp_path / "xdg" / "datamachine-mcp" / "files")
    create = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1).replace("ROOT", root))
    # As step 3 says: the default core list plus test-handler (and get-settings, which this test reads).
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "datamachine_mcp.server.cli", "--tools", "test-handler,get-settings"],
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    async with Client(params, mode="legacy") as client:
        assert (await call(client, "get-settings"))["settings"]["files_allowed_roots"] == [root]
        created = await call(client, "create-pipeline", create)
        assert (created["pipeline_id"], created["flow_id"]) == (1, 1)
        preview = await call(client, "test-handler", {"flow_id": 1})
        assert preview["packet_count"] == 2 and sorted(p["title"] for p in preview["packets"]) == ["Groceries", "Hello"]
        first = await call(client, "run-flow", {"flow_id": 1, "wait_seconds": 30})
        assert first["job"]["status"] == "completed"
        assert first["job"]["child_counts"] == {"total": 2, "completed": 2}
        digest = listing(Path(root, "digest"))
        assert [name.split("-", 3)[-1] for name in digest] == ["groceries.md", "hello.md"]
        text = read(Path(root, "digest", digest[1]))
        assert text.startswith('---\ntitle: "Hello"\n') and "job_id: " in text and text.endswith("My first item.\n")
        again = await call(client, "run-flow", {"flow_id": 1, "wait_seconds": 30})
        assert again["job"]["status"] == "completed_no_items"
        feed = Path(root, "feed.xml")
        item = "<item><title>Third</title><guid>third</guid><description>One more.</description></item>\n"
        write(feed, read(feed).replace("</channel>", item + "</channel>"))
        third = await call(client, "run-flow", {"flow_id": 1, "wait_seconds": 30})
        assert third["job"]["status"] == "completed" and len(listing(Path(root, "digest"))) == 3
        assert (await call(client, "schedule-flow", {"flow_id": 1, "interval_or_timestamp": "hourly"}))[
            "scheduled_time"
        ]
        assert (await call(client, "get-jobs", {"flow_id": 1}))["total"] == 5


# --- a worker killed mid-step ----------------------------------------------------------------------


async def test_killed_worker_mid_step_is_recovered_by_a_new_process(tmp_path, world):
    node = Node(tmp_path)
    model = "/killed/v1/chat/completions"
    url = world.script("/killed/feed.xml", FakeResponse(200, rss(("k", "Survivor")), RSS_HEADERS))
    world.script(model, FakeResponse(200, completion("never sent"), delay=120))
    settings = {
        "ai_providers": {"openai": {"base_url": world.url("/killed/v1")}},
        "lease_ttl_seconds": 15,
        "maintenance_interval_seconds": 5,
        "retry_transport_base_seconds": 1,
    }
    async with node.client() as client:
        await call(client, "update-settings", {"settings": settings})
        flow = await pipeline(client, [feed_step(url), AI_STEP, files_step(node.outbox)])
        job_id = (await call(client, "run-flow", {"wait_seconds": 0, "flow_id": flow["flow_id"]}))["job_id"]
        await poll(lambda: bool(world.to(model)), 30)  # the AI step now hangs on the slow model
        ((owner, status),) = node.rows("SELECT lease_owner, status FROM datamachine_jobs WHERE job_id = ?", job_id)
        assert status == "processing"
        pid = int(owner.split(":")[1])  # worker id = host:pid:hex
        assert node.processed(flow["flow_id"]) == [(ident("k"), "claimed")]
        os.kill(pid, signal.SIGKILL)
        await poll(lambda: not _alive(pid), 10)
    world.script(model, FakeResponse(200, completion("Recovered summary.")))
    async with node.client() as client:
        done = await call(client, "wait-for-job", {"job_id": job_id, "timeout_seconds": 90})
        assert done["job"]["status"] == "completed", done["job"]
        data = (await job(client, job_id))["engine_data"]
        assert data["retry"]["history"][0]["class"] == "lease_expired"
        assert (await call(client, "get-jobs", {"flow_id": flow["flow_id"]}))["total"] == 1
    assert node.processed(flow["flow_id"]) == [(ident("k"), "processed")]  # one row: not processed twice
    (written,) = node.written()
    assert "Recovered summary." in written.read_text()
    assert len(world.to(model)) == 2 and len(world.to("/killed/feed.xml")) == 1


async def poll(condition: Any, seconds: float) -> None:
    async def check() -> bool:
        return bool(condition())

    await wait_until(check, seconds)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    return True
