"""Third-party tool plugins, as a test would ship them: the stand-in agents."""

from coi.tools.base import Broker, Tool

TOOL = Tool(
    name="standin",
    binary="/opt/standin/agent.sh",
    state_dir=".standin",
    resume_args=("--resume",),
    description="stand-in agent for tests",
)

# Reaches the "anthropic" provider through coi's credential broker (the tests point its
# upstream at their stand-in provider): a base URL and a placeholder in its environment and
# settings file; its login file on the host stays there.
API_TOOL = Tool(
    name="standin-api",
    binary="/opt/standin/api-agent.sh",
    credential_files=(".standin-api/login.json", ".standin-api/settings.json"),
    secret_files=(".standin-api/login.json",),
    env_keys=("ANTHROPIC_API_KEY",),
    brokers=(
        Broker(
            provider="anthropic",
            env={"STANDIN_API_URL": "{url}", "STANDIN_API_TOKEN": "{token}"},
            settings={".standin-api/settings.json": {"api": {"baseURL": "{url}"}}},
        ),
    ),
    description="stand-in agent that calls its API through the credential broker",
)
