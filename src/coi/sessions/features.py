"""Safety features this version cannot enforce yet: refuse explicit requests, warn about defaults.

A sandbox that silently ignores `--limit-memory` or `--monitor` would be worse than none, so
asking for a feature that is not built is an error, and a default that is not in force
(protected paths) is said out loud at every session start.
"""

from __future__ import annotations

from coi.config.loader import Config
from coi.config.schema import BY_KEY
from coi.errors import UsageError

_LIMIT_KEYS = tuple(
    k
    for k in BY_KEY
    if k.startswith("limits.")
    and k
    not in (
        "limits.memory.enforce",
        "limits.memory.swap",
        "limits.runtime.auto_stop",
        "limits.runtime.stop_graceful",
    )
)


def unenforced_warnings(cfg: Config) -> list[str]:
    """Refuse settings asking for unbuilt protection; return warnings for unbuilt defaults.

    :raises UsageError: a limit or the monitor was asked for.
    """
    asked = [k for k in _LIMIT_KEYS if cfg.get(k) not in ("", 0)]
    if cfg.get_bool("monitoring.enabled"):
        asked.append("monitoring.enabled")
    if asked:
        where = ", ".join(f"{k} (from {cfg.origins.get(k.split(' ')[0], '?')})" for k in asked)
        raise UsageError(
            "not enforced yet in this version of coi: " + ", ".join(k.split(" ")[0] for k in asked),
            details=f"Requested by: {where}",
            resolution="Remove these settings, or wait for the release that enforces them; "
            "coi refuses rather than pretend to protect you.",
        )
    warnings = []
    protected = cfg.get_bool("security.disable_protection") or cfg.get_bool("git.writable_hooks")
    if not protected:
        warnings.append(
            "protected paths (.git/hooks, .git/config, ...) are not enforced yet: "
            "the agent can change them (use --writable-git-hooks to silence this)"
        )
    return warnings
