"""What an agent tool is: its binary, state directory, command lines and credentials."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Tool:
    """An agent CLI coi can run. Adding a tool means writing one of these (see tools/builtin/)."""

    name: str
    binary: str
    # Directory (relative to the agent's home) holding the tool's state and conversations;
    # saved after each session and restored on --resume. Empty: the tool keeps no state there.
    state_dir: str = ""
    # Extra arguments: always, in bypass permission mode, for a new session, and to resume.
    args: tuple[str, ...] = ()
    bypass_args: tuple[str, ...] = ()
    resume_args: tuple[str, ...] = ()
    new_session_args: tuple[str, ...] = ()
    # Files copied from the host's home into the agent's home (credentials, settings).
    credential_files: tuple[str, ...] = ()
    # Host environment variables the tool may need; they go in only when the user lists
    # them in [tool] forward_env (nothing from the host environment goes in by default).
    env_keys: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def command(
        self,
        *,
        session_id: str,
        resume: bool,
        bypass: bool,
        binary: str | None = None,
        resume_id: str | None = None,
    ) -> list[str]:
        """The command line that starts (or resumes) the tool."""
        cmd = [binary or self.binary, *self.args]
        if bypass:
            cmd += self.bypass_args
        if resume:
            cmd += [
                a.format(session_id=session_id, resume_id=resume_id or "") for a in self.resume_args
            ]
            cmd = [c for c in cmd if c]
        else:
            cmd += [a.format(session_id=session_id) for a in self.new_session_args]
        return cmd

    def sandbox_settings(
        self, *, bypass: bool, options: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """JSON merged into the tool's settings files inside the sandbox.

        Keys are file paths relative to the agent's home; values are laid over whatever the
        file holds (copied from the host, or restored), never replacing it. `options` are
        the `[tool.<name>]` config values.
        """
        return {}

    def discover_resume_id(self, saved_state: Path) -> str | None:
        """The tool's own conversation id inside a saved state directory, if it has one."""
        return None
