"""The providers the credential broker knows: where each API is, which paths it forwards, how
the real credential is attached, and where on the host that credential comes from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeyFile:
    """A JSON file in the user's home holding an API key at `key` (dotted for nesting)."""

    path: str
    key: str


@dataclass(frozen=True)
class OAuthFile:
    """A tool's login file in the user's home: an access token with its expiry and a refresh
    token, under `section`. The broker refreshes it at `token_url` (the standard refresh_token
    grant, JSON body) and writes the new tokens back to the file."""

    path: str
    section: str
    token_url: str
    client_id: str
    access: str = "accessToken"
    refresh: str = "refreshToken"
    expires: str = "expiresAt"
    expires_in_ms: bool = True  # the expiry is in milliseconds since the epoch


@dataclass(frozen=True)
class Provider:
    """One API the broker forwards to."""

    name: str
    # Scheme, host and optional port; overridable per provider ([credentials] upstream).
    upstream: str
    # Paths (below the broker's /<provider> prefix, as sent upstream) that are forwarded;
    # anything else gets 403.
    paths: tuple[str, ...]
    # How an API key is attached upstream: "authorization" (as `Bearer <key>`) or a header
    # that carries the bare key (x-api-key, x-goog-api-key). OAuth access tokens always go
    # as `Authorization: Bearer`.
    key_header: str
    # Headers merged into the request when the credential is an OAuth login (values of a
    # comma-separated header such as anthropic-beta are added to the tool's own).
    oauth_headers: dict[str, str] = field(default_factory=dict)
    # Where the tool may put the placeholder: these headers (Authorization as a Bearer
    # token), and this query parameter. All of them are removed before forwarding.
    token_headers: tuple[str, ...] = ("authorization", "x-api-key")
    token_query: str = ""
    # Where the real credential comes from on the host, after the [credentials] config
    # keys: environment variables holding an API key, then ones holding an OAuth token,
    # then the tools' files.
    key_env: tuple[str, ...] = ()
    oauth_env: tuple[str, ...] = ()
    key_files: tuple[KeyFile, ...] = ()
    oauth_file: OAuthFile | None = None


# Claude Code's login (~/.claude/.credentials.json) and its public OAuth client; the token
# endpoint is the one Claude Code refreshes with (not a documented API: overridable with
# [credentials] token_url).
CLAUDE_LOGIN = OAuthFile(
    path=".claude/.credentials.json",
    section="claudeAiOauth",
    token_url="https://console.anthropic.com/v1/oauth/token",
    client_id="9d1c250a-e61b-44d9-88ed-5944d1962f5e",
)

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider(
            name="anthropic",
            upstream="https://api.anthropic.com",
            paths=("/v1/",),
            key_header="x-api-key",
            # Subscription logins are accepted by the Messages API with this beta flag.
            oauth_headers={"anthropic-beta": "oauth-2025-04-20"},
            key_env=("ANTHROPIC_API_KEY",),
            oauth_env=("CLAUDE_CODE_OAUTH_TOKEN",),
            oauth_file=CLAUDE_LOGIN,
        ),
        Provider(
            name="openai",
            upstream="https://api.openai.com",
            paths=("/v1/",),
            key_header="authorization",
            key_env=("OPENAI_API_KEY",),
            # codex keeps an API-key login here (`codex login --with-api-key`).
            key_files=(KeyFile(".codex/auth.json", "OPENAI_API_KEY"),),
        ),
        Provider(
            name="gemini",
            upstream="https://generativelanguage.googleapis.com",
            paths=("/v1beta/", "/v1/", "/v1alpha/", "/upload/v1beta/"),
            key_header="x-goog-api-key",
            token_headers=("authorization", "x-goog-api-key", "x-api-key"),
            token_query="key",
            key_env=("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        ),
    )
}


def get_provider(name: str) -> Provider:
    """:raises KeyError: no such provider."""
    return PROVIDERS[name]


def key_variables() -> frozenset[str]:
    """Every host variable a provider's credential may be in (`key_env`, `oauth_env`)."""
    return frozenset(n for p in PROVIDERS.values() for n in (*p.key_env, *p.oauth_env))
