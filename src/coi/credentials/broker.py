"""The broker itself: an ASGI app that forwards a sandbox's API requests to its provider with
the real credential put in place of the session's placeholder, and refuses everything else.

Requests arrive as `/<provider>/<path>` (the tool's base URL is `http://127.0.0.1:<port>/
<provider>`). A request is forwarded only if it carries that provider's placeholder (in any
header form the provider's tools use), its path is one of the provider's API prefixes, the
session is still on and within its limits; it goes to the provider's upstream (never a host
the request names), with the placeholder removed and the real credential added. Responses,
server-sent event streams included, are relayed as they arrive. Every request, forwarded or
refused, is one audit event: provider, method, path, status, bytes; never a body or a key.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from coi.audit.log import AuditLog, Event
from coi.backend._httpx import httpx
from coi.credentials.providers import Provider
from coi.credentials.sources import (
    Credential,
    apply_refresh,
    newer_on_disk,
    refresh_body,
    write_login,
)

# Request bodies are read whole before anything is sent upstream (the byte limit is checked
# first, and a refused login can be retried); no provider takes more than this in one request.
MAX_BODY = 64 * 1024 * 1024
# Never forwarded, either way: hop-by-hop headers, and what httpx sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# Never forwarded upstream: anything that could carry a credential of the sandbox's choosing.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie"}
)
# An encoded slash, backslash or dot in the raw path could mean one path to the broker's
# check and another to the upstream.
_ENCODED_SEPARATOR = re.compile(rb"%(2f|5c|2e)", re.IGNORECASE)
CATEGORY = "credentials"


class Refused(Exception):
    """A request the broker does not forward; `reason` is a short word for the audit log."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


@dataclass
class Limits:
    """Per-session limits; 0 means none."""

    max_requests: int = 0
    max_request_bytes: int = 0
    max_duration: float = 0.0  # seconds after the broker started


@dataclass
class Route:
    """One provider of this session: its placeholder, upstream and real credential."""

    provider: Provider
    token: str = field(repr=False)
    credential: Credential
    upstream: str  # scheme://host[:port], no trailing slash
    token_url: str = ""
    _lock: asyncio.Lock | None = field(default=None, repr=False)

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


def presented_tokens(
    headers: Iterable[tuple[str, str]], query: Iterable[tuple[str, str]], provider: Provider
) -> list[str]:
    """Every value in the request where the provider's tools put a key."""
    found = []
    for name, value in headers:
        name = name.lower()
        if name not in provider.token_headers:
            continue
        if name == "authorization":
            scheme, _, rest = value.strip().partition(" ")
            value = rest if scheme.lower() == "bearer" else value
        found.append(value.strip())
    if provider.token_query:
        found += [v for k, v in query if k == provider.token_query]
    return found


def token_ok(presented: list[str], token: str) -> bool:
    """At least one placeholder, and nothing but the placeholder, was presented."""
    return bool(presented) and all(
        hmac.compare_digest(p.encode(), token.encode()) for p in presented
    )


def path_problem(rest: str, raw_rest: bytes, provider: Provider) -> str | None:
    """Why `rest` (decoded, below the provider prefix) may not be forwarded, or None."""
    if _ENCODED_SEPARATOR.search(raw_rest) or "\\" in rest or "//" in rest:
        return "the path has an encoded separator or an empty segment"
    if any(seg in (".", "..") for seg in rest.split("/")):
        return "the path has a dot segment"
    if not any(rest.startswith(prefix) for prefix in provider.paths):
        allowed = ", ".join(provider.paths)
        return f"{rest} is not an API path of {provider.name} (allowed: {allowed})"
    return None


def _merge_list(existing: str, add: str) -> str:
    items = [x.strip() for x in existing.split(",") if x.strip()]
    items += [x.strip() for x in add.split(",") if x.strip() and x.strip() not in items]
    return ",".join(items)


