"""Claude Code (the default tool)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coi.tools.base import Broker, Install, Tool


class Claude(Tool):
    """Claude Code keeps conversations as JSONL files under ~/.claude/projects/-workspace/."""

    def sandbox_settings(
        self, *, bypass: bool, options: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        effort = str(options.get("effort_level") or "medium")
        settings: dict[str, Any] = {
            "effortLevel": effort,
            "effortLevelAccepted": True,
            "hasSeenEffortPrompt": True,
            "effortCalloutDismissed": True,
            # Deep-merged: the user's own env entries (e.g. Bedrock) stay.
            "env": {"CLAUDE_CODE_EFFORT_LEVEL": effort},
        }
        state: dict[str, Any] = {"hasCompletedOnboarding": True}
        if bypass:
            settings["permissions"] = {"defaultMode": "bypassPermissions"}
            for d in (settings, state):
                d["allowDangerouslySkipPermissions"] = True
                d["bypassPermissionsModeAccepted"] = True
        return {".claude/settings.json": settings, ".claude.json": state}

    def discover_resume_id(self, saved_state: Path) -> str | None:
        # One folder per working directory: -workspace, or the host path's name when the
        # workspace is mounted at its host path.
        convs = sorted(
            (saved_state / "projects").glob("*/*.jsonl"),
            key=lambda p: p.stat().st_mtime,
        )
        return convs[-1].stem if convs else None


TOOL = Claude(
    name="claude",
    binary="claude",
    state_dir=".claude",
    args=("--verbose",),
    bypass_args=("--permission-mode", "bypassPermissions"),
    new_session_args=("--session-id", "{session_id}"),
    resume_args=("--resume", "{resume_id}"),
    credential_files=(
        ".claude/.credentials.json",
        ".claude/settings.json",
        ".claude/config.yml",
        ".claude/CLAUDE.md",
        ".claude.json",
    ),
    env_keys=("ANTHROPIC_API_KEY", "CLAUDE_CODE_USE_BEDROCK", "AWS_REGION"),
    secret_files=(".claude/.credentials.json",),
    # Claude Code's documented gateway settings: ANTHROPIC_BASE_URL, and ANTHROPIC_AUTH_TOKEN
    # (sent as `Authorization: Bearer`). Not ANTHROPIC_API_KEY: interactive Claude Code asks
    # once before it uses a key from the environment; the auth token needs no approval.
    brokers=(
        Broker(
            provider="anthropic",
            env={"ANTHROPIC_BASE_URL": "{url}", "ANTHROPIC_AUTH_TOKEN": "{token}"},
        ),
    ),
    context_file=".claude/CLAUDE.md",
    description="Anthropic's Claude Code",
    install=Install(npm="@anthropic-ai/claude-code"),
)
