"""The review settings read from config: the size cap and the protected paths."""

from __future__ import annotations

import re

from coi.config.loader import Config
from coi.errors import ConfigError
from coi.protection.paths import ALWAYS, configured_paths

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_IUNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'100MiB' -> bytes; '' or '0' -> 0 (no cap).

    :raises ConfigError: not a size.
    """
    text = text.strip()
    if text in ("", "0"):
        return 0
    m = re.fullmatch(r"(\d+)([KMGT]?)(i?)B", text)
    if not m:
        raise ConfigError(
            f"review.max_file_size: '{text}' is not a size",
            resolution="Write it as 100MiB, 2GiB, 500KB or 1048576B ('' or 0: no cap).",
        )
    unit = _IUNITS[m.group(2)] if m.group(3) and m.group(2) else _UNITS[m.group(2)]
    return int(m.group(1)) * unit


def max_file(cfg: Config) -> int:
    return parse_size(cfg.get_str("review.max_file_size"))


def protected(cfg: Config) -> list[str]:
    """The protected paths; coi's own config (.coi.toml, .coi) even when protection is off:
    an applied review must not choose the next session's settings."""
    paths = configured_paths(cfg)
    return paths + [p for p in ALWAYS if p not in paths]
