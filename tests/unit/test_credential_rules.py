"""The credential broker's logic: placeholders, paths, header rewriting, limits, the audit
trail, OAuth refresh with a fake clock, the provider table, and each tool's declaration."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from coi.audit.log import AuditLog
from coi.config.loader import load_config
from coi.credentials import BROKER_PORT, plan
from coi.credentials.broker import (
    Broker,
    Limits,
    Route,
    path_problem,
    presented_tokens,
    token_ok,
    upstream_headers,
    upstream_query,
)
from coi.credentials.providers import CLAUDE_LOGIN, PROVIDERS
from coi.credentials.session import proxy_device, tool_settings
from coi.credentials.sources import Credential, find_credential, read_login
from coi.errors import ConfigError
from coi.tools import registry
from coi.tools.base import Broker as ToolBroker
from coi.tools.base import Tool

TOKEN = "placeholder-" + "p" * 32
KEY = "sk-ant-REAL-KEY-0123456789"
ANTHROPIC = PROVIDERS["anthropic"]


def _cfg(**values: Any) -> Any:
    cfg = load_config(files=[], env={})
    for k, v in values.items():
        cfg.set(f"credentials.{k}", v, "test")
    return cfg


# -- the provider table ------------------------------------------------------------------------


def test_every_provider_is_https_with_api_path_prefixes() -> None:
    assert set(PROVIDERS) == {"anthropic", "openai", "gemini"}
    for name, p in PROVIDERS.items():
        assert p.name == name
        assert p.upstream.startswith("https://") and not p.upstream.endswith("/")
        assert p.paths and all(x.startswith("/") and x.endswith("/") for x in p.paths)
        assert p.key_header in ("authorization", "x-api-key", "x-goog-api-key")
        assert set(p.token_headers) >= {"authorization"}
        assert p.key_env, f"{name}: no host variable for its key"
    assert ANTHROPIC.oauth_file is CLAUDE_LOGIN
    assert CLAUDE_LOGIN.path == ".claude/.credentials.json"
    assert ANTHROPIC.oauth_headers == {"anthropic-beta": "oauth-2025-04-20"}
    assert PROVIDERS["gemini"].token_query == "key"


# -- each tool's declaration -------------------------------------------------------------------

EXPECTED = {
    # tool: {provider: env names it gets}, secret files withheld in broker mode
    "claude": (
        {"anthropic": {"ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"}},
        {".claude/.credentials.json"},
    ),
    "codex": ({"openai": {"OPENAI_BASE_URL", "OPENAI_API_KEY"}}, {".codex/auth.json"}),
    "gemini": (
        {"gemini": {"GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"}},
        {".gemini/oauth_creds.json"},
    ),
    "aider": (
        {
            "anthropic": {"ANTHROPIC_API_BASE", "ANTHROPIC_API_KEY"},
            "openai": {"OPENAI_API_BASE", "OPENAI_API_KEY"},
        },
        set(),
    ),
    "opencode": ({"anthropic": {"ANTHROPIC_API_KEY"}, "openai": {"OPENAI_API_KEY"}}, set()),
    # pi's base-URL settings are not verified: copied (said loudly), or kept out with "none"
    # (it names no secret files: "none" keeps all its credential files out).
    "pi": ({}, set()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_builtin_tool_declares_its_broker_settings(name: str) -> None:
    tool = registry.builtin_tools()[name]
    providers, secrets = EXPECTED[name]
    assert {b.provider: set(b.env) for b in tool.brokers} == providers
    assert set(tool.secret_files) == secrets
    assert set(tool.secret_files) <= set(tool.credential_files)
    if not tool.brokers:
        none = plan(tool, _cfg(mode="none"), env={}, home=Path("/nonexistent"))
        assert set(none.withhold_files) == set(tool.credential_files)
    for b in tool.brokers:
        assert b.provider in PROVIDERS
        text = json.dumps([b.env, b.settings])
        assert "{url}" in text and "{token}" in text, f"{name}: base URL and placeholder both"


def test_tool_settings_fill_in_url_and_token_per_provider() -> None:
    tools = registry.builtin_tools()
    brokered = tuple(
        _brokered(b)
        for b in tools["codex"].brokers + tools["opencode"].brokers + tools["gemini"].brokers
    )
    tokens = {"openai": "tok-o", "anthropic": "tok-a", "gemini": "tok-g"}
    env, settings = tool_settings(brokered, tokens, 41240)
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:41240/openai/v1"
    assert env["OPENAI_API_KEY"] == "tok-o" and env["ANTHROPIC_API_KEY"] == "tok-a"
    assert env["GOOGLE_GEMINI_BASE_URL"] == "http://127.0.0.1:41240/gemini"
    assert settings[".codex/auth.json"] == {"OPENAI_API_KEY": "tok-o"}
    # codex 0.171 ignores OPENAI_BASE_URL: its config key is what it follows (run end to end).
    assert settings[".codex/config.toml"] == {"openai_base_url": "http://127.0.0.1:41240/openai/v1"}
    assert settings[".config/opencode/opencode.json"] == {
        "provider": {
            "anthropic": {"options": {"baseURL": "http://127.0.0.1:41240/anthropic/v1"}},
            "openai": {"options": {"baseURL": "http://127.0.0.1:41240/openai/v1"}},
        }
    }
    assert settings[".gemini/settings.json"]["security"]["auth"]["selectedType"] == "gemini-api-key"


def _brokered(b: ToolBroker) -> Any:
    from coi.credentials.session import Brokered

    return Brokered(b, PROVIDERS[b.provider], Credential(kind="key", secret=KEY, source="t"))


# -- the mode in force -------------------------------------------------------------------------

CLAUDE = Tool(
    name="claudeish",
    binary="x",
    credential_files=(".claude/.credentials.json", ".claude/settings.json"),
    secret_files=(".claude/.credentials.json",),
    brokers=(ToolBroker(provider="anthropic", env={"U": "{url}", "T": "{token}"}),),
)


def test_broker_mode_with_a_key_withholds_the_secret_files_and_variables(tmp_path: Path) -> None:
    p = plan(CLAUDE, _cfg(), env={"ANTHROPIC_API_KEY": KEY}, home=tmp_path)
    assert p.mode == "broker"
    assert [b.provider.name for b in p.brokered] == ["anthropic"]
    assert p.brokered[0].credential.source == "$ANTHROPIC_API_KEY"
    assert p.withhold_files == (".claude/.credentials.json",)
    assert set(p.withhold_env) == {"ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"}
    assert KEY not in repr(p)  # a plan can be logged


def test_fallbacks_to_copy_are_said(tmp_path: Path) -> None:
    bare = Tool(name="bare", binary="b", credential_files=(".b",), secret_files=(".b",))
    cases = [
        (plan(CLAUDE, _cfg(mode="copy"), env={}, home=tmp_path), "copy mode"),
        (plan(bare, _cfg(), env={}, home=tmp_path), "bare cannot be brokered"),
        (
            plan(CLAUDE, _cfg(), env={"ANTHROPIC_API_KEY": KEY}, home=tmp_path, local=False),
            "remote",
        ),
        (plan(CLAUDE, _cfg(), env={}, home=tmp_path), "no credential to broker"),
    ]
    for p, said in cases:
        assert p.mode == "copy" and p.withhold_files == () and p.brokered == ()
        text = " ".join(p.notices)
        assert said in text and "the agent can read them" in text, text


def test_none_mode_keeps_every_secret_out(tmp_path: Path) -> None:
    bare = Tool(name="bare", binary="b", credential_files=(".b", ".c"), secret_files=(".b",))
    p = plan(bare, _cfg(mode="none"), env={"ANTHROPIC_API_KEY": KEY}, home=tmp_path)
    assert (p.mode, p.withhold_files, p.brokered) == ("none", (".b",), ())


def test_an_untrusted_workspace_file_may_only_move_the_mode_towards_none(tmp_path: Path) -> None:
    from coi.config.schema import BY_KEY
    from coi.config.untrusted import judge

    mode = BY_KEY["credentials.mode"]
    assert judge(mode, "copy", "broker") is not None
    assert judge(mode, "none", "broker") is None
    assert judge(BY_KEY["credentials.max_requests"], 0, 10) is not None
    assert judge(BY_KEY["credentials.max_requests"], 5, 10) is None
    for key in ("upstream", "key_command", "key_file", "oauth_file", "token_url", "ca_bundle"):
        assert BY_KEY[f"credentials.{key}"].trust == "never"


# -- where the credential comes from -----------------------------------------------------------


def _login(path: Path, access: str, refresh: str, expires_ms: int, extra: Any = None) -> Path:
    data = {
        "claudeAiOauth": {
            "accessToken": access,
            "refreshToken": refresh,
            "expiresAt": expires_ms,
            "scopes": ["user:inference"],
        },
        "other": extra or {"kept": True},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def test_sources_in_order_config_then_environment_then_the_tools_files(tmp_path: Path) -> None:
    home = tmp_path
    _login(home / ".claude/.credentials.json", "at-1", "rt-1", 2_000_000_000_000)
    assert find_credential(ANTHROPIC, _cfg().values, {}, home).secret == "at-1"  # type: ignore[union-attr]
    cred = find_credential(ANTHROPIC, _cfg().values, {"CLAUDE_CODE_OAUTH_TOKEN": "oat"}, home)
    assert cred is not None and (cred.kind, cred.secret) == ("oauth", "oat")
    cred = find_credential(ANTHROPIC, _cfg().values, {"ANTHROPIC_API_KEY": KEY}, home)
    assert cred is not None and (cred.kind, cred.secret) == ("key", KEY)
    key_file = tmp_path / "k"
    key_file.write_text("from-file\n")
    values = _cfg(key_file={"anthropic": str(key_file)}).values
    assert (
        find_credential(ANTHROPIC, values, {"ANTHROPIC_API_KEY": KEY}, home).secret == "from-file"
    )  # type: ignore[union-attr]
    values = _cfg(key_command={"anthropic": "echo from-command; echo second"}).values
    assert find_credential(ANTHROPIC, values, {}, home).secret == "from-command"  # type: ignore[union-attr]
    codex = tmp_path / ".codex/auth.json"
    codex.parent.mkdir()
    codex.write_text(json.dumps({"OPENAI_API_KEY": "sk-openai"}))
    assert find_credential(PROVIDERS["openai"], _cfg().values, {}, home).secret == "sk-openai"  # type: ignore[union-attr]
    codex.write_text(json.dumps({"tokens": {"access_token": "chatgpt"}}))  # a ChatGPT login
    assert find_credential(PROVIDERS["openai"], _cfg().values, {}, home) is None


def test_a_broken_configured_source_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key_file"):
        find_credential(
            ANTHROPIC, _cfg(key_file={"anthropic": str(tmp_path / "no")}).values, {}, tmp_path
        )
    with pytest.raises(ConfigError, match="key_command"):
        find_credential(ANTHROPIC, _cfg(key_command={"anthropic": "exit 3"}).values, {}, tmp_path)
    with pytest.raises(ConfigError, match="holds no anthropic login"):
        (tmp_path / "empty.json").write_text("{}")
        values = _cfg(oauth_file={"anthropic": str(tmp_path / "empty.json")}).values
        find_credential(ANTHROPIC, values, {}, tmp_path)


def test_a_credential_never_shows_its_secret() -> None:
    c = Credential(kind="oauth", secret=KEY, source="s", refresh_token="rt-secret")
    assert KEY not in repr(c) and "rt-secret" not in repr(c)


# -- placeholders, paths, headers --------------------------------------------------------------


def test_the_placeholder_is_accepted_in_each_header_form_and_nothing_else() -> None:
    for headers in ([("Authorization", f"Bearer {TOKEN}")], [("x-api-key", TOKEN)]):
        assert token_ok(presented_tokens(headers, [], ANTHROPIC), TOKEN)
    assert not token_ok(presented_tokens([], [], ANTHROPIC), TOKEN)
    assert not token_ok(presented_tokens([("x-api-key", "wrong")], [], ANTHROPIC), TOKEN)
    # The placeholder plus some other key: refused (nothing but the placeholder may come in).
    mixed = [("x-api-key", TOKEN), ("authorization", "Bearer sk-other")]
    assert not token_ok(presented_tokens(mixed, [], ANTHROPIC), TOKEN)
    gemini = PROVIDERS["gemini"]
    assert token_ok(presented_tokens([], [("key", TOKEN)], gemini), TOKEN)
    assert token_ok(presented_tokens([("x-goog-api-key", TOKEN)], [], gemini), TOKEN)
    assert not token_ok(presented_tokens([], [("key", TOKEN)], ANTHROPIC), TOKEN)


def test_only_the_providers_api_paths_are_forwarded() -> None:
    assert path_problem("/v1/messages", b"/v1/messages", ANTHROPIC) is None
    assert "not an API path" in str(path_problem("/admin", b"/admin", ANTHROPIC))
    assert "not an API path" in str(path_problem("/", b"/", ANTHROPIC))
    assert "dot segment" in str(path_problem("/v1/../admin", b"/v1/../admin", ANTHROPIC))
    assert "encoded" in str(path_problem("/v1/x/admin", b"/v1/x%2F..%2Fadmin", ANTHROPIC))
    assert "encoded" in str(path_problem("/v1//x", b"/v1//x", ANTHROPIC))


def test_headers_lose_the_placeholder_and_gain_the_real_key() -> None:
    incoming = [
        ("Host", "127.0.0.1:41240"),
        ("Authorization", f"Bearer {TOKEN}"),
        ("x-api-key", TOKEN),
        ("Cookie", "a=b"),
        ("Connection", "keep-alive"),
        ("Content-Length", "12"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "tools-2024"),
        ("Content-Type", "application/json"),
    ]
    key = Credential(kind="key", secret=KEY, source="t")
    out = upstream_headers(incoming, ANTHROPIC, key)
    assert out == [
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "tools-2024"),
        ("content-type", "application/json"),
        ("x-api-key", KEY),
    ]
    oauth = Credential(kind="oauth", secret="at-1", source="t")
    out = dict(upstream_headers(incoming, ANTHROPIC, oauth))
    assert out["authorization"] == "Bearer at-1" and "x-api-key" not in out
    assert out["anthropic-beta"] == "tools-2024,oauth-2025-04-20"
    out = dict(upstream_headers([], ANTHROPIC, oauth))
    assert out["anthropic-beta"] == "oauth-2025-04-20"
    openai = dict(
        upstream_headers([("authorization", f"Bearer {TOKEN}")], PROVIDERS["openai"], key)
    )
    assert openai == {"authorization": f"Bearer {KEY}"}
    gemini = dict(upstream_headers([("x-goog-api-key", TOKEN)], PROVIDERS["gemini"], key))
    assert gemini == {"x-goog-api-key": KEY}
    assert upstream_query(f"alt=sse&key={TOKEN}".encode(), PROVIDERS["gemini"]) == "alt=sse"
    assert upstream_query(b"beta=true", ANTHROPIC) == "beta=true"


def test_the_proxy_device_binds_in_the_container_and_drops_to_our_uid(tmp_path: Path) -> None:
    dev = proxy_device(tmp_path / "b.sock")
    assert dev == {
        "type": "proxy",
        "listen": f"tcp:127.0.0.1:{BROKER_PORT}",
        "connect": f"unix:{tmp_path / 'b.sock'}",
        "bind": "container",
        "security.uid": str(os.getuid()),
        "security.gid": str(os.getgid()),
    }


# -- the app, against a fake upstream ----------------------------------------------------------


class Upstream:
    """A fake provider: records what it receives; answers from `reply`."""

    def __init__(self, reply: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.seen: list[httpx.Request] = []
        self.reply = reply or (lambda r: httpx.Response(200, json={"ok": True}))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.seen.append(request)
        return self.reply(request)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _broker(
    tmp_path: Path,
    upstream: Upstream,
    cred: Credential | None = None,
    *,
    limits: Limits | None = None,
    clock: Clock | None = None,
) -> Broker:
    route = Route(
        provider=ANTHROPIC,
        token=TOKEN,
        credential=cred or Credential(kind="key", secret=KEY, source="t"),
        upstream="https://api.example.test",
        token_url="https://auth.example.test/v1/oauth/token",
    )
    return Broker(
        "c1",
        {"anthropic": route},
        limits=limits,
        audit=AuditLog("c1", tmp_path / "coi"),
        clock=clock or Clock(),
        client=httpx.AsyncClient(transport=httpx.MockTransport(upstream)),
    )


def _send(broker: Broker, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=broker)
        out = []
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:41240") as c:
            for r in requests:
                out.append(await c.request(r.pop("method", "POST"), **r))
        assert broker.client is not None
        await broker.client.aclose()
        return out

    return asyncio.run(go())


def _msg(
    token: str = TOKEN, path: str = "/anthropic/v1/messages", body: bytes = b'{"x":1}'
) -> dict[str, Any]:
    return {
        "url": path,
        "headers": {"x-api-key": token, "anthropic-version": "2023-06-01"},
        "content": body,
    }


def test_a_request_with_the_placeholder_reaches_the_upstream_with_the_real_key(
    tmp_path: Path,
) -> None:
    up = Upstream()
    (ok,) = _send(_broker(tmp_path, up), [_msg()])
    assert ok.status_code == 200 and ok.json() == {"ok": True}
    (req,) = up.seen
    assert str(req.url) == "https://api.example.test/v1/messages"
    assert req.headers["x-api-key"] == KEY and TOKEN not in str(req.headers)
    assert req.headers["anthropic-version"] == "2023-06-01" and req.content == b'{"x":1}'


def test_refusals_are_403_with_a_clear_error_and_never_reach_the_upstream(tmp_path: Path) -> None:
    up = Upstream()
    broker = _broker(tmp_path, up)
    answers = _send(
        broker,
        [
            _msg(token="wrong"),
            {"url": "/anthropic/v1/messages", "content": b"{}"},
            _msg(path="/anthropic/admin/keys"),
            _msg(path="/openai/v1/chat/completions"),
            _msg(path="/anthropic/v1/../../etc"),
            # A percent-encoded provider name must not shift where the forwarded path
            # starts (it would have made the upstream "api.example.testic").
            _msg(path="/%61nthropic/v1/messages"),
            _msg(path="/anthropic/v1/x%2F..%2F..%2Fadmin"),
        ],
    )
    assert [a.status_code for a in answers] == [403] * 7
    messages = [a.json()["error"]["message"] for a in answers]
    assert "wrong session token" in messages[0] and "wrong session token" in messages[1]
    assert "not an API path of anthropic" in messages[2]
    assert "no provider 'openai'" in messages[3]
    assert all(m.startswith("coi credential broker: ") for m in messages)
    assert answers[0].json()["error"]["type"] == "permission_error"
    assert up.seen == []
    assert broker.requests == 0


def test_a_websocket_upgrade_gets_426_at_once_and_never_reaches_the_upstream(
    tmp_path: Path,
) -> None:
    """codex tries the Responses API over a WebSocket first: a 426 sends it to HTTPS at
    once (anything else it retried five times)."""
    up = Upstream()
    broker = _broker(tmp_path, up)
    ws = _msg()
    ws["headers"] = {**ws["headers"], "connection": "Upgrade", "upgrade": "websocket"}
    (answer,) = _send(broker, [{**ws, "method": "GET"}])
    assert answer.status_code == 426
    assert "WebSockets are not relayed" in answer.json()["error"]["message"]
    assert up.seen == [] and broker.requests == 0
    (event,) = AuditLog("c1", tmp_path / "coi").read()
    assert event["evidence"]["reason"] == "upgrade"
    h2c = _msg()
    h2c["headers"] = {**h2c["headers"], "connection": "Upgrade", "upgrade": "h2c"}
    (served,) = _send(_broker(tmp_path, up), [h2c])
    assert served.status_code == 200 and "upgrade" not in up.seen[0].headers


def test_every_request_is_one_audit_event_without_key_or_body(tmp_path: Path) -> None:
    up = Upstream(lambda r: httpx.Response(200, content=b"secret-answer-body"))
    broker = _broker(tmp_path, up)
    _send(broker, [_msg(body=b"secret-prompt-body"), _msg(token="wrong")])
    events = broker.audit.read()
    assert len(events) == 2
    ok, no = events
    assert ok["category"] == "credentials" and ok["action"] == "forwarded" and ok["level"] == "info"
    ev = ok["evidence"]
    assert (ev["provider"], ev["method"], ev["path"], ev["status"]) == (
        "anthropic",
        "POST",
        "/v1/messages",
        200,
    )
    assert ev["request_bytes"] == len(b"secret-prompt-body") and ev["response_bytes"] == len(
        b"secret-answer-body"
    )
    assert ok["timestamp"] and ok["container"] == "c1"
    assert (
        no["action"] == "refused"
        and no["evidence"]["status"] == 403
        and no["evidence"]["reason"] == "token"
    )
    text = broker.audit.path.read_text()
    for secret in (KEY, TOKEN, "secret-prompt-body", "secret-answer-body", "wrong"):
        assert secret not in text


def test_request_limit_refuses_request_n_plus_one_and_audits_it(tmp_path: Path) -> None:
    up = Upstream()
    broker = _broker(tmp_path, up, limits=Limits(max_requests=2))
    answers = _send(broker, [_msg(), _msg(token="wrong"), _msg(), _msg()])
    assert [a.status_code for a in answers] == [200, 403, 200, 403]
    assert "request limit (2) is reached" in answers[3].json()["error"]["message"]
    assert len(up.seen) == 2
    last = broker.audit.read()[-1]
    assert last["action"] == "refused" and last["evidence"]["reason"] == "max_requests"


def test_byte_and_time_limits(tmp_path: Path) -> None:
    up = Upstream()
    broker = _broker(tmp_path, up, limits=Limits(max_request_bytes=10))
    answers = _send(broker, [_msg(body=b"123456"), _msg(body=b"123456"), _msg(body=b"1234")])
    assert [a.status_code for a in answers] == [200, 403, 200]
    assert "request-byte limit (10)" in answers[1].json()["error"]["message"]
    assert (broker.requests, broker.request_bytes) == (2, 10)
    clock = Clock()
    broker = _broker(tmp_path, Upstream(), limits=Limits(max_duration=60), clock=clock)
    (a,) = _send(broker, [_msg()])
    clock.now += 61
    broker.client = httpx.AsyncClient(transport=httpx.MockTransport(Upstream()))
    (b,) = _send(broker, [_msg()])
    assert (a.status_code, b.status_code) == (200, 403)
    assert "time limit" in b.json()["error"]["message"]


def test_an_ended_session_refuses(tmp_path: Path) -> None:
    broker = _broker(tmp_path, Upstream())
    broker.closed = True
    (a,) = _send(broker, [_msg()])
    assert a.status_code == 403 and "session has ended" in a.json()["error"]["message"]


def test_an_unreachable_upstream_is_a_502_naming_no_secret(tmp_path: Path) -> None:
    def fail(r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    broker = _broker(tmp_path, Upstream(fail))
    (a,) = _send(broker, [_msg()])
    assert a.status_code == 502 and "could not be reached" in a.json()["error"]["message"]
    assert broker.audit.read()[-1]["evidence"]["status"] == 502


def test_a_streamed_answer_is_relayed_chunk_by_chunk(tmp_path: Path) -> None:
    events = [b"event: a\ndata: 1\n\n", b"event: b\ndata: 2\n\n"]

    async def chunks() -> AsyncIterator[bytes]:
        for e in events:
            yield e

    def sse(r: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())

    broker = _broker(tmp_path, Upstream(sse))
    (a,) = _send(broker, [_msg()])
    assert a.headers["content-type"] == "text/event-stream" and a.content == b"".join(events)


# -- OAuth logins: refresh on the host ---------------------------------------------------------


def _oauth_broker(
    tmp_path: Path, clock: Clock, token_reply: Callable[[httpx.Request], httpx.Response]
) -> tuple[Broker, Upstream, Path]:
    login = _login(
        tmp_path / "home/.claude/.credentials.json",
        "at-old",
        "rt-old",
        int((clock.now - 10) * 1000),
    )
    cred = read_login(login, CLAUDE_LOGIN)
    assert cred is not None

    def route(r: httpx.Request) -> httpx.Response:
        if r.url.host == "auth.example.test":
            return token_reply(r)
        who = r.headers.get("authorization")
        return httpx.Response(401 if who == "Bearer revoked" else 200, json={"who": who})

    up = Upstream(route)
    return _broker(tmp_path, up, cred, clock=clock), up, login


def test_an_expired_login_is_refreshed_on_the_host_and_written_back(tmp_path: Path) -> None:
    clock = Clock()

    def token(r: httpx.Request) -> httpx.Response:
        body = json.loads(r.content)
        assert body == {
            "grant_type": "refresh_token",
            "refresh_token": "rt-old",
            "client_id": CLAUDE_LOGIN.client_id,
        }
        return httpx.Response(
            200, json={"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 3600}
        )

    broker, up, login = _oauth_broker(tmp_path, clock, token)
    (a,) = _send(broker, [_msg()])
    assert a.status_code == 200 and a.json() == {"who": "Bearer at-new"}
    assert [r.url.host for r in up.seen] == ["auth.example.test", "api.example.test"]
    assert up.seen[1].headers["anthropic-beta"] == "oauth-2025-04-20"
    data = json.loads(login.read_text())
    assert data["claudeAiOauth"]["accessToken"] == "at-new"
    assert data["claudeAiOauth"]["refreshToken"] == "rt-new"
    assert data["claudeAiOauth"]["expiresAt"] == int((clock.now + 3600) * 1000)
    assert data["claudeAiOauth"]["scopes"] == ["user:inference"] and data["other"] == {"kept": True}
    assert stat.S_IMODE(login.stat().st_mode) == 0o600
    assert [p.name for p in login.parent.iterdir()] == [".credentials.json"]  # no temp left
    text = broker.audit.path.read_text()
    assert "refreshed" in text and "rt-new" not in text and "at-new" not in text


def test_a_valid_login_is_not_refreshed_and_a_401_refreshes_once(tmp_path: Path) -> None:
    clock = Clock()
    calls: list[int] = []

    def token(r: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, json={"access_token": f"at-{len(calls)}", "expires_in": 3600})

    broker, up, _login_file = _oauth_broker(tmp_path, clock, token)
    assert broker.routes["anthropic"].credential.needs_refresh(clock.now)
    clock.now -= 3600  # the token is now an hour from expiring
    assert not broker.routes["anthropic"].credential.needs_refresh(clock.now)
    (a,) = _send(broker, [_msg()])
    assert a.status_code == 200 and calls == []
    broker.routes["anthropic"].credential.secret = "revoked"  # the upstream says 401 to it
    broker.client = httpx.AsyncClient(transport=httpx.MockTransport(up))
    (b,) = _send(broker, [_msg()])
    assert b.status_code == 200 and b.json() == {"who": "Bearer at-1"} and calls == [1]


def test_a_login_refreshed_by_the_host_tool_is_taken_from_the_file(tmp_path: Path) -> None:
    clock = Clock()

    def token(r: httpx.Request) -> httpx.Response:
        raise AssertionError("the broker must not refresh: the file has a newer login")

    broker, _up, login = _oauth_broker(tmp_path, clock, token)
    _login(login, "at-host", "rt-host", int((clock.now + 3600) * 1000))
    (a,) = _send(broker, [_msg()])
    assert a.status_code == 200 and a.json() == {"who": "Bearer at-host"}
    assert broker.routes["anthropic"].credential.refresh_token == "rt-host"


def test_a_failed_refresh_is_a_502_and_audited(tmp_path: Path) -> None:
    clock = Clock()
    broker, _up, login = _oauth_broker(
        tmp_path, clock, lambda r: httpx.Response(400, json={"error": "invalid_grant"})
    )
    (a,) = _send(broker, [_msg()])
    assert (
        a.status_code == 502
        and "refreshing the anthropic login failed: HTTP 400" in a.json()["error"]["message"]
    )
    assert json.loads(login.read_text())["claudeAiOauth"]["refreshToken"] == "rt-old"
    reasons = [e["evidence"].get("reason") for e in broker.audit.read()]
    assert "refresh" in reasons


def test_a_toml_settings_file_gets_the_brokers_top_level_keys_and_keeps_the_rest() -> None:
    """codex's ~/.codex/config.toml: `openai_base_url` is set, first (before any table);
    the user's keys and tables stay; a file coi cannot edit is left alone (None)."""
    from coi.tools.settings import merge_settings_text, merge_toml_text

    url = {"openai_base_url": "http://127.0.0.1:41240/openai/v1"}
    assert merge_toml_text(None, url) == b'openai_base_url = "http://127.0.0.1:41240/openai/v1"\n'
    mine = (
        b'model = "o3"\nopenai_base_url = "https://evil.example/v1"\n'
        b'[model_providers.x]\nopenai_base_url = "kept: not top level"\n'
    )
    merged = merge_toml_text(mine, url)
    assert merged is not None
    got = tomllib.loads(merged.decode())
    assert got["openai_base_url"] == url["openai_base_url"] and got["model"] == "o3"
    assert got["model_providers"]["x"]["openai_base_url"] == "kept: not top level"
    assert merge_toml_text(b"not = toml = [", url) is None
    assert merge_toml_text(b'openai_base_url = """\nspans\nlines"""\n', url) is None
    assert merge_toml_text(b"", {"table": {"k": 1}}) is None  # top-level scalars only
    assert merge_settings_text(".codex/config.toml", None, url) == merge_toml_text(None, url)
    assert merge_settings_text(".x.json", None, {"a": 1}) == b'{\n  "a": 1\n}\n'
