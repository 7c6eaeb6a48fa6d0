"""A third-party tool plugin, as a test would ship one: the stand-in agent."""

from coi.tools.base import Tool

TOOL = Tool(
    name="standin",
    binary="/opt/standin/agent.sh",
    state_dir=".standin",
    resume_args=("--resume",),
    description="stand-in agent for tests",
)
