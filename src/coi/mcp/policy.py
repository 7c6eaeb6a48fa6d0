"""What an MCP client may ask of `coi mcp`: pure rules, no daemon and no MCP library.

An MCP client is a program (an agent, most often) that drives sandboxes for someone; it is
not the user. So what it asks is judged the way an untrusted workspace file is: it may make a
sandbox stricter than the user's config, never looser, and it may only use folders inside
the root the user started the server with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coi.config.loader import Config
from coi.config.schema import BY_KEY
from coi.config.untrusted import judge
from coi.errors import UsageError

# The network modes, loosest first (the schema's order for `network.mode`): open,
# restricted, allowlist.
NETWORK_ORDER: tuple[str, ...] = BY_KEY["network.mode"].order
ALLOW_OPEN_KEY = "mcp.allow_open_network"


def network_refusal(requested: str | None, configured: str, allow_looser: bool) -> str | None:
    """Why a client may not have `requested` where the config says `configured`; None when
    it may. Not asking (None) keeps the config's mode; a stricter mode is always fine; a
    looser one (open where the config says restricted, say) only with `allow_looser`
    (`mcp.allow_open_network`)."""
    if requested is None or requested == configured:
        return None
    if requested not in NETWORK_ORDER:
        return f"unknown network mode '{requested}' (one of: {', '.join(NETWORK_ORDER)})"
    if configured not in NETWORK_ORDER or allow_looser:
        return None  # a malformed config mode is refused by the sandbox itself
    if NETWORK_ORDER.index(requested) >= NETWORK_ORDER.index(configured):
        return None
    return (
        f"network '{requested}' is looser than '{configured}', the mode your coi config sets "
        f"(strictness: {' < '.join(NETWORK_ORDER)})"
    )


def check_network(requested: str | None, config: Config) -> None:
    """:raises UsageError: the client asked for a looser network than the config allows."""
    reason = network_refusal(
        requested, config.get_str("network.mode"), config.get_bool(ALLOW_OPEN_KEY)
    )
    if reason is None:
        return
    if requested not in NETWORK_ORDER:
        raise UsageError(reason, resolution="Ask for restricted or allowlist, or leave it out.")
    raise UsageError(
        f"refused: {reason}",
        resolution=(
            f"Leave network out (the config's '{config.get_str('network.mode')}' applies) or "
            "ask for a stricter mode. To let MCP clients loosen it, the user sets "
            "`[mcp] allow_open_network = true` in ~/.config/coi/config.toml (a workspace "
            ".coi.toml cannot)."
        ),
    )


def limit_refusals(asked: Config, config: Config, keys: list[str]) -> list[str]:
    """The limits a client asked for (`keys`, already in `asked`) that would loosen what
    `config` sets, each with why: like an untrusted file, a client may only lower a limit."""
    out = []
    for key in keys:
        why = judge(BY_KEY[key], asked.get(key), config.get(key))
        if why is not None:
            out.append(f"{key} = {asked.get(key)!r}: {why} (config: {config.get(key)!r})")
    return out


def inside_root(root: Path, workspace: str | os.PathLike[str]) -> Path:
    """The real path of `workspace` (relative ones are taken from `root`), refused unless it
    is `root` or a folder under it once every symlink is resolved.

    :raises UsageError: outside the root, or not an existing folder.
    """
    top = root.resolve()
    raw = Path(workspace).expanduser()
    real = (raw if raw.is_absolute() else top / raw).resolve()
    if real != top and top not in real.parents:
        raise UsageError(
            f"workspace '{workspace}' is outside the server's root {top}",
            details=f"it is {real}" if str(real) != str(workspace) else None,
            resolution=(
                "Use a folder inside the root (a path relative to it is fine). The user picks "
                "the root when starting the server: coi mcp --root DIR."
            ),
        )
    if not real.is_dir():
        raise UsageError(
            f"workspace '{workspace}' is not a folder",
            resolution="Pass an existing folder inside the root.",
        )
    return real


def check_root(root: str | os.PathLike[str]) -> Path:
    """The server's root, resolved. :raises UsageError: not an existing folder."""
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise UsageError(f"--root {root}: not a folder", resolution="Pass an existing folder.")
    return path


def limits_overrides(limits: Mapping[str, Any]) -> dict[str, Any]:
    """Short limit names (`memory`, `duration`, ...) -> config keys and values.

    :raises UsageError: an unknown name.
    """
    from coi.sessions.prepare import SessionOptions

    overrides = SessionOptions(limits=dict(limits)).overrides()
    return {k: v for k, v in overrides.items() if k.startswith("limits.") and v is not None}
