"""Safety features this version cannot enforce yet: asking for one is an error, not a no-op.

A sandbox that silently ignored `--monitor` would be worse than none.
"""

from __future__ import annotations

from coi.config.loader import Config
from coi.errors import UsageError


def unenforced_warnings(cfg: Config) -> list[str]:
    """Refuse settings asking for unbuilt protection.

    :raises UsageError: the monitor was asked for.
    """
    if cfg.get_bool("monitoring.enabled"):
        origin = cfg.origins.get("monitoring.enabled", "?")
        raise UsageError(
            "not enforced yet in this version of coi: monitoring.enabled",
            details=f"Requested by: monitoring.enabled (from {origin})",
            resolution="Remove this setting, or wait for the release that enforces it; "
            "coi refuses rather than pretend to protect you.",
        )
    return []