def credential_headers(provider: Provider, cred: Credential) -> list[tuple[str, str]]:
    """How the real credential is attached upstream."""
    if cred.kind == "oauth" or provider.key_header == "authorization":
        return [("authorization", f"Bearer {cred.secret}")]
    return [(provider.key_header, cred.secret)]


def upstream_headers(
    headers: Iterable[tuple[str, str]], provider: Provider, cred: Credential
) -> list[tuple[str, str]]:
    """The request's headers as sent upstream: hop-by-hop, length and every header that
    could carry a key (the placeholder included) removed, the real credential added."""
    drop = HOP_BY_HOP | CREDENTIAL_HEADERS | set(provider.token_headers) | {"content-length"}
    out = [(k.lower(), v) for k, v in headers if k.lower() not in drop]
    if cred.kind == "oauth":
        for name, value in provider.oauth_headers.items():
            have = [i for i, (k, _) in enumerate(out) if k == name]
            if have:
                i = have[0]
                out[i] = (name, _merge_list(out[i][1], value))
            else:
                out.append((name, value))
    return out + credential_headers(provider, cred)


def upstream_query(query_string: bytes, provider: Provider) -> str:
    """The query string without the placeholder's parameter."""
    if not query_string:
        return ""
    if not provider.token_query:
        return query_string.decode("latin-1")
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, v) for k, v in pairs if k != provider.token_query])


