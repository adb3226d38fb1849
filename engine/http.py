"""Outbound HTTP for handlers and AI providers (docs/engine.md, Outbound HTTP and files).

One :class:`Outbound` wraps one shared ``httpx.AsyncClient`` and the limits of a settings
snapshot (``http_timeout_seconds``, ``http_max_response_bytes``,
``outbound_allow_private_networks``). Rules:

* ``http``/``https`` only; with private networks disallowed, every address a host resolves to
  (the event loop's ``getaddrinfo``) must be global (not loopback, private, link-local,
  unspecified, reserved, multicast, shared or metadata) → else ``url_not_allowed``. Plain-http
  requests are then sent to the checked address (``Host`` kept), so a DNS answer cannot change
  between the check and the connection; https relies on certificate verification for that.
* GETs follow at most 5 redirects (301/302/303/307/308), each target re-validated; caller
  headers are dropped when a redirect changes origin. POSTs follow none (3xx → ``http_rejected``).
* Bodies are streamed and reading stops above ``http_max_response_bytes`` → ``response_too_large``.
* Each hop must finish within the timeout (connect + send + the whole body) → ``http_timeout``.
* Failures raise :class:`~engine.errors.StepError` with the ``http_*`` codes, ``http_status`` and
  ``diagnostics`` ``{method, url (without query), status?, body (first 1,000 characters)}``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from datamachine_mcp.engine.errors import StepError, parse_retry_after

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DIAGNOSTIC_CHARS = 1000
SENSITIVE_HEADERS = ("authorization", "cookie", "proxy-authorization")

Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class Response:
    """A completed response: status, headers, the (decoded, size-capped) body and the final URL."""

    status: int
    headers: httpx.Headers
    content: bytes
    url: str

    @property
    def text(self) -> str:
        charset = _charset(self.headers.get("content-type", ""))
        try:
            return self.content.decode(charset or "utf-8", errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON (``invalid_response`` if it is not)."""
        try:
            return json.loads(self.content)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StepError(
                "invalid_response",
                f"{display_url(self.url)} did not return valid JSON ({exc.__class__.__name__}: {exc})",
                http_status=self.status,
                diagnostics={"url": display_url(self.url), "status": self.status, "body": excerpt(self.content)},
            ) from exc


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip("\"'")
    return None


def excerpt(content: bytes | str, limit: int = DIAGNOSTIC_CHARS) -> str:
    text = content if isinstance(content, str) else content[: limit * 4].decode("utf-8", errors="replace")
    return text[:limit]


def display_url(url: str | httpx.URL) -> str:
    """The URL without credentials, query and fragment (they may carry secrets), for messages and diagnostics."""
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError):
        return str(url).split("?", 1)[0]
    return str(parsed.copy_with(query=None, fragment=None, userinfo=b""))


def status_error(
    status: int,
    *,
    method: str,
    url: str,
    headers: Mapping[str, str] | None = None,
    body: bytes | str = b"",
    message: str | None = None,
    diagnostics: Mapping[str, Any] | None = None,
    provider: str | None = None,
) -> StepError:
    """The ``http_*`` error for an unsuccessful HTTP status (3xx on POST, 4xx, 5xx)."""
    shown = display_url(url)
    if status == 429:
        code = "http_rate_limited"
    elif status in (408, 500, 502, 503, 504, 529) or status >= 500:
        code = "http_upstream_error"
    elif status in (401, 403):
        code = "http_auth_failed"
    elif status in (404, 410):
        code = "http_not_found"
    else:
        code = "http_rejected"
    retry_after = parse_retry_after(headers.get("retry-after")) if headers is not None else None
    diag: dict[str, Any] = {"method": method, "url": shown, "status": status, "body": excerpt(body)}
    if diagnostics:
        diag.update(diagnostics)
    text = f"{method} {shown} returned HTTP {status}"
    if message:
        text += f": {message}"
    elif 300 <= status < 400:
        text += " (POST requests do not follow redirects)" if method == "POST" else " (no usable redirect)"
    return StepError(code, text, http_status=status, retry_after=retry_after, diagnostics=diag, provider=provider)


