"""Every config key, declared once: type, default, help, environment variable and merge rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

# The network modes, named once: the config, the CLI and the policies take them from here.
NetworkMode = Literal["restricted", "allowlist", "open"]
NETWORK_MODES: tuple[NetworkMode, ...] = get_args(NetworkMode)

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
    # How a value from an untrusted workspace file (./.coi.toml, ./.coi/config.toml) is
    # judged: one of TRUST_RULES. Every key must declare one (a unit test checks); an
    # undeclared one is treated as "never".
    trust: str = ""
    order: tuple[str, ...] = ()  # "order": the values, loosest first
    # "lower": how to read the value; "workspace-paths": list entries must stay inside the
    # workspace (see coi.config.untrusted)
    measure: str = ""


# What a workspace file that is not trusted may do with a key (coi.config.untrusted).
# A value equal to the one already in force is always accepted: it changes nothing.
TRUST_RULES: dict[str, str] = {
    "any": "no bearing on safety: always applies",
    "never": "never taken from an untrusted file (host paths, commands, images, credentials, "
    "the daemon and its resources)",
    "true": "a switch whose safe side is true: may be turned on, not off",
    "false": "a switch whose safe side is false: may be turned off, not on",
    "order": "one of `order`, loosest first: may only move towards the strict end",
    "lower": "a limit or threshold: may only be lowered; unset, '' or 0 means none (loosest)",
    "smaller": "a number that may only be lowered (0 is the strictest)",
    "higher": "a number that may only be raised; 0 means no cap (the strictest)",
    "subset": "a list that may only lose entries (what is allowed)",
    "superset": "a list that may only gain entries (what is protected); for a list that is "
    "appended, any entries may be added",
}


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
# What runs or is read by host-side git or editors. `*` matches one path component, when a
# session starts. `.git/info` as a whole: an agent may not create `attributes` there either.
DEFAULT_PROTECTED = [
    ".git/hooks",
    ".git/config",
    ".husky",
    ".vscode",
    ".coi.toml",
    ".coi",
    ".git/config.worktree",
    ".git/info",
    ".git/worktrees/*/config.worktree",
    ".git/worktrees/*/commondir",
    ".git/modules/*/config",
    ".git/modules/*/hooks",
]

# What `security.mask_secrets` hides (upstream's list for its `hardened` profile).
DEFAULT_SECRET_PATTERNS = [".env", ".env.*", "*.pem", "*.key", "id_*", "secrets/**"]

SETTINGS: tuple[Setting, ...] = (
    # [defaults]
    _s(
        "defaults.image",
        "str",
        "coi",
        "Image alias new sessions start from.",
        env=("COI_IMAGE", "CLAUDE_ON_INCUS_IMAGE"),
        profile=True,
        trust="never",
    ),
    _s(
        "defaults.persistent",
        "bool",
        False,
        "Keep containers after the session ends.",
        env=("COI_PERSISTENT", "CLAUDE_ON_INCUS_PERSISTENT"),
        profile=True,
        trust="false",
    ),
    _s(
        "defaults.max_slots",
        "int",
        10,
        "Most sessions (slots) at once on one workspace (upstream's 10; up to 99).",
        env=("COI_MAX_SLOTS",),
        trust="false",
    ),
    _s("defaults.model", "str", "", "Unused; accepted for compatibility.", trust="any"),
    _s(
        "defaults.mount_claude_config",
        "bool",
        False,
        "Unused; accepted for compatibility.",
        trust="false",
    ),
    _s(
        "defaults.environment",
        "table",
        {},
        "Environment variables set inside every session.",
        profile=True,
        trust="never",
    ),
    _s(
        "defaults.forward_env",
        "list",
        [],
        "Host environment variables passed into every session by name (upstream's "
        "[defaults] forward_env); nothing by default. A name not set on the host is skipped "
        "with a warning. Joined with tool.forward_env.",
        profile=True,
        trust="subset",
    ),
    # [paths]
    _s(
        "paths.sessions_dir",
        "str",
        "~/.coi/sessions",
        "Legacy; sessions live in ~/.coi/sessions-<tool>.",
        env=("CLAUDE_ON_INCUS_SESSIONS_DIR",),
        trust="never",
    ),
    _s(
        "paths.storage_dir",
        "str",
        "~/.coi/storage",
        "Scratch storage for coi.",
        env=("CLAUDE_ON_INCUS_STORAGE_DIR",),
        trust="never",
    ),
    _s("paths.logs_dir", "str", "~/.coi/logs", "Where coi writes its logs.", trust="never"),
    _s(
        "paths.preserve_workspace_path",
        "bool",
        False,
        "Mount the workspace at its host path instead of /workspace.",
        trust="false",
    ),
    # [incus]
    _s(
        "incus.project",
        "str",
        "default",
        "Daemon project coi works in.",
        env=("COI_PROJECT",),
        trust="never",
    ),
    _s(
        "incus.timeout",
        "int",
        60,
        "Seconds to wait for the daemon to answer a request before saying it does not.",
        env=("COI_DAEMON_TIMEOUT",),
        trust="any",
    ),
    _s(
        "incus.remote",
        "str",
        "",
        "Remote daemon: a name from 'coi remote list' (coi's remotes or the incus/lxc "
        "client's), an https:// URL, or 'local'. Empty: the one 'coi remote switch' chose, "
        "else the local daemon (docs/remote.md).",
        env=("COI_REMOTE",),
        trust="never",
    ),
    _s(
        "incus.pool",
        "str",
        "coi",
        "Storage pool for containers (made by 'coi setup').",
        env=("COI_POOL",),
        trust="never",
    ),
    _s(
        "incus.network",
        "str",
        "coibr0",
        "Bridge containers attach to (made by 'coi setup').",
        env=("COI_NETWORK",),
        trust="never",
    ),
    _s(
        "incus.group",
        "str",
        "incus-admin",
        "Unix group that may use the daemon socket.",
        trust="never",
    ),
    _s(
        "incus.templates",
        "str",
        "auto",
        "Start sandboxes as copies of a pre-shifted template of the image (a stopped "
        "'coitmpl-*' container per image and user), with spares: saves re-owning the root "
        "filesystem at every start where the daemon cannot shift it on the fly (LXD 5.0). "
        "'auto' uses them only there (on Incus a sandbox made from the image starts as fast: "
        "docs/performance.md); 'always' or 'never' decide for every daemon (true = auto, "
        "false = never).",
        env=("COI_TEMPLATES",),
        choices=("auto", "always", "never", "true", "false"),
        trust="never",
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
        trust="never",
    ),
    _s(
        "sandbox.running_spares",
        "int",
        0,
        "Booted sandboxes kept waiting for the next session in a workspace: a session that "
        "finds one skips the create and the boot, and coi boots the next when it ends. Each "
        "holds the memory of an idle sandbox and shows as running under its slot's name "
        "(docs/sessions.md). Only for plain sessions (no --persistent, ports, sockets, "
        "--name, review mode, --target or remote daemon); 0 (the default) turns it off.",
        env=("COI_RUNNING_SPARES",),
        trust="never",
    ),
    _s("incus.code_uid", "int", 1000, "Uid of the agent user inside the container.", trust="never"),
    _s(
        "incus.code_user",
        "str",
        "code",
        "Name of the agent user inside the container.",
        trust="never",
    ),
    _s(
        "incus.disable_shift",
        "bool",
        False,
        "Unused (coi maps uids with raw.idmap).",
        trust="never",
    ),
    _s("incus.claude_uid", "int", 1000, "Legacy name of incus.code_uid; accepted.", trust="never"),
    _s(
        "incus.intercept_setxattr",
        "bool",
        False,
        "Have the daemon intercept setxattr in sandboxes, as upstream always does (for "
        "Docker's overlay on kernels before 5.11). Off by default: with it on, Incus 6.0 "
        "(liblxc 5.0) reports about 1 exec in 50 under parallel load as failed while its "
        "command runs on (docs/images.md).",
        trust="false",
    ),
    # [network]
    _s(
        "network.mode",
        "str",
        "restricted",
        "Network policy: restricted, allowlist or open.",
        env=("COI_NETWORK_MODE",),
        choices=NETWORK_MODES,
        profile=True,
        trust="order",
        order=("open", "restricted", "allowlist"),
    ),
    _s("network.block_private_networks", "bool", True, "Block RFC1918 ranges.", trust="true"),
    _s(
        "network.block_metadata_endpoint",
        "bool",
        True,
        "Block 169.254.0.0/16 (cloud metadata).",
        trust="true",
    ),
    _s(
        "network.allowed_domains",
        "list",
        DEFAULT_ALLOWED_DOMAINS,
        "Domains, IPs and CIDRs reachable in allowlist mode (optionally host:port).",
        trust="subset",
    ),
    _s(
        "network.refresh_interval_minutes",
        "int",
        30,
        "Re-resolve allowlisted domains this often (0: never).",
        trust="any",
    ),
    _s(
        "network.allow_local_network_access",
        "bool",
        False,
        "Allow private ranges in restricted and allowlist modes.",
        trust="false",
    ),
    _s(
        "network.resolver",
        "str",
        "",
        "DNS server (ip or ip:port) coi uses on the host to resolve allowed_domains; "
        "empty: the host's resolver.",
        trust="never",
    ),
    _s("network.logging.enabled", "bool", True, "Log network policy changes.", trust="true"),
    _s(
        "network.logging.path", "str", "~/.coi/logs/network.log", "Network log file.", trust="never"
    ),
    # [tool]
    _s(
        "tool.name",
        "str",
        "claude",
        "Agent tool to run.",
        env=("COI_TOOL",),
        profile=True,
        trust="never",
    ),
    _s("tool.binary", "str", "", "Override the tool's executable.", trust="never"),
    _s(
        "tool.permission_mode",
        "str",
        "bypass",
        "bypass: the tool never asks; interactive: it asks.",
        choices=("bypass", "interactive"),
        trust="order",
        order=("bypass", "interactive"),
    ),
    _s(
        "tool.forward_env",
        "list",
        [],
        "Host environment variables (e.g. ANTHROPIC_API_KEY) "
        "passed into the session. Nothing else from the host environment goes in.",
        profile=True,
        trust="never",
    ),
    _s(
        "tool.sandbox_context",
        "bool",
        True,
        "Tell the agent where it is at start: a short text (workspace, network, no host "
        "credential, how to ask for more) in its home, added to the tool's instructions.",
        profile=True,
        trust="any",
    ),
    _s(
        "tool.claude.effort_level",
        "str",
        "medium",
        "Claude effort level.",
        choices=("low", "medium", "high"),
        trust="any",
    ),
    # [mounts]
    _s(
        "mounts.default",
        "mounts",
        [],
        "Extra mounts: [[mounts.default]] host=..., container=...",
        append=True,
        trust="never",
    ),
    # [ports], [[sockets]], [ssh]: published ports and forwarded host sockets
    # (coi.sessions.forwards). A listener on the host the agent serves, or a host socket it
    # may use, is a channel out of the sandbox: only the user's own files (or a trusted one)
    # may open one.
    _s(
        "ports.pool",
        "str",
        "",
        'Ports the agent may listen on, published as the same port on the host: "3000-3099" '
        'or "3000". Slot N publishes each host port shifted by (N-1) times the width of the '
        "configured host ports, so slots of one workspace never collide.",
        trust="never",
    ),
    _s(
        "ports.map",
        "mounts",
        [],
        "Published ports: [[ports.map]] host = 8080, container = 80 (shifted per slot as "
        "ports.pool).",
        append=True,
        trust="never",
    ),
    _s(
        "ports.bind",
        "str",
        "127.0.0.1",
        "Host address published ports listen on: 127.0.0.1 (this machine only) or 0.0.0.0 "
        "(every address: other machines too).",
        choices=("127.0.0.1", "0.0.0.0"),
        trust="order",
        order=("0.0.0.0", "127.0.0.1"),
    ),
    _s(
        "sockets",
        "mounts",
        [],
        'Host unix sockets forwarded in: [[sockets]] host = "/run/x.sock", container = '
        '"/run/x.sock" (the agent user owns the socket inside, mode 0600).',
        append=True,
        trust="never",
    ),
    _s(
        "ssh.forward_agent",
        "bool",
        False,
        "Forward the host's SSH agent ($SSH_AUTH_SOCK) into the sandbox: the agent can ask it "
        "to sign while the session lives; the keys never enter.",
        trust="false",
    ),
    # [limits]
    _s(
        "limits.cpu.count",
        "str",
        "",
        "CPUs: a count (2), a range (0-3) or a list (0,1).",
        env=("COI_LIMIT_CPU",),
        profile=True,
        trust="lower",
        measure="cpus",
    ),
    _s(
        "limits.cpu.allowance",
        "str",
        "",
        "CPU time: 50% (a share) or 25ms/100ms (a hard cap).",
        env=("COI_LIMIT_CPU_ALLOWANCE",),
        profile=True,
        trust="lower",
        measure="allowance",
    ),
    _s("limits.cpu.priority", "int", 0, "CPU priority 0-10.", profile=True, trust="lower"),
    _s(
        "limits.memory.limit",
        "str",
        "",
        "Memory: 2GiB or 50%.",
        env=("COI_LIMIT_MEMORY",),
        profile=True,
        trust="lower",
        measure="memory",
    ),
    _s(
        "limits.memory.enforce",
        "str",
        "hard",
        "hard: the limit is a cap (the OOM killer acts); soft: only enforced under host "
        "memory pressure. Upstream defaults to soft, which caps nothing.",
        choices=("hard", "soft"),
        profile=True,
        trust="order",
        order=("soft", "hard"),
    ),
    _s(
        "limits.memory.swap",
        "str",
        "true",
        "true, false or a size.",
        env=("COI_LIMIT_MEMORY_SWAP",),
        profile=True,
        trust="lower",
        measure="swap",
    ),
    _s(
        "limits.disk.read",
        "str",
        "",
        "Read rate: 10MB/s or 1000iops.",
        env=("COI_LIMIT_DISK_READ",),
        profile=True,
        trust="lower",
        measure="rate",
    ),
    _s(
        "limits.disk.write",
        "str",
        "",
        "Write rate: 10MB/s or 1000iops.",
        env=("COI_LIMIT_DISK_WRITE",),
        profile=True,
        trust="lower",
        measure="rate",
    ),
    _s(
        "limits.disk.max",
        "str",
        "",
        "Read+write rate.",
        profile=True,
        trust="lower",
        measure="rate",
    ),
    _s("limits.disk.priority", "int", 0, "Disk priority 0-10.", profile=True, trust="lower"),
    _s(
        "limits.disk.tmpfs_size",
        "str",
        "",
        "Mount a RAM-backed /tmp of this size (it counts against the memory limit).",
        env=("COI_LIMIT_TMPFS",),
        profile=True,
        trust="never",
    ),
    _s(
        "limits.runtime.max_duration",
        "str",
        "",
        "Stop the container after this long (2h, 30m).",
        env=("COI_LIMIT_DURATION",),
        profile=True,
        trust="lower",
        measure="duration",
    ),
    _s(
        "limits.runtime.max_processes",
        "int",
        0,
        "Process limit (0: none).",
        profile=True,
        trust="lower",
    ),
    _s(
        "limits.runtime.auto_stop",
        "bool",
        True,
        "Stop the container when max_duration ends.",
        profile=True,
        trust="true",
    ),
    _s(
        "limits.runtime.stop_graceful",
        "bool",
        True,
        "Stop gracefully before forcing.",
        profile=True,
        trust="false",
    ),
    # [git] / [security]
    _s("git.writable_hooks", "bool", False, "Legacy: disable protected paths.", trust="false"),
    # The agent's commit identity (sessions/identity.py): who the commits appear to be from is
    # the user's to say, never a cloned repository's.
    _s(
        "git.name",
        "str",
        "",
        "user.name for the agent's commits (in the sandbox's git config, with "
        "user.useConfigOnly=true so git never makes one up).",
        trust="never",
    ),
    _s("git.email", "str", "", "user.email for the agent's commits (as git.name).", trust="never"),
    _s(
        "git.seed_host_identity",
        "bool",
        True,
        "When git.name or git.email is not set, take it from the host's global git config.",
        trust="false",
    ),
    # [timezone] and [workspace]
    _s(
        "timezone.mode",
        "str",
        "host",
        "The sandbox's timezone: host (the host's, from $TZ or /etc/localtime), utc, or fixed "
        "(timezone.name).",
        choices=("host", "utc", "fixed"),
        trust="any",
    ),
    _s(
        "timezone.name",
        "str",
        "",
        "IANA zone (Europe/Berlin) for timezone.mode = fixed.",
        trust="any",
    ),
    _s(
        "workspace.mode",
        "str",
        "live",
        'How the agent gets the workspace: "live" (your folder itself, mounted) or "review" '
        "(a copy; your folder is untouched until 'coi apply': see docs/review.md).",
        choices=("live", "review"),
        profile=True,
        trust="order",
        order=("live", "review"),
    ),
    _s(
        "workspace.mount_path",
        "str",
        "/workspace",
        'Where the workspace is mounted inside: /workspace, or "same" for its host path '
        "(upstream's paths.preserve_workspace_path; absolute paths in files and hooks then "
        "match). Refused where it would cover a system folder or the agent's home.",
        choices=("/workspace", "same"),
        trust="order",
        order=("same", "/workspace"),
    ),
    _s(
        "security.protected_paths",
        "list",
        DEFAULT_PROTECTED,
        "Workspace paths the agent may not change.",
        trust="superset",
        measure="workspace-paths",
    ),
    _s(
        "security.additional_protected_paths",
        "list",
        [],
        "Appended to protected_paths.",
        append=True,
        trust="superset",
        measure="workspace-paths",
    ),
    _s("security.disable_protection", "bool", False, "Turn protected paths off.", trust="false"),
    # Secret masking (the built-in `hardened` profile turns it on): workspace files matching
    # these patterns read as empty inside (protection/masks.py, docs/security.md).
    _s(
        "security.agent_root",
        "bool",
        True,
        "The agent user may become root inside (the coi image gives it passwordless sudo and "
        "the docker group). false: both are taken away at each start, and checked.",
        profile=True,
        trust="false",
    ),
    _s(
        "security.mask_secrets",
        "bool",
        False,
        "Mount an empty, read-only file (or folder) over each workspace path matching "
        "security.secret_patterns when the sandbox is made, so the agent reads nothing there.",
        profile=True,
        trust="true",
    ),
    _s(
        "security.secret_patterns",
        "list",
        DEFAULT_SECRET_PATTERNS,
        "What security.mask_secrets masks: a name pattern (`*.pem`) matches at any depth, one "
        "with a `/` from the workspace root; `DIR/**` masks the whole folder.",
        profile=True,
        trust="superset",
        measure="workspace-paths",
    ),
    _s(
        "security.verify_interval_seconds",
        "int",
        5,
        "While coi runs, compare protected paths with their copy this often (0: only at start "
        "and end of a session).",
        trust="lower",
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
        trust="never",
    ),
    _s(
        "build.image_server",
        "str",
        "",
        "Simplestreams image server for the base, e.g. https://images.linuxcontainers.org "
        "(empty: none, so 'auto' means debootstrap).",
        trust="never",
    ),
    _s(
        "build.image_server_alias",
        "str",
        "debian/12",
        "Base image alias on the image server.",
        trust="never",
    ),
    _s(
        "build.mirror",
        "str",
        "http://deb.debian.org/debian",
        "Debian mirror for debootstrap and apt inside the build.",
        trust="never",
    ),
    _s(
        "build.host_ca_certificates",
        "bool",
        True,
        "Copy the host's extra CA certificates (/usr/local/share/ca-certificates) into built "
        "images, so builds and agents work behind a TLS-inspecting proxy.",
        trust="never",
    ),
    # The tool names come from the tool registry when `coi build` runs (each tool's file says
    # whether it is in the default image): config loading imports no tool.
    _s(
        "build.tools",
        "list",
        ["default"],
        'Agent CLIs `coi build` installs: tool names; "default" stands for the tools of the '
        'default image, e.g. ["default", "pi"]. tool.name is always installed; a failure is '
        "reported, and fatal only for tool.name.",
        trust="never",
    ),
    # [monitoring]
    _s("monitoring.enabled", "bool", False, "Run the security monitor for sessions.", trust="true"),
    _s(
        "monitoring.auto_pause_on_high",
        "bool",
        True,
        "Freeze the container on HIGH threats.",
        trust="true",
    ),
    _s(
        "monitoring.auto_kill_on_critical",
        "bool",
        True,
        "Kill the container on CRITICAL threats.",
        trust="true",
    ),
    _s(
        "monitoring.poll_interval_sec", "int", 2, "Seconds between monitor sweeps.", trust="smaller"
    ),
    # Upstream's 50 MB and 10 MB/s flag (and pause) every `npm install` or `git clone`.
    _s(
        "monitoring.file_read_threshold_mb",
        "float",
        200.0,
        "Read volume per interval: HIGH.",
        trust="lower",
    ),
    _s("monitoring.file_read_rate_mb_per_sec", "float", 100.0, "Read rate: HIGH.", trust="lower"),
    _s(
        "monitoring.file_write_threshold_mb",
        "float",
        200.0,
        "Write volume per interval: HIGH.",
        trust="lower",
    ),
    _s("monitoring.file_write_rate_mb_per_sec", "float", 100.0, "Write rate: HIGH.", trust="lower"),
    _s(
        "monitoring.exfil_threshold_mb",
        "float",
        10.0,
        "MB the sandbox may send to one address outside the allowlist: then its packets there "
        "are dropped and the sandbox paused (HIGH). Root; 0: no cap.",
        trust="lower",
    ),
    _s(
        "monitoring.exfil_total_mb",
        "float",
        50.0,
        "MB the sandbox may send in all to addresses outside the allowlist, however many: "
        "then every further packet to them is dropped and the sandbox paused (HIGH). Root; "
        "0: no total cap.",
        trust="lower",
    ),
    _s(
        "monitoring.audit_log_retention_days",
        "int",
        30,
        "Days audit logs are kept.",
        trust="higher",
    ),
    _s(
        "monitoring.nft.enabled",
        "bool",
        False,
        "Unused: coi reads connections from the host's /proc and, as root, gets every exec "
        "and exit from the kernel; no firewall rules or sudo needed.",
        trust="any",
    ),
    _s(
        "monitoring.nft.rate_limit_per_second",
        "int",
        1000,
        "Most exec events per second the monitor inspects (root; 0: all). Upstream's 100 "
        "would let an agent hide a command behind 100 quick decoys.",
        trust="higher",
    ),
    _s(
        "monitoring.nft.dns_query_threshold",
        "int",
        100,
        "DNS exchanges per minute above which a WARNING is raised.",
        trust="lower",
    ),
    _s(
        "monitoring.nft.log_dns_queries", "bool", True, "Unused (no kernel log rules).", trust="any"
    ),
    _s("monitoring.nft.lima_host", "str", "", "Unused on Linux hosts.", trust="never"),
    # [review]: coi diff / apply (docs/review.md)
    _s(
        "review.max_file_size",
        "str",
        "100MiB",
        "Largest file `coi diff` reads and `coi apply` takes from a review (100MiB; KiB, MiB, "
        "GiB, or bytes with B); bigger ones are refused, named. '' or 0: no cap.",
        env=("COI_REVIEW_MAX_FILE_SIZE",),
        trust="lower",
        measure="size",
    ),
    _s(
        "review.copy",
        "str",
        "auto",
        'Where review copies are made: "pool" (btrfs snapshots of a mirror of the '
        'workspace on the daemon\'s pool: instant at any size after the first), "host" '
        '(cp in ~/.coi/reviews), "auto" (the pool where coi can use it: the local daemon, a '
        "btrfs pool, root; else the host).",
        choices=("auto", "pool", "host"),
        env=("COI_REVIEW_COPY",),
        trust="never",
    ),
    # [mcp]
    _s(
        "mcp.allow_open_network",
        "bool",
        False,
        "Let `coi mcp` clients ask for a network mode looser than network.mode (open too).",
        trust="never",
    ),
    # [credentials]: the credential broker (docs/credentials.md). Per-provider tables are keyed
    # by provider name (anthropic, openai, gemini).
    _s(
        "credentials.mode",
        "str",
        "broker",
        "broker: the agent gets a placeholder and a base URL of a host-side broker that adds "
        "the real credential (tools that cannot be brokered fall back to copy, said at start); "
        "copy: the tool's credential files are copied into the sandbox; none: neither.",
        env=("COI_CREDENTIALS",),
        choices=("broker", "copy", "none"),
        trust="order",
        order=("copy", "broker", "none"),
    ),
    _s(
        "credentials.max_requests",
        "int",
        0,
        "Most requests the broker forwards per session (0: no limit).",
        trust="lower",
    ),
    _s(
        "credentials.max_request_bytes",
        "int",
        0,
        "Most request-body bytes the broker forwards per session (0: no limit).",
        trust="lower",
    ),
    _s(
        "credentials.max_duration",
        "str",
        "",
        "The broker forwards nothing after this long into the session (2h, 30m; '': no limit).",
        trust="lower",
        measure="duration",
    ),
    _s(
        "credentials.key_file",
        "table",
        {},
        'Per provider, a file holding its API key (e.g. anthropic = "~/.secrets/anthropic").',
        trust="never",
    ),
    _s(
        "credentials.key_command",
        "table",
        {},
        "Per provider, a command (run with /bin/sh) printing its API key on its first line.",
        trust="never",
    ),
    _s(
        "credentials.oauth_file",
        "table",
        {},
        "Per provider, the login file to use instead of the tool's own "
        "(anthropic: ~/.claude/.credentials.json); the broker refreshes it in place.",
        trust="never",
    ),
    _s(
        "credentials.upstream",
        "table",
        {},
        "Per provider, the API's base URL instead of the built-in one (a gateway, a test).",
        trust="never",
    ),
    _s(
        "credentials.token_url",
        "table",
        {},
        "Per provider, the OAuth token endpoint that refreshes a login.",
        trust="never",
    ),
    _s(
        "credentials.ca_bundle",
        "str",
        "",
        "PEM file of the CAs the broker trusts for upstream TLS (empty: the usual ones).",
        trust="never",
    ),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
PROFILE_KEYS: dict[str, Setting] = {
    s.key.split(".", 1)[1] if s.key.startswith("defaults.") else s.key: s
    for s in SETTINGS
    if s.profile
}
