"""OpenAI Codex CLI."""

from coi.tools.base import Broker, Install, Tool

TOOL = Tool(
    name="codex",
    binary="codex",
    state_dir=".codex",
    bypass_args=("--dangerously-bypass-approvals-and-sandbox",),
    resume_args=("resume", "--last"),
    credential_files=(".codex/auth.json", ".codex/config.toml"),
    env_keys=("OPENAI_API_KEY",),
    secret_files=(".codex/auth.json",),
    # The built-in "openai" provider takes its base URL from `openai_base_url` in
    # ~/.codex/config.toml (with /v1, as https://api.openai.com/v1): codex 0.171 ignores
    # OPENAI_BASE_URL (run against the broker: it went to api.openai.com), older versions read
    # it, so both are set. The key is the placeholder, as an API-key login in auth.json (so
    # codex shows no login screen) and in OPENAI_API_KEY. A ChatGPT login is not brokered.
    brokers=(
        Broker(
            provider="openai",
            env={"OPENAI_BASE_URL": "{url}/v1", "OPENAI_API_KEY": "{token}"},
            settings={
                ".codex/auth.json": {"OPENAI_API_KEY": "{token}"},
                ".codex/config.toml": {"openai_base_url": "{url}/v1"},
            },
        ),
    ),
    context_file=".codex/AGENTS.md",
    description="OpenAI Codex CLI",
    install=Install(npm="@openai/codex"),
)
