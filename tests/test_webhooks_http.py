"""Inbound webhooks on the HTTP listener: flow triggers (bearer and HMAC) and gate resumes, sent by a real HTTP
client to the real listener on 127.0.0.1, with the engine running the jobs they start."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import httpx
import pytest

from tests.conftest import call, log_rows, table_rows
from tests.http_support import listening
from tests.jobs_support import dirs, echo_step, engine, make_flow, publish_step, wait_job

pytestmark = [pytest.mark.anyio, pytest.mark.backends]
__all__ = ["engine"]  # the fixture, used by name

ITEMS = {"event": "batch", "items": [{"id": "a1", "title": "Alpha", "text": "first"}, {"id": "b2", "title": "Beta"}]}


def payload_step(**config) -> dict:
    cfg = {"items_path": "items", "title_path": "title", "identifier_path": "id", "max_items": 0, **config}
    return {"step_type": "fetch", "handler_slugs": ["webhook_payload"], "handler_configs": {"webhook_payload": cfg}}


async def hook_flow(owner, runtime, **enable) -> tuple[dict, dict]:
    _, outbox = dirs(runtime)
    made = await make_flow(owner, [payload_step(ignore_missing_paths=True), publish_step(outbox)], name="Hooked")
    enabled = await call(owner, "webhook-trigger-enable", {"flow_id": made["flow_id"], **enable})
    return made, enabled


def sign(secret: str, body: bytes, stamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if stamp is None else stamp
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"x-datamachine-timestamp": str(stamp), "x-datamachine-signature": f"sha256={digest}"}


async def test_a_bearer_webhook_starts_a_run_whose_payload_items_are_processed(runtime, owner, engine):
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        made, enabled = await hook_flow(owner, runtime)
        url = f"{base}/webhooks/flows/{made['flow_id']}"
        assert enabled["webhook_url"] == url and not enabled["warnings"]
        status = await call(owner, "webhook-trigger-status", {"flow_id": made["flow_id"]})
        assert status["webhook_url"] == url
        body = json.dumps(ITEMS).encode()
        auth = {"authorization": f"Bearer {enabled['token']}", "content-type": "application/json"}
        response = await http.post(url, content=body, headers={**auth, "x-api-key": "hidden", "x-github-event": "push"})
        assert response.status_code == 202, response.text
        out = response.json()
        assert out["flow_id"] == made["flow_id"] and out["replayed"] is False and out["status"] == "pending"
        done = await wait_job(owner, out["job_id"], 20, include_engine_data=True)
    assert done["final"] and done["job"]["status"] == "completed"
    trigger = done["job"]["engine_data"]["webhook_trigger"]
    assert trigger["payload"] == ITEMS and trigger["auth_mode"] == "bearer" and trigger["remote_ip"] == "127.0.0.1"
    assert trigger["headers"]["x-github-event"] == "push"
    assert "authorization" not in trigger["headers"] and "x-api-key" not in trigger["headers"]
    job = (await call(owner, "get-jobs", {"job_id": out["job_id"]}))["jobs"][0]
    assert job["run_trigger"] == "webhook"
    _, outbox = dirs(runtime)
    assert sorted(p.name.split("-")[0] for p in outbox.iterdir()) == ["alpha", "beta"]
    audit = [r for r in await log_rows(runtime) if (r["context"] or {}).get("ability") == "webhook-trigger"]
    assert len(audit) == 1 and audit[0]["context"]["transport"] == "webhook" and audit[0]["job_id"] == out["job_id"]


async def test_bearer_credentials_are_checked_and_failures_look_alike(runtime, owner):
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        made, enabled = await hook_flow(owner, runtime)
        url = f"{base}/webhooks/flows/{made['flow_id']}"
        before = await table_rows(runtime)
        for headers in ({}, {"authorization": "Bearer " + "0" * 64}, {"authorization": f"Basic {enabled['token']}"}):
            response = await http.post(url, json=ITEMS, headers=headers)
            assert (response.status_code, response.json()) == (401, {"error": "unauthorized"})
        unknown = await http.post(f"{base}/webhooks/flows/999", json=ITEMS)
        assert (unknown.status_code, unknown.json()) == (401, {"error": "unauthorized"})
        rows = [r for r in await log_rows(runtime) if r not in before["datamachine_logs"]]
        assert {r["context"]["reason"] for r in rows if r["level"] == "warning"} == {
            "missing_credentials",
            "bad_token",
        }
        assert before["datamachine_jobs"] == (await table_rows(runtime))["datamachine_jobs"]
        await call(owner, "webhook-trigger-disable", {"flow_id": made["flow_id"]})
        gone = await http.post(url, json=ITEMS, headers={"authorization": f"Bearer {enabled['token']}"})
        assert gone.status_code == 401


async def test_hmac_signatures_replay_window_and_rotation(runtime, owner):
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        made, _ = await hook_flow(owner, runtime, auth_mode="hmac", secret="old-secret-0123456789")
        url = f"{base}/webhooks/flows/{made['flow_id']}"
        body = json.dumps(ITEMS).encode()

        async def post(headers: dict[str, str], content: bytes = body) -> httpx.Response:
            return await http.post(url, content=content, headers={"content-type": "application/json", **headers})

        signed = sign("old-secret-0123456789", body)
        first = await post(signed)
        assert first.status_code == 202, first.text
        assert (await post(signed)).status_code == 401  # the same signed request again: a replay
        stale = sign("old-secret-0123456789", body, int(time.time()) - 301)
        assert (await post(stale)).status_code == 401
        future = sign("old-secret-0123456789", body, int(time.time()) + 301)
        assert (await post(future)).status_code == 401
        assert (await post(sign("wrong-secret-0123456789", body))).status_code == 401
        tampered = sign("old-secret-0123456789", body)
        assert (await post(tampered, body.replace(b"Alpha", b"Omega"))).status_code == 401

        rotated = await call(
            owner,
            "webhook-trigger-rotate-secret",
            {"flow_id": made["flow_id"], "generate": True, "previous_ttl_seconds": 600},
        )
        new = rotated["new_secret"]
        assert (await post(sign(new, body))).status_code == 202
        assert (await post(sign("old-secret-0123456789", body, int(time.time()) + 1))).status_code == 202  # grace
        await call(
            owner,
            "webhook-trigger-rotate-secret",
            {"flow_id": made["flow_id"], "secret": "newest-secret-0123456789", "previous_ttl_seconds": 0},
        )
        assert (await post(sign(new, body, int(time.time()) + 2))).status_code == 401  # revoked at once
        assert (await post(sign("newest-secret-0123456789", body))).status_code == 202
    reasons = {r["context"].get("reason") for r in await log_rows(runtime) if r["level"] == "warning"}
    assert {"replayed_signature", "stale_timestamp", "bad_signature"} <= reasons


async def test_redelivery_limits_and_bad_bodies(runtime, owner):
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        made, enabled = await hook_flow(owner, runtime, rate_limit_max=4, rate_limit_window=60, max_body_bytes=1024)
        url = f"{base}/webhooks/flows/{made['flow_id']}"
        auth = {"authorization": f"Bearer {enabled['token']}"}
        first = await http.post(url, json=ITEMS, headers={**auth, "idempotency-key": "delivery-1"})
        again = await http.post(url, json={"other": 1}, headers={**auth, "x-datamachine-delivery": "delivery-1"})
        assert first.status_code == again.status_code == 202
        assert again.json() == {**first.json(), "replayed": True}
        before = await table_rows(runtime)
        too_big = await http.post(url, content=b"[" + b"1," * 600 + b"1]", headers=auth)
        assert (too_big.status_code, too_big.json()) == (413, {"error": "payload_too_large"})
        assert (await http.post(url, content=b"{not json", headers=auth)).json() == {"error": "invalid_json"}
        assert (await http.post(url, content=b"42", headers=auth)).status_code == 400
        assert await table_rows(runtime) == before  # refused bodies write nothing
        # four authenticated requests so far (a bad body counts, the oversized one was refused before): full
        limited = await http.post(url, json=ITEMS, headers=auth)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.json() == {"error": "rate_limited"}


async def _parked(owner, steps: list[dict]) -> tuple[int, str]:
    made = await make_flow(owner, steps, name="Gated")
    started = await call(owner, "run-flow", {"wait_seconds": 0, "flow_id": made["flow_id"]})
    parked = await wait_job(owner, started["job_id"], 20, stop_on_waiting=True)
    return started["job_id"], parked["job"]["wait"]["resume_url"]


GATE = {"step_type": "webhook_gate", "flow_step_settings": {"description": "Wait for CI"}}


async def test_a_webhook_gate_resumes_its_job_with_the_posted_json(runtime, owner, engine):
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        job_id, resume_url = await _parked(owner, [echo_step(seed=True), GATE, echo_step(after=True)])
        assert resume_url.startswith(f"{base}/webhooks/gates/")
        assert (await http.post(f"{base}/webhooks/gates/{'0' * 64}", json={})).status_code == 404
        assert (await http.post(f"{base}/webhooks/gates/not-a-token", json={})).status_code == 404
        assert (await http.post(resume_url, content=b"{oops")).json() == {"error": "invalid_json"}
        response = await http.post(resume_url, json={"build": "green"})
        assert response.status_code == 202, response.text
        out = response.json()
        assert out["job_id"] == job_id and out["status"] == "pending" and out["next_step_id"]
        again = await http.post(resume_url, json={"build": "red"})
        assert (again.status_code, again.json()) == (409, {"error": "job_not_waiting"})
        done = await wait_job(owner, job_id, 20, include_engine_data=True)
        assert done["job"]["status"] == "completed"
        assert done["job"]["engine_data"]["webhook_gate"]["status"] == "received"
        assert [p["metadata"]["task_type"] for p in done["job"]["packets"]] == ["echo"]  # the step after the gate ran

        # a gate that is the last step completes its job; the payload packet comes first, then the gate's input
        last_id, last_url = await _parked(owner, [echo_step(seed=True), GATE])
        response = await http.post(last_url, json={"build": "green", "sha": "abc123"})
        assert response.json() == {"job_id": last_id, "next_step_id": None, "status": "completed"}
        final = await wait_job(owner, last_id, 5)
    packets = final["job"]["packets"]
    assert [p["type"] for p in packets] == ["webhook_payload", "system_task_result"]
    assert json.loads(packets[0]["data"]["body"]) == {"build": "green", "sha": "abc123"}
    assert packets[0]["metadata"]["source_type"] == "webhook_gate_inbound"


async def test_a_flow_draining_an_empty_queue_is_skipped_like_run_flow(runtime, owner):
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        made, enabled = await hook_flow(owner, runtime)
        fetch = made["flow_step_ids"][0]
        await call(owner, "queue-mode", {"flow_id": made["flow_id"], "flow_step_id": fetch, "mode": "drain"})
        before = await table_rows(runtime)
        url = f"{base}/webhooks/flows/{made['flow_id']}"
        response = await http.post(url, json=ITEMS, headers={"authorization": f"Bearer {enabled['token']}"})
    assert response.status_code == 202
    assert response.json() == {
        "job_id": None,
        "flow_id": made["flow_id"],
        "status": "skipped",
        "replayed": False,
        "reason": "empty_drain_queue",
    }
    assert await table_rows(runtime) == before
