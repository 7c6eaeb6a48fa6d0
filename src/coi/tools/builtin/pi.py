"""pi, Mario Zechner's minimal coding agent (npm @mariozechner/pi-coding-agent)."""

from coi.tools.base import Install, Tool

TOOL = Tool(
    name="pi",
    binary="pi",
    # Settings, credentials and the conversations (sessions/) all live under ~/.pi/agent.
    state_dir=".pi/agent",
    # pi has no permission prompts: nothing to bypass, and permission_mode changes nothing.
    resume_args=("--continue",),
    credential_files=(
        ".pi/agent/auth.json",
        ".pi/agent/settings.json",
        ".pi/agent/models.json",
        ".pi/agent/AGENTS.md",
    ),
    env_keys=("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY"),
    context_file=".pi/agent/AGENTS.md",
    description="pi coding agent (Mario Zechner)",
    # Not in the default image (upstream's image has no pi either): add "pi" to [build] tools,
    # or make it [tool] name, and `coi build --force`.
    install=Install(npm="@mariozechner/pi-coding-agent", default=False),
)
