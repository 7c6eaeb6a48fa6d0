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
    # The built-in "openai" provider takes its base URL from OPENAI_BASE_URL (with /v1, as
    # https://api.openai.com/v1); the key is the placeholder, as an API-key login in auth.json
    # (so codex shows no login screen) and in OPENAI_API_KEY. A ChatGPT login is not brokered.
    brokers=(
        Broker(
            provider="openai",
            env={"OPENAI_BASE_URL": "{url}/v1", "OPENAI_API_KEY": "{token}"},
            settings={".codex/auth.json": {"OPENAI_API_KEY": "{token}"}},
        ),
    ),
    context_file=".codex/AGENTS.md",
    description="OpenAI Codex CLI",
    install=Install(npm="@openai/codex"),
)
