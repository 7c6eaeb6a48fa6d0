"""Google gemini-cli."""

from coi.tools.base import Install, Tool

TOOL = Tool(
    name="gemini",
    binary="gemini",
    state_dir=".gemini",
    bypass_args=("--yolo",),
    credential_files=(".gemini/settings.json", ".gemini/oauth_creds.json"),
    env_keys=("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    description="Google gemini-cli",
    install=Install(npm="@google/gemini-cli"),
)
