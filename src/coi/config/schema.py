"""Every config key, declared once: type, default, help, environment variable and merge rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Value kinds a key can have. "mounts" is a list of {host, container} tables.
KINDS = ("str", "bool", "int", "float", "list", "table", "mounts")


@dataclass(frozen=True)
class Setting:
    """One config key."""

    key: str
    kind: str
    default: Any
    help: str
    env: tuple[str, ...] = ()
    append: bool = False  # lists from later files extend earlier ones instead of replacing
    choices: tuple[str, ...] = ()
    profile: bool = False  # may also appear under [profiles.NAME]


def _s(key: str, kind: str, default: Any, help: str, **kw: Any) -> Setting:
    return Setting(key, kind, default, help, **kw)


# Unlike upstream, 8.8.8.8 and 1.1.1.1 are not in the list: sandboxes resolve through the
# bridge, and a public resolver reachable on any port is a ready-made DNS tunnel.
DEFAULT_ALLOWED_DOMAINS = [
    "registry.npmjs.org",
    "npm.pkg.github.com",
    "api.anthropic.com",
    "platform.claude.com",
]
DEFAULT_PROTECTED = [".git/hooks", ".git/config", ".husky", ".vscode"]

SETTINGS: tuple[Setting, ...] = (
    # [defaults]
    _s(
        "defaults.image",
        "str",
        "coi",
        "Image alias new sessions start from.",
        env=("COI_IMAGE", "CLAUDE_ON_INCUS_IMAGE"),
        profile=True,
    ),
    _s(
        "defaults.persistent",
        "bool",
        False,
        "Keep containers after the session ends.",
        env=("COI_PERSISTENT", "CLAUDE_ON_INCUS_PERSISTENT"),
        profile=True,
    ),
    _s("defaults.model", "str", "", "Unused; accepted for compatibility."),
    _s("defaults.mount_claude_config", "bool", False, "Unused; accepted for compatibility."),
    _s(
        "defaults.environment",
        "table",
        {},
        "Environment variables set inside every session.",
        profile=True,
    ),
    # [paths]
    _s(
        "paths.sessions_dir",
        "str",
        "~/.coi/sessions",
        "Legacy; sessions live in ~/.coi/sessions-<tool>.",
        env=("CLAUDE_ON_INCUS_SESSIONS_DIR",),
    ),
    _s(
        "paths.storage_dir",
        "str",
        "~/.coi/storage",
        "Scratch storage for coi.",
        env=("CLAUDE_ON_INCUS_STORAGE_DIR",),
    ),
    _s("paths.logs_dir", "str", "~/.coi/logs", "Where coi writes its logs."),
    _s(
        "paths.preserve_workspace_path",
        "bool",
        False,
        "Mount the workspace at its host path instead of /workspace.",
    ),
    # [incus]
    _s("incus.project", "str", "default", "Daemon project coi works in.", env=("COI_PROJECT",)),
    _s(
        "incus.remote",
        "str",
        "",
        "Remote daemon: a remote name from the incus/lxc client "
        "config, or an https:// URL. Empty: the local daemon.",
        env=("COI_REMOTE",),
    ),
    _s(
        "incus.pool",
        "str",
        "coi",
        "Storage pool for containers (made by 'coi setup').",
        env=("COI_POOL",),
    ),
    _s(
        "incus.network",
        "str",
        "coibr0",
        "Bridge containers attach to (made by 'coi setup').",
        env=("COI_NETWORK",),
    ),
    _s("incus.group", "str", "incus-admin", "Unix group that may use the daemon socket."),
    _s(
        "incus.templates",
        "bool",
        True,
        "Start sandboxes as copies of a pre-shifted template of the image (a stopped "
        "'coitmpl-*' container per image and user): saves re-owning the root filesystem at "
        "every start when the daemon cannot shift it on the fly (LXD 5.0).",
        env=("COI_TEMPLATES",),
    ),
    _s(
        "incus.spares",
        "int",
        2,
        "Stopped copies of the template kept ready ('coispare-*'; no memory, next to no "
        "disk): a sandbox renames one instead of waiting for a copy, and coi makes a new one "
        "in the background when its session ends. Set it to how many sessions you start at "
        "once; 0 turns spares off.",
        env=("COI_SPARES",),
    ),
    _s("incus.code_uid", "int", 1000, "Uid of the agent user inside the container."),
    _s("incus.code_user", "str", "code", "Name of the agent user inside the container."),
    _s("incus.disable_shift", "bool", False, "Unused (coi maps uids with raw.idmap)."),
    _s("incus.claude_uid", "int", 1000, "Legacy name of incus.code_uid; accepted."),
    # [network]
    _s(
        "network.mode",
        "str",
        "restricted",
        "Network policy: restricted, allowlist or open.",
        env=("COI_NETWORK_MODE",),
        choices=("restricted", "allowlist", "open"),
        profile=True,
    ),
    _s("network.block_private_networks", "bool", True, "Block RFC1918 ranges."),
    _s("network.block_metadata_endpoint", "bool", True, "Block 169.254.0.0/16 (cloud metadata)."),
    _s(
        "network.allowed_domains",
        "list",
        DEFAULT_ALLOWED_DOMAINS,
        "Domains, IPs and CIDRs reachable in allowlist mode (optionally host:port).",
    ),
    _s(
        "network.refresh_interval_minutes",
        "int",
        30,
        "Re-resolve allowlisted domains this often (0: never).",
    ),
    _s(
        "network.allow_local_network_access",
        "bool",
        False,
        "Allow private ranges in restricted and allowlist modes.",
    ),
    _s(
        "network.resolver",
        "str",
        "",
        "DNS server (ip or ip:port) coi uses on the host to resolve allowed_domains; "
        "empty: the host's resolver.",
    ),
    _s("network.logging.enabled", "bool", True, "Log network policy changes."),
    _s("network.logging.path", "str", "~/.coi/logs/network.log", "Network log file."),
    # [tool]
    _s("tool.name", "str", "claude", "Agent tool to run.", env=("COI_TOOL",), profile=True),
    _s("tool.binary", "str", "", "Override the tool's executable."),
    _s(
        "tool.permission_mode",
        "str",
        "bypass",
        "bypass: the tool never asks; interactive: it asks.",
        choices=("bypass", "interactive"),
    ),
    _s(
        "tool.forward_env",
        "list",
        [],
        "Host environment variables (e.g. ANTHROPIC_API_KEY) "
        "passed into the session. Nothing else from the host environment goes in.",
        profile=True,
    ),
    _s(
        "tool.claude.effort_level",
        "str",
        "medium",
        "Claude effort level.",
        choices=("low", "medium", "high"),
    ),
    # [mounts]
    _s(
        "mounts.default",
        "mounts",
        [],
        "Extra mounts: [[mounts.default]] host=..., container=...",
        append=True,
    ),
    # [limits]
    _s(
        "limits.cpu.count",
        "str",
        "",
        "CPUs: a count (2), a range (0-3) or a list (0,1).",
        env=("COI_LIMIT_CPU",),
        profile=True,
    ),
    _s(
        "limits.cpu.allowance",
        "str",
        "",
        "CPU time: 50% (a share) or 25ms/100ms (a hard cap).",
        env=("COI_LIMIT_CPU_ALLOWANCE",),
        profile=True,
    ),
    _s("limits.cpu.priority", "int", 0, "CPU priority 0-10.", profile=True),
    _s(
        "limits.memory.limit",
        "str",
        "",
        "Memory: 2GiB or 50%.",
        env=("COI_LIMIT_MEMORY",),
        profile=True,
    ),
    _s(
        "limits.memory.enforce",
        "str",
        "hard",
        "hard: the limit is a cap (the OOM killer acts); soft: only enforced under host "
        "memory pressure. Upstream defaults to soft, which caps nothing.",
        choices=("hard", "soft"),
        profile=True,
    ),
    _s(
        "limits.memory.swap",
        "str",
        "true",
        "true, false or a size.",
        env=("COI_LIMIT_MEMORY_SWAP",),
        profile=True,
    ),
    _s(
        "limits.disk.read",
        "str",
        "",
        "Read rate: 10MB/s or 1000iops.",
        env=("COI_LIMIT_DISK_READ",),
        profile=True,
    ),
    _s(
        "limits.disk.write",
        "str",
        "",
        "Write rate: 10MB/s or 1000iops.",
        env=("COI_LIMIT_DISK_WRITE",),
        profile=True,
    ),
    _s("limits.disk.max", "str", "", "Read+write rate.", profile=True),
    _s("limits.disk.priority", "int", 0, "Disk priority 0-10.", profile=True),
    _s(
        "limits.disk.tmpfs_size",
        "str",
        "",
        "Mount a RAM-backed /tmp of this size (it counts against the memory limit).",
        env=("COI_LIMIT_TMPFS",),
        profile=True,
    ),
    _s(
        "limits.runtime.max_duration",
        "str",
        "",
        "Stop the container after this long (2h, 30m).",
        env=("COI_LIMIT_DURATION",),
        profile=True,
    ),
    _s("limits.runtime.max_processes", "int", 0, "Process limit (0: none).", profile=True),
    _s(
        "limits.runtime.auto_stop",
        "bool",
        True,
        "Stop the container when max_duration ends.",
        profile=True,
    ),
    _s(
        "limits.runtime.stop_graceful",
        "bool",
        True,
        "Stop gracefully before forcing.",
        profile=True,
    ),
    # [git] / [security]
    _s("git.writable_hooks", "bool", False, "Legacy: disable protected paths."),
    _s(
        "security.protected_paths",
        "list",
        DEFAULT_PROTECTED,
        "Workspace paths the agent may not change.",
    ),
    _s(
        "security.additional_protected_paths",
        "list",
        [],
        "Appended to protected_paths.",
        append=True,
    ),
    _s("security.disable_protection", "bool", False, "Turn protected paths off."),
    _s(
        "security.verify_interval_seconds",
        "int",
        5,
        "While coi runs, compare protected paths with their copy this often (0: only at start "
        "and end of a session).",
    ),
    # [build]
    _s(
        "build.base",
        "str",
        "auto",
        "Where `coi build` gets its Debian base: 'auto' (the image server when one is set and "
        "answers, else debootstrap), 'server', 'debootstrap' (built locally from the mirror, "
        "needs root once; cached as image 'coi-base-debian-12'), or a local image alias.",
        env=("COI_BUILD_BASE",),
    ),
    _s(
        "build.image_server",
        "str",
        "",
        "Simplestreams image server for the base, e.g. https://images.linuxcontainers.org "
        "(empty: none, so 'auto' means debootstrap).",
    ),
    _s("build.image_server_alias", "str", "debian/12", "Base image alias on the image server."),
    _s(
        "build.mirror",
        "str",
        "http://deb.debian.org/debian",
        "Debian mirror for debootstrap and apt inside the build.",
    ),
    _s(
        "build.host_ca_certificates",
        "bool",
        True,
        "Copy the host's extra CA certificates (/usr/local/share/ca-certificates) into built "
        "images, so builds and agents work behind a TLS-inspecting proxy.",
    ),
    _s(
        "build.tools",
        "list",
        ["claude", "opencode", "codex", "gemini", "aider"],
        "Agent CLIs `coi build` installs (a failure is reported; fatal only for tool.name).",
    ),
    # [monitoring]
    _s("monitoring.enabled", "bool", False, "Run the security monitor for sessions."),
    _s("monitoring.auto_pause_on_high", "bool", True, "Freeze the container on HIGH threats."),
    _s("monitoring.auto_kill_on_critical", "bool", True, "Kill the container on CRITICAL threats."),
    _s("monitoring.poll_interval_sec", "int", 2, "Seconds between monitor sweeps."),
    # Upstream's 50 MB and 10 MB/s flag (and pause) every `npm install` or `git clone`.
    _s("monitoring.file_read_threshold_mb", "float", 200.0, "Read volume per interval: HIGH."),
    _s("monitoring.file_read_rate_mb_per_sec", "float", 100.0, "Read rate: HIGH."),
    _s("monitoring.file_write_threshold_mb", "float", 200.0, "Write volume per interval: HIGH."),
    _s("monitoring.file_write_rate_mb_per_sec", "float", 100.0, "Write rate: HIGH."),
    _s("monitoring.audit_log_retention_days", "int", 30, "Days audit logs are kept."),
    _s(
        "monitoring.nft.enabled",
        "bool",
        False,
        "Unused: coi reads connections from the host's /proc and, as root, gets every exec "
        "and exit from the kernel; no firewall rules or sudo needed.",
    ),
    _s(
        "monitoring.nft.rate_limit_per_second",
        "int",
        1000,
        "Most exec events per second the monitor inspects (root; 0: all). Upstream's 100 "
        "would let an agent hide a command behind 100 quick decoys.",
    ),
    _s(
        "monitoring.nft.dns_query_threshold",
        "int",
        100,
        "DNS exchanges per minute above which a WARNING is raised.",
    ),
    _s("monitoring.nft.log_dns_queries", "bool", True, "Unused (no kernel log rules)."),
    _s("monitoring.nft.lima_host", "str", "", "Unused on Linux hosts."),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
PROFILE_KEYS: dict[str, Setting] = {
    s.key.split(".", 1)[1] if s.key.startswith("defaults.") else s.key: s
    for s in SETTINGS
    if s.profile
}
