"""engine/http.py and engine/errors.py against local servers: limits, SSRF, redirects, error mapping."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

import datamachine_mcp.engine.http as http_mod
from datamachine_mcp.engine.errors import StepError, classify, parse_retry_after
from datamachine_mcp.engine.http import Outbound, address_allowed
from tests.fake_servers import FakeResponse, closed_port, make_snapshot, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def server():
    with serve() as s:
        yield s


async def raises(code: str, coro) -> StepError:
    with pytest.raises(StepError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


# -- basics ------------------------------------------------------------------------------------


async def test_get_returns_body_headers_and_sends_user_agent(server, tmp_path):
    url = server.script("/feed", FakeResponse(200, "héllo", {"X-Test": "1"}))
    async with Outbound(make_snapshot(tmp_path), "1.2.3") as out:
        response = await out.get(url + "?page=2", headers={"Accept": "text/plain"})
    assert response.status == 200
    assert response.content == "héllo".encode()
    assert response.text == "héllo"
    assert response.headers["x-test"] == "1"
    assert response.url == url + "?page=2"
    (request,) = server.requests
    assert request.headers["user-agent"] == "datamachine-mcp/1.2.3"
    assert request.headers["accept"] == "text/plain"
    assert request.path == "/feed?page=2"


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "gopher://h/", "not a url", "http://"])
async def test_only_http_and_https_urls(tmp_path, url):
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        await raises("url_not_allowed", out.get(url))
        await raises("url_not_allowed", out.post_json(url, b"{}"))


async def test_post_json_sends_body_and_content_type(server, tmp_path):
    url = server.script("/hook", FakeResponse(202, {"ok": True}))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        response = await out.post_json(url, b'{"a":1}', headers={"X-Extra": "y"})
    assert response.status == 202 and response.json() == {"ok": True}
    (request,) = server.requests
    assert request.method == "POST" and request.body == b'{"a":1}'
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-extra"] == "y"


@pytest.mark.parametrize("headers", [{"X-Key": "a\nInjected: 1"}, {"Bad Name": "v"}, {"X-Key": "café"}])
async def test_invalid_headers_are_a_config_error(server, tmp_path, headers):
    url = server.script("/x", FakeResponse(200, "ok"))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        err = await raises("handler_config_invalid", out.get(url, headers=headers))
    assert classify(err) == (False, None)
    assert "Injected" not in err.message and "café" not in err.message  # values (secrets) are not echoed
    assert server.requests == []


# -- private networks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.100.100.200", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
        ("8.8.8.8", True),
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_address_allowed(address, allowed):
    assert address_allowed(address) is allowed


async def test_private_addresses_refused_when_not_allowed(server, tmp_path):
    url = server.script("/x", FakeResponse(200, "secret"))
    snap = make_snapshot(tmp_path, outbound_allow_private_networks=False)
    async with Outbound(snap, "1") as out:
        err = await raises("url_not_allowed", out.get(url))
        assert "127.0.0.1" in err.message
        await raises("url_not_allowed", out.get(f"http://localhost:{server.port}/x"))
        await raises("url_not_allowed", out.post_json(url, b"{}"))
        await raises("url_not_allowed", out.get("http://169.254.169.254/latest/meta-data/"))
        await raises("url_not_allowed", out.get(f"http://[::1]:{server.port}/x"))
        assert classify(err) == (False, None)
    assert server.requests == []  # nothing was sent


async def test_private_addresses_allowed_by_default(server, tmp_path):
    url = server.script("/x", FakeResponse(200, "fine"))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        assert (await out.get(url)).text == "fine"
        assert (await out.get(f"http://localhost:{server.port}/x")).text == "fine"


async def test_a_host_with_any_private_address_is_refused(tmp_path):
    async def resolver(host, port):
        return ["8.8.8.8", "10.0.0.5"]

    snap = make_snapshot(tmp_path, outbound_allow_private_networks=False)
    async with Outbound(snap, "1", resolver=resolver) as out:
        err = await raises("url_not_allowed", out.get("http://mixed.example/"))
    assert "10.0.0.5" in err.message


async def test_plain_http_is_pinned_to_the_checked_address(server, tmp_path, monkeypatch):
    """The request goes to the address that was checked (no second DNS lookup), Host kept."""
    url_path = server.script("/pinned", FakeResponse(200, "pinned"))
    assert url_path
    lookups = []

    async def resolver(host, port):
        lookups.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(http_mod, "address_allowed", lambda a: a == "127.0.0.1")
    snap = make_snapshot(tmp_path, outbound_allow_private_networks=False)
    async with Outbound(snap, "1", resolver=resolver) as out:
        response = await out.get(f"http://pinned.invalid:{server.port}/pinned")
    assert response.text == "pinned"
    assert response.url == f"http://pinned.invalid:{server.port}/pinned"
    assert lookups == ["pinned.invalid"]
    assert server.requests[0].headers["host"] == f"pinned.invalid:{server.port}"


async def test_dns_failure_is_a_connection_error(tmp_path):
    async def resolver(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    snap = make_snapshot(tmp_path, outbound_allow_private_networks=False)
    async with Outbound(snap, "1", resolver=resolver) as out:
        err = await raises("http_connection_error", out.get("http://nowhere.invalid/"))
    assert classify(err) == (True, "transport")


# -- redirects ---------------------------------------------------------------------------------


async def test_get_follows_five_redirects_relative_and_absolute(server, tmp_path):
    for n in range(5):
        target = f"/r{n + 1}" if n % 2 else server.url(f"/r{n + 1}")
        server.script(f"/r{n}", FakeResponse(302 if n % 2 else 301, headers={"Location": target}))
    server.script("/r5", FakeResponse(200, "landed"))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        response = await out.get(server.url("/r0"))
    assert response.text == "landed"
    assert response.url == server.url("/r5")
    assert [r.route for r in server.requests] == ["/r0", "/r1", "/r2", "/r3", "/r4", "/r5"]


async def test_a_sixth_redirect_is_refused(server, tmp_path):
    for n in range(6):
        server.script(f"/r{n}", FakeResponse(307, headers={"Location": f"/r{n + 1}"}))
    server.script("/r6", FakeResponse(200, "never"))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        err = await raises("http_rejected", out.get(server.url("/r0")))
    assert "more than 5" in err.message
    assert err.http_status == 307
    assert classify(err) == (False, None)
    assert "/r6" not in [r.route for r in server.requests]


async def test_each_redirect_target_is_revalidated(server, tmp_path, monkeypatch):
    server.script("/go-ftp", FakeResponse(302, headers={"Location": "ftp://example.com/file"}))
    server.script("/go-private", FakeResponse(302, headers={"Location": "http://10.0.0.1/admin"}))
    monkeypatch.setattr(http_mod, "address_allowed", lambda a: a == "127.0.0.1")
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        await raises("url_not_allowed", out.get(server.url("/go-ftp")))
    async with Outbound(make_snapshot(tmp_path, outbound_allow_private_networks=False), "1") as out:
        await raises("url_not_allowed", out.get(server.url("/go-private")))


async def test_caller_headers_are_dropped_on_cross_origin_redirect(server, tmp_path):
    server.script("/start", FakeResponse(302, headers={"Location": f"http://localhost:{server.port}/next"}))
    server.script("/next", FakeResponse(200, "ok"))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        await out.get(server.url("/start"), headers={"Authorization": "Bearer k", "X-Api-Key": "k"})
    first, second = server.requests
    assert first.headers["authorization"] == "Bearer k" and first.headers["x-api-key"] == "k"
    assert "authorization" not in second.headers and "x-api-key" not in second.headers
    assert second.headers["user-agent"].startswith("datamachine-mcp/")


async def test_post_follows_no_redirect(server, tmp_path):
    server.script("/post", FakeResponse(302, headers={"Location": "/elsewhere"}))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        err = await raises("http_rejected", out.post_json(server.url("/post"), b"{}"))
    assert err.http_status == 302
    assert [r.route for r in server.requests] == ["/post"]


# -- size cap ----------------------------------------------------------------------------------


async def test_declared_body_above_the_cap_is_refused(server, tmp_path):
    server.script("/big", FakeResponse(200, b"x" * 5000))
    server.script("/small", FakeResponse(200, b"x" * 2048))
    async with Outbound(make_snapshot(tmp_path, http_max_response_bytes=2048), "1") as out:
        err = await raises("response_too_large", out.get(server.url("/big")))
        assert (await out.get(server.url("/small"))).content == b"x" * 2048
    assert "2048" in err.message
    assert classify(err) == (False, None)


async def test_streamed_body_without_length_stops_at_the_cap(server, tmp_path):
    server.script("/stream", FakeResponse(200, b"y" * 200_000, omit_length=True))
    async with Outbound(make_snapshot(tmp_path, http_max_response_bytes=4096), "1") as out:
        await raises("response_too_large", out.get(server.url("/stream")))
        await raises("response_too_large", out.post_json(server.url("/stream"), b"{}"))


# -- status mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "retryable", "klass"),
    [
        (400, "http_rejected", False, None),
        (401, "http_auth_failed", False, None),
        (403, "http_auth_failed", False, None),
        (404, "http_not_found", False, None),
        (410, "http_not_found", False, None),
        (422, "http_rejected", False, None),
        (408, "http_upstream_error", True, "upstream"),
        (500, "http_upstream_error", True, "upstream"),
        (502, "http_upstream_error", True, "upstream"),
        (503, "http_upstream_error", True, "upstream"),
        (504, "http_upstream_error", True, "upstream"),
        (529, "http_upstream_error", True, "upstream"),
        (501, "http_upstream_error", False, None),
    ],
)
async def test_status_codes_map_to_handler_codes(server, tmp_path, status, code, retryable, klass):
    body = "E" * 1500
    server.script("/s", FakeResponse(status, body))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        err = await raises(code, out.get(f"http://user:secret@127.0.0.1:{server.port}/s?token=secret"))
        post_err = await raises(code, out.post_json(server.url("/s"), b"{}"))
    assert err.http_status == status == post_err.http_status
    assert err.diagnostics["body"] == "E" * 1000
    assert err.diagnostics["status"] == status
    assert "secret" not in err.message and "secret" not in str(err.diagnostics)
    assert classify(err) == (retryable, klass)
    assert err.to_dict()["retryable"] is retryable


async def test_check_false_returns_error_responses(server, tmp_path):
    server.script("/s", FakeResponse(404, "gone"))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        assert (await out.get(server.url("/s"), check=False)).status == 404
        assert (await out.post_json(server.url("/s"), b"{}", check=False)).status == 404


async def test_429_with_retry_after_seconds_and_date(server, tmp_path):
    later = datetime.now(UTC) + timedelta(seconds=90)
    server.script("/a", FakeResponse(429, "slow down", {"Retry-After": "120"}))
    server.script("/b", FakeResponse(429, "slow down", {"Retry-After": format_datetime(later, usegmt=True)}))
    server.script("/c", FakeResponse(503, "busy", {"Retry-After": "7"}))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        a = await raises("http_rate_limited", out.get(server.url("/a")))
        b = await raises("http_rate_limited", out.post_json(server.url("/b"), b"{}"))
        c = await raises("http_upstream_error", out.get(server.url("/c")))
    assert a.retry_after == 120.0 and a.http_status == 429
    assert 80 <= b.retry_after <= 90
    assert c.retry_after == 7.0
    assert classify(a) == (True, "rate_limit")
    assert a.to_dict() == {
        "code": "http_rate_limited",
        "message": a.message,
        "retryable": True,
        "class": "rate_limit",
        "retry_after": 120.0,
        "http_status": 429,
        "diagnostics": a.diagnostics,
    }


# -- transport failures ------------------------------------------------------------------------


async def test_slow_server_times_out(server, tmp_path):
    server.script("/slow", FakeResponse(200, "late", delay=2.0))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        started = time.monotonic()
        err = await raises("http_timeout", out.get(server.url("/slow"), timeout=0.3))
        assert time.monotonic() - started < 1.5
        await raises("http_timeout", out.post_json(server.url("/slow"), b"{}", timeout=0.3))
    assert classify(err) == (True, "transport")


async def test_timeout_comes_from_settings(server, tmp_path):
    server.script("/slow", FakeResponse(200, "late", delay=2.5))
    async with Outbound(make_snapshot(tmp_path, http_timeout_seconds=1), "1") as out:
        assert out.timeout == 1.0
        started = time.monotonic()
        await raises("http_timeout", out.get(server.url("/slow")))
        assert 0.9 <= time.monotonic() - started < 2.0
    async with Outbound(make_snapshot(tmp_path), "1", timeout=2.5) as out:
        assert out.timeout == 2.5  # an explicit default (the AI step passes ai_request_timeout_seconds)


async def test_refused_connection_is_a_connection_error(tmp_path):
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        err = await raises("http_connection_error", out.get(f"http://127.0.0.1:{closed_port()}/"))
    assert classify(err) == (True, "transport")


async def test_with_settings_shares_the_client(server, tmp_path):
    server.script("/big", FakeResponse(200, b"z" * 3000))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        strict = out.with_settings(make_snapshot(tmp_path, http_max_response_bytes=1024))
        assert strict.client is out.client
        await raises("response_too_large", strict.get(server.url("/big")))
        await strict.aclose()  # does not close the shared client
        assert len((await out.get(server.url("/big"))).content) == 3000


async def test_json_of_a_non_json_body_is_invalid_response(server, tmp_path):
    server.script("/html", FakeResponse(200, "<html>"))
    async with Outbound(make_snapshot(tmp_path), "1") as out:
        response = await out.get(server.url("/html"))
    with pytest.raises(StepError) as info:
        response.json()
    assert info.value.code == "invalid_response"


# -- classification and Retry-After ------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (StepError("http_timeout", "x"), (True, "transport")),
        (StepError("http_connection_error", "x"), (True, "transport")),
        (StepError("http_rate_limited", "x"), (True, "rate_limit")),
        (StepError("anything", "x", http_status=429), (True, "rate_limit")),
        (StepError("anything", "x", http_status=408), (True, "upstream")),
        (StepError("step_timeout", "x"), (True, "upstream")),
        (StepError("sampling_unavailable", "x"), (True, "upstream")),
        (StepError("http_timeout", "x", retryable=False), (False, None)),
        (StepError("path_not_allowed", "x", retryable=True), (True, None)),
        (StepError("empty_ai_response", "x", retryable=True, error_class="upstream"), (True, "upstream")),
        (StepError("http_rejected", "rate limit exceeded", http_status=400), (False, None)),
        (StepError("http_rejected", "Rate limit exceeded", http_status=400, provider="openai"), (True, "upstream")),
        (StepError("http_auth_failed", "bad key", http_status=401, provider="openai"), (False, None)),
        (StepError("path_not_allowed", "timeout"), (False, None)),
        (StepError("http_rejected", "overloaded", http_status=400, diagnostics={"provider": "x"}), (True, "upstream")),
        (StepError("step_exception", "RuntimeError: connection timed out"), (True, "upstream")),
        (StepError("step_exception", "KeyError: 'x'"), (False, None)),
        (StepError("empty_data_packet_returned", "x"), (False, None)),
        (StepError("invalid_execution_plan", "x"), (False, None)),
        (RuntimeError("The server is temporarily overloaded"), (True, "upstream")),
        (RuntimeError("connection timed out"), (True, "upstream")),
        (RuntimeError("HTTP 503 from upstream"), (True, "upstream")),
        (ValueError("bad value"), (False, None)),
        (httpx.ReadTimeout("r"), (True, "transport")),
        (httpx.ConnectError("c"), (True, "transport")),
        ({"code": "http_upstream_error", "message": "m", "http_status": 502}, (True, "upstream")),
        ({"code": "step_exception", "message": "Try again later"}, (True, "upstream")),
        ({"code": "handler_config_invalid", "message": "Try again later"}, (False, None)),
        (
            {"code": "http_rejected", "message": "Please try again", "diagnostics": {"provider": "openai"}},
            (True, "upstream"),
        ),
        ({"code": "http_timeout", "message": "m", "retryable": False}, (False, None)),
    ],
)
def test_classify(error, expected):
    assert classify(error) == expected


def test_parse_retry_after():
    now = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("30", now) == 30.0
    assert parse_retry_after(" 2.5 ", now) == 2.5
    assert parse_retry_after("Fri, 01 May 2026 12:01:00 GMT", now) == 60.0
    assert parse_retry_after("Fri, 01 May 2026 11:00:00 GMT", now) == 0.0  # past
    assert parse_retry_after("999999", now) == 86_400.0
    assert parse_retry_after("Sat, 01 May 2027 12:00:00 GMT", now) == 86_400.0
    assert parse_retry_after("-5", now) == 0.0
    assert parse_retry_after(12, now) == 12.0
    for bad in ("", "soon", None, "nan"):
        assert parse_retry_after(bad, now) is None