_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_headers(headers: Mapping[str, str]) -> None:
    """Header names must be HTTP tokens and values printable ASCII (a config problem otherwise)."""
    for name, value in headers.items():
        bad_value = not isinstance(value, str) or any(c in value for c in "\r\n\x00") or not value.isascii()
        if not isinstance(name, str) or not _TOKEN.match(name) or bad_value:
            raise StepError(
                "handler_config_invalid",
                f"Invalid HTTP header {str(name)[:100]!r}: names must be tokens and values single-line ASCII",
            )


def address_allowed(address: str) -> bool:
    """Whether an IP address is a public one (``outbound_allow_private_networks: false`` refuses the others)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return address_allowed(str(mapped))
    return bool(ip.is_global) and not ip.is_multicast


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Outbound:
    """Handler HTTP with the limits of one settings snapshot, over one shared ``httpx.AsyncClient``.

    Build one per process (``Outbound(snap, version)``, closed with :meth:`aclose`) and derive
    per-step views with :meth:`with_settings` (same client and connection pool, new limits), or
    one per step (``async with Outbound(snap, version) as outbound``). ``timeout`` overrides
    ``http_timeout_seconds`` as the default per-request limit (AI: ``ai_request_timeout_seconds``).
    """

    def __init__(
        self,
        snap: Mapping[str, Any],
        version: str,
        *,
        client: httpx.AsyncClient | None = None,
        resolver: Resolver | None = None,
        timeout: float | None = None,
    ) -> None:
        self.settings = snap
        self.version = version
        self.timeout = float(int(snap["http_timeout_seconds"]) if timeout is None else timeout)
        self.max_bytes = int(snap["http_max_response_bytes"])
        self.allow_private = bool(snap["outbound_allow_private_networks"])
        self.user_agent = f"datamachine-mcp/{version}"
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": self.user_agent})
        self._resolve = resolver or _system_resolve

    def with_settings(self, snap: Mapping[str, Any]) -> Outbound:
        """The same client with the limits of another (newer) snapshot; closing it closes nothing."""
        return Outbound(snap, self.version, client=self._client, resolver=self._resolve)

    @property
    def client(self) -> httpx.AsyncClient:
        return self._client

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Outbound:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- public calls ---------------------------------------------------------------------------

    async def get(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request limit, not a cancel scope)
        check: bool = True,
    ) -> Response:
        """GET with up to 5 validated redirects; non-2xx → StepError unless ``check`` is false."""
        current = self.validate_url(url)
        sent = dict(headers or {})
        for hop in range(MAX_REDIRECTS + 1):
            response = await self._send("GET", current, sent, None, timeout, self.allow_private)
            if response.status in REDIRECT_STATUSES and "location" in response.headers:
                if hop == MAX_REDIRECTS:
                    raise StepError(
                        "http_rejected",
                        f"GET {display_url(url)} redirected more than {MAX_REDIRECTS} times",
                        http_status=response.status,
                        diagnostics={"method": "GET", "url": display_url(url), "status": response.status},
                    )
                try:
                    target = current.join(response.headers["location"])
                except httpx.InvalidURL as exc:
                    raise StepError(
                        "invalid_response",
                        f"GET {display_url(current)} redirected to an invalid URL",
                        http_status=response.status,
                    ) from exc
                target = self.validate_url(str(target))
                if (target.scheme, target.host, target.port) != (current.scheme, current.host, current.port):
                    sent = {}
                current = target
                continue
            if check and not 200 <= response.status < 300:
                raise status_error(
                    response.status, method="GET", url=str(current), headers=response.headers, body=response.content
                )
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def post_json(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request limit, not a cancel scope)
        check: bool = True,
        allow_private: bool | None = None,
    ) -> Response:
        """POST a JSON body; no redirects. Non-2xx (3xx included) → StepError unless ``check`` is false.

        ``allow_private=True`` lifts the private-network rule for this call (AI providers, whose
        base URLs only global admins set, may be local servers).
        """
        allowed = self.allow_private if allow_private is None else allow_private
        target = self.validate_url(url)
        sent = {"Content-Type": "application/json", **(headers or {})}
        response = await self._send("POST", target, sent, body, timeout, allowed)
        if check and not 200 <= response.status < 300:
            raise status_error(
                response.status, method="POST", url=str(target), headers=response.headers, body=response.content
            )
        return response

    # -- internals ------------------------------------------------------------------------------

    def validate_url(self, url: str | httpx.URL) -> httpx.URL:
        """Parse and check the scheme (``url_not_allowed`` for anything but http/https with a host)."""
        try:
            parsed = httpx.URL(str(url))
        except (httpx.InvalidURL, TypeError) as exc:
            raise StepError("url_not_allowed", f"Invalid URL {str(url)[:200]!r}: {exc}") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise StepError(
                "url_not_allowed", f"Only http and https URLs are allowed (got {display_url(str(url))[:200]!r})"
            )
        return parsed

    async def _addresses(self, url: httpx.URL) -> list[str]:
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            try:
                addresses = await self._resolve(host, port)
            except (OSError, UnicodeError) as exc:
                raise StepError(
                    "http_connection_error", f"Cannot resolve {host}: {exc}", diagnostics={"url": display_url(url)}
                ) from exc
        if not addresses:
            raise StepError("http_connection_error", f"Cannot resolve {host}: no addresses")
        refused = [a for a in addresses if not address_allowed(a)]
        if refused:
            raise StepError(
                "url_not_allowed",
                f"{host} resolves to a non-public address ({refused[0]}) and outbound_allow_private_networks is false",
                diagnostics={"url": display_url(url), "addresses": addresses},
            )
        return addresses

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float | None,  # noqa: ASYNC109 (a per-request limit, not a cancel scope)
        allow_private: bool,
    ) -> Response:
        seconds = self.timeout if timeout is None else float(timeout)
        shown = display_url(url)
        request_url = url
        extra: dict[str, str] = {}
        if not allow_private:
            addresses = await self._addresses(url)
            if url.scheme == "http" and url.host not in addresses:
                # Pin plain-http requests to the checked address (no DNS rebinding in between).
                pinned = addresses[0]
                host_header = url.netloc.decode("ascii")
                if "@" in host_header:
                    host_header = host_header.rsplit("@", 1)[1]
                request_url = url.copy_with(host=pinned)
                extra["Host"] = host_header
        send_headers = {"User-Agent": self.user_agent, **headers, **extra}
        check_headers(send_headers)
        try:
            with anyio.fail_after(seconds):
                request = self._client.build_request(
                    method, request_url, headers=send_headers, content=body, timeout=httpx.Timeout(seconds)
                )
                response = await self._client.send(request, stream=True)
                try:
                    content = await self._read_capped(response, method, shown)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise StepError(
                "http_timeout", f"{method} {shown} timed out after {seconds:g}s", diagnostics={"url": shown}
            ) from exc
        except httpx.TimeoutException as exc:
            raise StepError(
                "http_timeout",
                f"{method} {shown} timed out after {seconds:g}s ({exc.__class__.__name__})",
                diagnostics={"url": shown},
            ) from exc
        except httpx.TransportError as exc:
            raise StepError(
                "http_connection_error",
                f"{method} {shown} failed: {exc.__class__.__name__}: {exc or 'connection error'}",
                diagnostics={"url": shown},
            ) from exc
        return Response(status=response.status_code, headers=response.headers, content=content, url=str(url))

    async def _read_capped(self, response: httpx.Response, method: str, shown: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large(method, shown, response.status_code, declared=int(declared))
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(method, shown, response.status_code, declared=None)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, method: str, shown: str, status: int, *, declared: int | None) -> StepError:
        detail = f"{declared} bytes declared" if declared is not None else "body still growing"
        return StepError(
            "response_too_large",
            f"{method} {shown} returned more than http_max_response_bytes ({self.max_bytes} bytes; {detail})",
            http_status=status,
            diagnostics={"url": shown, "limit": self.max_bytes},
        )
