"""OpenAI Codex CLI."""

from coi.tools.base import Install, Tool

TOOL = Tool(
    name="codex",
    binary="codex",
    state_dir=".codex",
    bypass_args=("--dangerously-bypass-approvals-and-sandbox",),
    resume_args=("resume", "--last"),
    credential_files=(".codex/auth.json", ".codex/config.toml"),
    env_keys=("OPENAI_API_KEY",),
    description="OpenAI Codex CLI",
    install=Install(npm="@openai/codex"),
)
