"""opencode."""

from coi.tools.base import Tool

TOOL = Tool(
    name="opencode",
    binary="opencode",
    state_dir=".config/opencode",
    resume_args=("--continue",),
    credential_files=(".config/opencode/opencode.json", ".config/opencode/tui.json"),
    # opencode keeps its conversation database under XDG dirs: put them in the workspace.
    env={"XDG_DATA_HOME": "/workspace/.local/share", "XDG_STATE_HOME": "/workspace/.local/state"},
    env_keys=("ANTHROPIC_API_KEY", "OPENAI_API_KEY"),
    description="opencode (sst)",
)
