"""The sandbox's environment and identity: forwarded host variables, the timezone, the git
identity of the agent's commits, where the workspace is mounted, and the workspace's run
script."""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from coi.config.loader import Config
from coi.errors import ConfigError, SessionError, UsageError

ZONEINFO = Path("/usr/share/zoneinfo")
# An IANA zone name: `UTC`, `Europe/Berlin`, `America/Argentina/Buenos_Aires`, `Etc/GMT+5`.
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")
RUN_SCRIPT = "coi-run"


# -- forwarded host variables -------------------------------------------------------------


def forwarded_env(cfg: Config, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The host variables named in `defaults.forward_env` (upstream's name) and
    `tool.forward_env`, with their values; and a warning per name the host does not set.

    Names are an explicit allowlist: nothing from the host environment goes in unless named.
    """
    names = [*cfg.get_list("defaults.forward_env"), *cfg.get_list("tool.forward_env")]
    env: dict[str, str] = {}
    warnings: list[str] = []
    for name in dict.fromkeys(str(n) for n in names):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(
                f"forward_env: '{name}' is not an environment variable name",
                details=f"set in {cfg.origins.get('defaults.forward_env', 'the config')}",
            )
        if name in environ:
            env[name] = environ[name]
        else:
            warnings.append(f'forward_env variable "{name}" is not set on host, skipping')
    return env, warnings


# -- timezone -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zone:
    """A timezone for the sandbox: `tz` for the TZ variable ("" none), `name` the IANA name
    its files go under ("" none), `data` the zone file (TZif) from the host (b"" none)."""

    tz: str = ""
    name: str = ""
    data: bytes = b""


def _zone_file(name: str, zoneinfo: Path) -> bytes:
    """The host's zone file for `name` (b"" when it has none, or it leads out of zoneinfo)."""
    if not _ZONE_NAME.fullmatch(name) or ".." in name:
        return b""
    path = zoneinfo / name
    try:
        if not path.resolve().is_relative_to(zoneinfo.resolve()) or not path.is_file():
            return b""
        return path.read_bytes()[: 1 << 20]
    except OSError:
        return b""


def _name_of(path: Path, zoneinfo: Path) -> str:
    """The zone name of a file under zoneinfo (following links), or ""."""
    try:
        real = path.resolve()
        rel = real.relative_to(zoneinfo.resolve())
    except (OSError, ValueError):
        return ""
    name = str(rel)
    for prefix in ("posix/", "right/"):
        name = name.removeprefix(prefix)
    return name if _ZONE_NAME.fullmatch(name) else ""


def host_zone(
    environ: Mapping[str, str], *, etc: Path = Path("/etc"), zoneinfo: Path = ZONEINFO
) -> Zone:
    """The host's timezone: `$TZ` when set (a zone name, a file, or a POSIX rule such as
    `EST5EDT` or `<+0545>-5:45`), else /etc/localtime (else /etc/timezone)."""
    tz = environ.get("TZ", "")
    if tz:
        text = tz.removeprefix(":")
        if text.startswith("/"):
            name = _name_of(Path(text), zoneinfo)
            try:
                data = Path(text).read_bytes()[: 1 << 20]
            except OSError:
                data = b""
            return Zone(tz=name, name=name, data=data)
        data = _zone_file(text, zoneinfo)
        if data:
            return Zone(tz=text, name=text, data=data)
        # A POSIX rule needs no file: the variable alone is the timezone.
        return Zone(tz=tz) if "\n" not in tz else Zone()
    localtime = etc / "localtime"
    name = _name_of(localtime, zoneinfo) if localtime.is_symlink() else ""
    if not name:
        try:
            name = (etc / "timezone").read_text().strip()
        except OSError:
            name = ""
        if not _zone_file(name, zoneinfo):
            name = ""
    try:
        data = localtime.read_bytes()[: 1 << 20]
    except OSError:
        data = _zone_file(name, zoneinfo) if name else b""
    return Zone(tz=name, name=name, data=data)


def zone_for(cfg: Config, environ: Mapping[str, str], *, zoneinfo: Path = ZONEINFO) -> Zone:
    """The sandbox's timezone by `timezone.mode` (upstream's `[timezone] mode`, `name`).

    :raises ConfigError: mode fixed without a valid zone name.
    """
    mode = cfg.get_str("timezone.mode")
    if mode == "utc":
        return Zone(tz="UTC", name="UTC", data=_zone_file("UTC", zoneinfo))
    if mode == "fixed":
        name = cfg.get_str("timezone.name")
        if not _ZONE_NAME.fullmatch(name) or ".." in name:
            raise ConfigError(
                f"timezone.name '{name}' is not a zone name",
                details=f"set in {cfg.origins.get('timezone.name', 'the defaults')}",
                resolution='Use an IANA name such as "Europe/Berlin" (timezone.mode = "fixed").',
            )
        return Zone(tz=name, name=name, data=_zone_file(name, zoneinfo))
    return host_zone(environ, zoneinfo=zoneinfo)


def zone_script(zone: Zone) -> str:
    """Shell (run as root inside) that makes the zone the system's: its file under
    /usr/share/zoneinfo (the host's copy where the image has none, so TZ=<name> works in any
    image), /etc/localtime and /etc/timezone. Processes coi does not start (cron, Docker,
    services) follow it too."""
    b64 = shlex.quote(base64.b64encode(zone.data).decode()) if zone.data else ""
    if zone.name:
        z = shlex.quote(f"/usr/share/zoneinfo/{zone.name}")
        lines = [f"z={z}"]
        if b64:
            lines.append(
                'if [ ! -f "$z" ] && command -v base64 >/dev/null; then mkdir -p "${z%/*}" && '
                f'printf %s {b64} | base64 -d > "$z.coi-part" && mv -f "$z.coi-part" "$z"; fi'
            )
        lines.append(
            'if [ -f "$z" ]; then ln -sfn "$z" /etc/localtime && '
            f"printf '%s\\n' {shlex.quote(zone.name)} > /etc/timezone; fi"
        )
        return "\n".join(lines) + "\n"
    if b64:
        return (
            "if command -v base64 >/dev/null; then rm -f /etc/localtime && "
            f"printf %s {b64} | base64 -d > /etc/localtime; fi\n"
        )
    return ""


# -- git identity ------------------------------------------------------------------------

GIT_INCLUDE = "/etc/coi/gitconfig"


def _host_git(key: str, environ: Mapping[str, str]) -> str:
    """`git config --global --get KEY` on the host ("" when unset or no git)."""
    try:
        out = subprocess.run(
            ["git", "config", "--global", "--get", key],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            env={k: v for k, v in environ.items() if k in ("HOME", "PATH", "XDG_CONFIG_HOME")},
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_identity(cfg: Config, environ: Mapping[str, str]) -> tuple[str, str]:
    """(name, email) for the agent's commits: `[git] name/email`, else the host's global
    git identity (unless `git.seed_host_identity` is off); "" where there is none.

    :raises ConfigError: a value holding a line break or another control character.
    """
    seed = cfg.get_bool("git.seed_host_identity")
    out = []
    for field in ("name", "email"):
        value = cfg.get_str(f"git.{field}") or (_host_git(f"user.{field}", environ) if seed else "")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigError(
                f"git.{field} holds a control character",
                details=f"set in {cfg.origins.get(f'git.{field}', 'the host git config')}",
            )
        out.append(value)
    return out[0], out[1]


def _git_value(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def git_config_text(name: str, email: str) -> str:
    """The git config coi gives the agent: the identity, and `useConfigOnly` so a commit
    without one fails instead of carrying a made-up `code@<container>`."""
    lines = ["# Written by coi at each session start; see docs/config.md ([git]).", "[user]"]
    if name:
        lines.append(f"\tname = {_git_value(name)}")
    if email:
        lines.append(f"\temail = {_git_value(email)}")
    lines.append("\tuseConfigOnly = true")
    return "\n".join(lines) + "\n"


def git_script(name: str, email: str) -> str:
    """Shell (run as root inside): coi's git config in its own file, included from the
    system config (/etc/gitconfig) so the agent's own ~/.gitconfig and repositories' configs
    still take precedence and nothing of the image's is overwritten."""
    text = shlex.quote(git_config_text(name, email))
    inc = shlex.quote(GIT_INCLUDE)
    return (
        f"mkdir -p /etc/coi && printf %s {text} > {inc}.coi-part && chmod 644 {inc}.coi-part "
        f"&& mv -f {inc}.coi-part {inc}\n"
        f"grep -qsF 'path = {GIT_INCLUDE}' /etc/gitconfig || "
        f"printf '[include]\\n\\tpath = %s\\n' {inc} >> /etc/gitconfig\n"
    )


def setup_script(zone: Zone, git: tuple[str, str] | None) -> str:
    """What coi sets up as root in the sandbox at each start (one exec with the network
    proof): the timezone and the git identity. Never fails the start: an image without
    what it needs keeps its own settings."""
    body = zone_script(zone) + (git_script(*git) if git is not None else "")
    if not body:
        return ""
    return f"(\n{body}) </dev/null >/dev/null 2>&1 || true\n"


# -- where the workspace is mounted --------------------------------------------------------

# Folders the workspace may not be mounted over or inside (the image's system), as upstream
# refuses for preserve_workspace_path; and /tmp itself.
_SYSTEM = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
           "/root", "/run", "/sbin", "/sys", "/usr", "/var/lib", "/var/cache", "/var/log",
           "/var/run", "/var/spool")  # fmt: skip


def workspace_target(cfg: Config, workspace: Path) -> str:
    """Where the workspace is mounted inside: /workspace, or its host path with
    `[workspace] mount_path = "same"` (or upstream's `paths.preserve_workspace_path`).

    :raises UsageError: the host path would cover a system folder or the agent's home.
    """
    same = cfg.get_str("workspace.mount_path") == "same" or cfg.get_bool(
        "paths.preserve_workspace_path"
    )
    if not same:
        return "/workspace"
    target = PurePosixPath(str(workspace))
    home = PurePosixPath("/home") / cfg.get_str("incus.code_user")
    bad = (
        str(target) in ("/", "/tmp", "/var", "/home", "/var/tmp")
        or any(target == PurePosixPath(s) or target.is_relative_to(s) for s in _SYSTEM)
        or home.is_relative_to(target)
    )
    if bad:
        raise UsageError(
            f"the workspace {workspace} cannot be mounted at the same path inside: it would "
            "cover a system folder or the agent's home",
            resolution="Use a project folder (e.g. under /home/<you> or /srv), or set "
            '[workspace] mount_path = "/workspace".',
        )
    return str(target)


# -- the workspace's run script ------------------------------------------------------------


def run_script(workspace: Path, target: str) -> list[str]:
    """`coi run` with no command: the workspace's executable `coi-run`, run inside the
    sandbox from the workspace mount (its shebang picks the interpreter), as upstream.

    The file comes from the workspace, which the agent may have written: that is fine, as
    it runs inside the sandbox like any command, never on the host.

    :raises UsageError: there is none. :raises SessionError: it cannot be run as it is.
    """
    path = workspace / RUN_SCRIPT
    if not os.path.lexists(path):
        raise UsageError(
            f"no command given and no {RUN_SCRIPT} found in workspace {workspace}",
            resolution=f"Create an executable {RUN_SCRIPT} at the workspace root or pass a "
            "command: coi run -- <command>",
        )
    real = path.resolve()
    root = workspace.resolve()
    if not real.is_relative_to(root):
        raise SessionError(
            f"{RUN_SCRIPT} is a symlink resolving outside the workspace ({real}): the target "
            "will not exist inside the container",
            resolution="Move the script into the workspace or replace the symlink with a copy.",
        )
    if not real.is_file():
        raise SessionError(
            f"{RUN_SCRIPT} in workspace is {'a directory' if real.is_dir() else 'missing'}, "
            "expected a script file"
        )
    if not os.stat(real).st_mode & 0o111:
        raise SessionError(
            f"{RUN_SCRIPT} exists but is not executable",
            resolution=f"Its shebang decides the interpreter: chmod +x {RUN_SCRIPT}",
        )
    # The file itself: a link's target as seen inside (an absolute link names a host path).
    return [f"{target.rstrip('/')}/{real.relative_to(root)}"]
