"""What an agent tool is: its binary, state directory, command lines, credentials, and how
`coi build` installs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Install:
    """How `coi build` puts a tool into the `coi` image: exactly one of `npm`, `pypi`, `script`.

    The build script (coi/images/scripts/coi-image.sh) gets these as data from the builder
    (`recipe()`), installs the tool, then runs `<binary> --version` to prove it works.
    """

    # A plain class, not a dataclass: making a frozen dataclass costs 0.4 ms (measured), and
    # every session imports this module, `coi run` too.
    __slots__ = ("default", "npm", "pypi", "script")

    def __init__(
        self, *, npm: str = "", pypi: str = "", script: str = "", default: bool = True
    ) -> None:
        given = [k for k, v in (("npm", npm), ("pypi", pypi), ("script", script)) if v]
        if len(given) != 1:
            raise ValueError(f"Install needs exactly one of npm, pypi, script (got {given})")
        # npm: an npm package, installed globally (Node.js 22 and npm 10 are in the image).
        # pypi: a PyPI package, installed with `uv tool install` into a venv of its own.
        # script: bash run as root in the build container (`set -euo pipefail`); it must put
        # the tool's binary on PATH, e.g. in /usr/local/bin.
        self.npm, self.pypi, self.script = npm, pypi, script
        # In the image when `[build] tools` says "default" (its default). False: only when
        # named there, or when it is the configured tool (`[tool] name`).
        self.default = default

    def __repr__(self) -> str:
        way = next(
            f"{k}={getattr(self, k)!r}" for k in ("npm", "pypi", "script") if getattr(self, k)
        )
        return f"Install({way}, default={self.default})"

    def recipe(self, binary: str) -> dict[str, str]:
        """What the build script reads for this tool (JSON in COI_TOOL_RECIPES)."""
        if self.npm:
            return {"kind": "npm", "package": self.npm, "binary": binary}
        if self.pypi:
            return {"kind": "pypi", "package": self.pypi, "binary": binary}
        return {"kind": "script", "script": self.script, "binary": binary}


class Broker:
    """How a tool reaches one provider through coi's credential broker (docs/credentials.md).

    The broker is a host-side HTTP server per session; the tool inside is pointed at it with
    its own documented settings and given a per-session placeholder token, never the real
    credential. In `env` and `settings` values, `{url}` is the broker's base URL for this
    provider as the sandbox sees it (`http://127.0.0.1:<port>/<provider>`, no trailing slash)
    and `{token}` the placeholder. `settings` are JSON laid over the tool's settings files
    like `Tool.sandbox_settings` (paths relative to the agent's home).
    """

    # A plain class, like Install: every session imports this module.
    __slots__ = ("env", "provider", "settings")

    def __init__(
        self,
        *,
        provider: str,
        env: Mapping[str, str] | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.provider = provider
        self.env: dict[str, str] = dict(env or {})
        self.settings: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (settings or {}).items()}

    def __repr__(self) -> str:
        return f"Broker(provider={self.provider!r}, env={self.env!r}, settings={self.settings!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Broker) and (self.provider, self.env, self.settings) == (
            other.provider,
            other.env,
            other.settings,
        )

    def __hash__(self) -> int:
        return hash(self.provider)


@dataclass(frozen=True)
class Tool:
    """An agent CLI coi can run. Adding a tool means writing one of these in a module of its
    own, named after the tool, in tools/builtin/ (docs/tools.md)."""

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
    # Of `credential_files`, those that hold a secret (a key, a login's tokens): never copied
    # into the sandbox when credentials are brokered or `[credentials] mode = "none"`.
    secret_files: tuple[str, ...] = ()
    # The providers the tool can reach through the credential broker, and how it is pointed
    # at it; empty: it cannot be brokered (its credentials are copied, said at session start).
    brokers: tuple[Broker, ...] = ()
    description: str = ""
    # The tool's own user-level instructions file in the agent's home, where coi adds the
    # sandbox context (`tool.sandbox_context`, coi.sessions.context); empty: the tool reads
    # none, and the context is only in ~/SANDBOX_CONTEXT.md.
    context_file: str = ""
    # How `coi build` installs it; None: coi cannot (the tool must already be in the image).
    install: Install | None = None

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
