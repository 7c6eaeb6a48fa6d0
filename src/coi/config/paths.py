"""Where coi keeps its state: ~/.coi (or $COI_HOME), with `~` expanded for config paths."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def coi_home(env: Mapping[str, str] | None = None) -> Path:
    """The state directory: sessions, audit logs, caches. `COI_HOME` relocates it."""
    env = os.environ if env is None else env
    if env.get("COI_HOME"):
        return Path(env["COI_HOME"])
    return Path(env.get("HOME") or Path.home()) / ".coi"


def reviews_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where review copies are recorded (coi.review): light, so `coi list` can look there
    without importing the review code."""
    return coi_home(env) / "reviews"


def expand(path: str, env: Mapping[str, str] | None = None) -> Path:
    """Expand a config path: a leading `~/.coi` follows COI_HOME, `~` is the home directory."""
    env = os.environ if env is None else env
    if path == "~/.coi" or path.startswith("~/.coi/"):
        return coi_home(env) / path[len("~/.coi/") :] if path != "~/.coi" else coi_home(env)
    if path.startswith("~"):
        return Path(env.get("HOME") or Path.home()) / path[2:]
    return Path(path)
