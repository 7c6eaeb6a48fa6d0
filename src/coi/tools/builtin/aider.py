"""aider."""

from coi.tools.base import Broker, Install, Tool

TOOL = Tool(
    name="aider",
    binary="aider",
    state_dir=".aider",
    bypass_args=("--yes-always",),
    resume_args=("--restore-chat-history",),
    credential_files=(".aider.conf.yml",),
    env_keys=("ANTHROPIC_API_KEY", "OPENAI_API_KEY"),
    # aider talks through litellm: ANTHROPIC_API_BASE is the API's root (litellm adds
    # /v1/messages), OPENAI_API_BASE includes /v1.
    brokers=(
        Broker(
            provider="anthropic",
            env={"ANTHROPIC_API_BASE": "{url}", "ANTHROPIC_API_KEY": "{token}"},
        ),
        Broker(
            provider="openai",
            env={"OPENAI_API_BASE": "{url}/v1", "OPENAI_API_KEY": "{token}"},
        ),
    ),
    description="aider (aider-chat)",
    install=Install(pypi="aider-chat"),
)
