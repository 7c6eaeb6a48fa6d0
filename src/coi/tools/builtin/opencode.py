"""opencode."""

from collections.abc import Mapping
from typing import Any

from coi.tools.base import Broker, Install, Tool


class OpenCode(Tool):
    """opencode asks before acting unless its permission config says allow."""

    def sandbox_settings(
        self, *, bypass: bool, options: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        return {
            ".config/opencode/opencode.json": {"permission": {"*": "allow" if bypass else "ask"}}
        }


TOOL = OpenCode(
    name="opencode",
    binary="opencode",
    state_dir=".config/opencode",
    resume_args=("--continue",),
    credential_files=(".config/opencode/opencode.json", ".config/opencode/tui.json"),
    # opencode keeps its conversation database under XDG dirs: put them in the workspace.
    env={"XDG_DATA_HOME": "/workspace/.local/share", "XDG_STATE_HOME": "/workspace/.local/state"},
    env_keys=("ANTHROPIC_API_KEY", "OPENAI_API_KEY"),
    # opencode's documented `provider.<id>.options.baseURL` (with /v1, as the AI SDK's
    # default); the key comes from the provider's usual variable.
    brokers=(
        Broker(
            provider="anthropic",
            env={"ANTHROPIC_API_KEY": "{token}"},
            settings={
                ".config/opencode/opencode.json": {
                    "provider": {"anthropic": {"options": {"baseURL": "{url}/v1"}}}
                }
            },
        ),
        Broker(
            provider="openai",
            env={"OPENAI_API_KEY": "{token}"},
            settings={
                ".config/opencode/opencode.json": {
                    "provider": {"openai": {"options": {"baseURL": "{url}/v1"}}}
                }
            },
        ),
    ),
    context_file=".config/opencode/AGENTS.md",
    description="opencode (sst)",
    install=Install(npm="opencode-ai"),
)
