"""aider."""

from coi.tools.base import Install, Tool

TOOL = Tool(
    name="aider",
    binary="aider",
    state_dir=".aider",
    bypass_args=("--yes-always",),
    resume_args=("--restore-chat-history",),
    credential_files=(".aider.conf.yml",),
    env_keys=("ANTHROPIC_API_KEY", "OPENAI_API_KEY"),
    description="aider (aider-chat)",
    install=Install(pypi="aider-chat"),
)
