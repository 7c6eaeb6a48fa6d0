"""The review settings read from config: the size cap and the protected paths."""

from __future__ import annotations

from coi.config.loader import Config
from coi.errors import ConfigError
from coi.protection.paths import ALWAYS, configured_paths
from coi.units import parse_bytes


def parse_size(text: str) -> int:
    """'100MiB' -> bytes; '' or '0' -> 0 (no cap).

    :raises ConfigError: not a size.
    """
    text = text.strip()
    if text in ("", "0"):
        return 0
    try:
        return parse_bytes(text)
    except ValueError:
        raise ConfigError(
            f"review.max_file_size: '{text}' is not a size",
            resolution="Write it as 100MiB, 2GiB, 500KB or 1048576B ('' or 0: no cap).",
        ) from None


def max_file(cfg: Config) -> int:
    return parse_size(cfg.get_str("review.max_file_size"))


def protected(cfg: Config) -> list[str]:
    """The protected paths; coi's own config (.coi.toml, .coi) even when protection is off:
    an applied review must not choose the next session's settings."""
    paths = configured_paths(cfg)
    return paths + [p for p in ALWAYS if p not in paths]