def response_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The upstream response's headers as relayed (the body is relayed as received, so its
    content-encoding and length stay true)."""
    out: dict[str, str] = {}
    for k, v in headers:
        k = k.lower()
        if k in HOP_BY_HOP or k == "set-cookie":
            continue
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def error_body(status: int, message: str) -> dict[str, Any]:
    """An error both the Anthropic and the OpenAI clients show: a `message` under `error`."""
    kind = {403: "permission_error", 413: "request_too_large", 426: "invalid_request_error"}.get(
        status, "api_error"
    )
    return {
        "type": "error",
        "error": {
            "type": kind,
            "code": "coi_broker",
            "message": f"coi credential broker: {message}",
        },
    }


class Broker:
    """The per-session policy and state, and the ASGI app around it."""

    def __init__(
        self,
        container: str,
        routes: dict[str, Route],
        *,
        limits: Limits | None = None,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.container = container
        self.routes = routes
        self.limits = limits or Limits()
        self.audit = audit if audit is not None else AuditLog(container)
        self.clock = clock
        self.started = clock()
        self.requests = 0  # forwarded (or being forwarded)
        self.request_bytes = 0
        self.closed = False
        self.client = client  # set by the server in its event loop when not given

    # -- policy -----------------------------------------------------------------------------

    def admit(
        self, path: str, raw_path: bytes, headers: list[tuple[str, str]], query: bytes
    ) -> tuple[Route, str, bytes]:
        """The route, path and raw path (below the provider prefix) of an admissible request;
        counts it.

        :raises Refused: not admissible.
        """
        if self.closed:
            raise Refused(403, "this session has ended", "session-ended")
        if not path.startswith("/"):
            raise Refused(403, "only origin-form request targets are forwarded", "target")
        name, _, rest = path[1:].partition("/")
        rest = "/" + rest
        route = self.routes.get(name)
        prefix = f"/{name}/".encode()
        if route is not None and not raw_path.startswith(prefix):
            # The provider's name must be spelled plainly: what is forwarded is the raw path
            # after it, and a percent-encoded name would shift where that starts.
            raise Refused(403, "the provider prefix must not be percent-encoded", "path")
        raw_rest = raw_path[len(prefix) - 1 :]
        if route is None:
            known = ", ".join(sorted(self.routes)) or "none"
            raise Refused(
                403, f"no provider {name!r} on this broker (this session has: {known})", "provider"
            )
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        if not token_ok(presented_tokens(headers, pairs, route.provider), route.token):
            raise Refused(403, f"missing or wrong session token for {name}", "token")
        problem = path_problem(rest, raw_rest, route.provider)
        if problem:
            raise Refused(403, problem, "path")
        lim = self.limits
        if lim.max_duration and self.clock() - self.started >= lim.max_duration:
            raise Refused(
                403, f"the session's time limit ({lim.max_duration:g} s) is over", "max_duration"
            )
        if lim.max_requests and self.requests >= lim.max_requests:
            raise Refused(
                403, f"the session's request limit ({lim.max_requests}) is reached", "max_requests"
            )
        self.requests += 1
        return route, rest, raw_rest

    def charge(self, nbytes: int) -> None:
        """Count a request body against the byte limit.

        :raises Refused: over the limit (the request is then not counted at all).
        """
        lim = self.limits
        if lim.max_request_bytes and self.request_bytes + nbytes > lim.max_request_bytes:
            self.requests -= 1
            raise Refused(
                403,
                f"the session's request-byte limit ({lim.max_request_bytes}) would be exceeded",
                "max_request_bytes",
            )
        self.request_bytes += nbytes

    def record(
        self,
        provider: str,
        method: str,
        path: str,
        status: int,
        *,
        sent: int,
        received: int,
        started: float,
        refused: str = "",
    ) -> None:
        """One audit event: never a body, a query string or a key."""
        evidence: dict[str, Any] = {
            "provider": provider,
            "method": method,
            "path": path,
            "status": status,
            "request_bytes": sent,
            "response_bytes": received,
            "ms": round((time.monotonic() - started) * 1000, 1),
        }
        if refused:
            evidence["reason"] = refused
        what = "refused" if refused else "forwarded"
        self.audit.write(
            Event(
                level="warning" if refused else "info",
                category=CATEGORY,
                title=f"Credential broker {what} a request",
                description=f"{method} {provider} {path} -> {status}",
                evidence=evidence,
                action=what,
            )
        )

    # -- the app ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        response = await self.handle(Request(scope, receive))
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        started = time.monotonic()
        scope = request.scope
        path: str = scope["path"]
        method = request.method
        name = path[1:].partition("/")[0] if path.startswith("/") else ""
        shown = "/" + path[1:].partition("/")[2] if name else path
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        if any(k.lower() == "upgrade" and "websocket" in v.lower() for k, v in headers):
            # A WebSocket (codex tries the Responses API over one first) is not relayed: 426
            # at once, and the client takes HTTPS (codex does; anything else it retries five
            # times, seconds lost at every start). Not counted against the limits. Another
            # upgrade (h2c) is ignored by the server and the request served as HTTP/1.1.
            no = Refused(426, "WebSockets are not relayed; use HTTPS", "upgrade")
            return self._refuse(no, name, method, shown, started)
        try:
            route, rest, raw_rest = self.admit(
                path, scope.get("raw_path") or path.encode(), headers, scope["query_string"]
            )
        except Refused as no:
            return self._refuse(no, name, method, shown, started)
        try:
            body = await self._body(request)
        except BaseException as err:
            self.requests -= 1  # admitted, but not forwarded after all
            if isinstance(err, Refused):
                return self._refuse(err, name, method, rest, started)
            raise
        try:
            self.charge(len(body))
        except Refused as no:
            return self._refuse(no, name, method, rest, started)
        try:
            upstream = await self._forward(
                route, method, raw_rest, scope["query_string"], headers, body
            )
        except Exception as err:
            message = f"{route.provider.name} could not be reached: {type(err).__name__}"
            if isinstance(err, Refused):
                message = err.message
            self.record(
                name,
                method,
                rest,
                502,
                sent=len(body),
                received=0,
                started=started,
                refused="upstream",
            )
            return JSONResponse(error_body(502, message), status_code=502)
        return StreamingResponse(
            self._relay(upstream, name, method, rest, len(body), started),
            status_code=upstream.status_code,
            headers=response_headers(upstream.headers.multi_items()),
        )

    def _refuse(
        self, no: Refused, provider: str, method: str, path: str, started: float
    ) -> Response:
        self.record(
            provider,
            method,
            path,
            no.status,
            sent=0,
            received=0,
            started=started,
            refused=no.reason,
        )
        return JSONResponse(error_body(no.status, no.message), status_code=no.status)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            raise Refused(413, f"request bodies are limited to {MAX_BODY} bytes", "too-large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise Refused(413, f"request bodies are limited to {MAX_BODY} bytes", "too-large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _forward(
        self,
        route: Route,
        method: str,
        raw_rest: bytes,
        query: bytes,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> httpx.Response:
        assert self.client is not None, "the broker's HTTP client is made by its server"
        cred = route.credential
        refreshed = False
        if cred.needs_refresh(self.clock()):
            await self.refresh(route)
            refreshed = True
        qs = upstream_query(query, route.provider)
        base = httpx.URL(route.upstream)
        # Only the path and query come from the request: scheme, host and port are the
        # upstream's, whatever the path holds.
        url = base.copy_with(raw_path=raw_rest + (f"?{qs}".encode() if qs else b""))
        if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
            raise Refused(403, "the request would leave the provider's host", "path")

        async def send() -> httpx.Response:
            req = self.client.build_request(  # type: ignore[union-attr]
                method, url, headers=upstream_headers(headers, route.provider, cred), content=body
            )
            return await self.client.send(req, stream=True)  # type: ignore[union-attr]

        resp = await send()
        if resp.status_code == 401 and cred.refreshable and not refreshed:
            # Revoked or expired early: refresh once, then try once more.
            failed = cred.secret
            await resp.aclose()
            await self.refresh(route, failed=failed)
            resp = await send()
        return resp

    async def refresh(self, route: Route, *, failed: str = "") -> None:
        """Refresh the route's OAuth login on the host, one refresh at a time per route:
        when it is due, or (`failed`) when the upstream refused that access token.

        :raises Refused: no new token could be had.
        """
        cred = route.credential
        async with route.lock:
            if failed and cred.secret != failed:
                return  # another request refreshed it meanwhile
            if not failed and not cred.needs_refresh(self.clock()):
                return  # likewise
            if newer_on_disk(cred) and (failed or not cred.needs_refresh(self.clock())):
                return  # the tool on the host (or another broker) refreshed the file
            await self._refresh_now(route)

    async def _refresh_now(self, route: Route) -> None:
        assert self.client is not None
        cred, name = route.credential, route.provider.name
        started = time.monotonic()
        try:
            resp = await self.client.post(
                route.token_url, json=refresh_body(cred), headers={"accept": "application/json"}
            )
            if resp.status_code != 200:
                raise Refused(
                    502, f"refreshing the {name} login failed: HTTP {resp.status_code}", "refresh"
                )
            apply_refresh(cred, resp.json(), self.clock())
        except (httpx.HTTPError, ValueError, Refused) as err:
            self.record(
                name,
                "POST",
                "(login refresh)",
                502,
                sent=0,
                received=0,
                started=started,
                refused="refresh",
            )
            if isinstance(err, Refused):
                raise
            raise Refused(
                502, f"refreshing the {name} login failed: {type(err).__name__}", "refresh"
            ) from err
        await asyncio.to_thread(write_login, cred)
        self.audit.write(
            Event(
                level="info",
                category=CATEGORY,
                title="Credential broker refreshed a login",
                description=f"{name} login refreshed on the host ({cred.source})",
                evidence={
                    "provider": name,
                    "status": resp.status_code,
                    "expires_at": cred.expires_at,
                },
                action="refreshed",
            )
        )

    async def _relay(
        self,
        upstream: httpx.Response,
        provider: str,
        method: str,
        path: str,
        sent: int,
        started: float,
    ) -> AsyncIterator[bytes]:
        received = 0
        try:
            if upstream.is_stream_consumed:  # read whole by its transport: relay what it read
                received = len(upstream.content)
                yield upstream.content
            else:
                async for chunk in upstream.aiter_raw():
                    received += len(chunk)
                    yield chunk
        finally:
            self.record(
                provider,
                method,
                path,
                upstream.status_code,
                sent=sent,
                received=received,
                started=started,
            )
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
