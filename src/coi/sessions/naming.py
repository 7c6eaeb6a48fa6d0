"""Container names: prefix + 8 hex of sha256(workspace path) + slot, as upstream names them."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping

MAX_SLOTS = 10  # the default of defaults.max_slots, as upstream


def prefix(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("COI_CONTAINER_PREFIX") or "coi-"


def workspace_hash(workspace: str) -> str:
    """First 8 hex digits of sha256 of the absolute path string (no symlink resolution)."""
    return hashlib.sha256(workspace.encode()).hexdigest()[:8]


def container_name(workspace: str, slot: int, env: Mapping[str, str] | None = None) -> str:
    return f"{prefix(env)}{workspace_hash(workspace)}-{slot}"


def parse_name(name: str, env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(workspace hash, slot) of a coi container name, or None for other names."""
    m = re.fullmatch(re.escape(prefix(env)) + r"([a-f0-9]{8})-(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else None


def tmux_session(container: str) -> str:
    return f"coi-{container}"
