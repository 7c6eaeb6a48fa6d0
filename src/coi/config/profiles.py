"""Named profiles: `[profiles.NAME]` tables, profile folders with `inherits`, built-in `hardened`.

A profile NAME can come from four places, applied in this order over the config files:

1. built in (`hardened`): it only tightens what is in force, and what it sets becomes a floor
   no later layer (a profile over it, `COI_*`, a flag) may loosen (`check_floors`);
2. `~/.coi/profiles/NAME/config.toml`: the user's, a whole config file (any key);
3. `[profiles.NAME]` tables in the config files (the keys marked `profile=True`);
4. `./.coi/profiles/NAME/config.toml`: the workspace's, untrusted like `./.coi.toml` unless
   `coi trust` pinned it: only what tightens the sandbox applies from it.

`inherits = "other"` (a top-level key of a profile file, or in a table) applies `other`
first. A parent named only by an untrusted file is applied as untrusted too: a cloned
repository cannot reach the user's own looser profile through `inherits`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coi.config.loader import (
    Config,
    _apply_layer,
    _apply_table_profile,
    _drop,
    _read_file,
    trust_status,
)
from coi.config.paths import coi_home
from coi.config.schema import BY_KEY, Setting
from coi.errors import ConfigError, UsageError

PROFILE_FILE = "config.toml"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

# The built-in profiles: key -> value. Keys another feature adds (sockets, the SSH agent)
# apply once they are in the schema.
HARDENED: dict[str, Any] = {
    "network.mode": "restricted",
    "monitoring.enabled": True,
    "monitoring.auto_pause_on_high": True,
    "monitoring.auto_kill_on_critical": True,
    "defaults.persistent": False,
    "security.mask_secrets": True,
    # Masks and read-only mounts hold only against a user who cannot unmount them.
    "security.agent_root": False,
    "security.disable_protection": False,
    "git.writable_hooks": False,
    "network.block_private_networks": True,
    "network.block_metadata_endpoint": True,
    "network.allow_local_network_access": False,
    "ssh.forward_agent": False,
    "sockets": [],
}
BUILTIN: dict[str, tuple[dict[str, Any], str]] = {
    "hardened": (
        HARDENED,
        "restricted network (or stricter), monitor on, ephemeral, no sockets or SSH agent, "
        "secret files masked, no root for the agent (no sudo, no docker group)",
    ),
}


@dataclass
class Source:
    """One place that defines (part of) a profile."""

    kind: str  # "built-in", "user", "table" or "workspace"
    where: str  # a path, or "built-in"
    untrusted: bool = False
    inherits: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    status: str = ""  # a workspace file: "untrusted", "trusted", "changed", "trust-all"
    error: str = ""  # a file that could not be read (shown by `coi profile list`)


def user_dir(env: Mapping[str, str]) -> Path:
    return coi_home(env) / "profiles"


def _user_sources(env: Mapping[str, str]) -> dict[str, Source]:
    out: dict[str, Source] = {}
    base = user_dir(env)
    try:
        names = sorted(os.listdir(base))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        path = base / name / PROFILE_FILE
        if not NAME.fullmatch(name) or not path.is_file():
            continue
        data = _read_file(path)
        out[name] = Source("user", str(path), inherits=_inherits(data, str(path), False), data=data)
    return out


def _inherits(data: dict[str, Any], origin: str, untrusted: bool) -> str | None:
    parent = data.pop("inherits", None)
    if parent is None or isinstance(parent, str):
        return parent
    if untrusted:
        return None
    raise ConfigError(f"{origin}: 'inherits' must be a profile name, got {parent!r}")


def _workspace_names(cwd: Path) -> tuple[list[str], str]:
    """The folder names under ./.coi/profiles, opened without following a link."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(os.path.realpath(cwd), flags)
    try:
        for part in (".coi", "profiles"):
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                return [], ""
            except OSError:
                return [], f"{cwd}/.coi/profiles: not read (a link or not a folder)"
            os.close(fd)
            fd = nfd
        return sorted(n for n in os.listdir(fd) if NAME.fullmatch(n)), ""
    finally:
        os.close(fd)


def _workspace_sources(cwd: Path, env: Mapping[str, str]) -> tuple[dict[str, Source], list[str]]:
    from coi.config.trust import TrustStore, Unreadable, read_nofollow

    out: dict[str, Source] = {}
    names, problem = _workspace_names(cwd)
    warnings = [problem] if problem else []
    store = TrustStore(env=env)
    for name in names:
        rel = f".coi/profiles/{name}/{PROFILE_FILE}"
        shown = str(cwd / rel)
        try:
            read = read_nofollow(cwd, rel)
        except (Unreadable, OSError) as err:
            out[name] = Source("workspace", shown, untrusted=True, error=str(err))
            continue
        if read is None:
            continue
        status = trust_status(store, read, env)
        untrusted = status not in ("trusted", "trust-all")
        try:
            data = tomllib.loads(read.data.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            if not untrusted:
                raise ConfigError(f"failed to load config: {shown}: {err}") from err
            out[name] = Source("workspace", shown, True, status=status, error=f"not TOML: {err}")
            continue
        parent = _inherits(data, shown, untrusted)
        out[name] = Source("workspace", shown, untrusted, parent, data, status)
    return out, warnings


def discover(cfg: Config, cwd: Path, env: Mapping[str, str]) -> dict[str, list[Source]]:
    """Every profile name and its sources, in the order they apply."""
    found: dict[str, list[Source]] = {}
    for name, (_values, _text) in BUILTIN.items():
        found.setdefault(name, []).append(Source("built-in", "built-in"))
    for name, src in _user_sources(env).items():
        found.setdefault(name, []).append(src)
    for name in sorted(set(cfg.profiles) | set(cfg.profile_inherits)):
        parent, origin, untrusted = cfg.profile_inherits.get(name, (None, "", False))
        origins = {o for _v, o, _u in cfg.profiles.get(name, {}).values()} | {origin} - {""}
        found.setdefault(name, []).append(
            Source("table", ", ".join(sorted(origins)), untrusted, parent)
        )
    ws, warnings = _workspace_sources(cwd, env)
    cfg.warnings.extend(warnings)
    for name, src in ws.items():
        found.setdefault(name, []).append(src)
    return found


def parent_of(name: str, sources: list[Source], cfg: Config) -> tuple[str | None, bool]:
    """The profile `name` inherits, and whether only an untrusted file says so. A trusted
    source's word wins; an untrusted one that names another parent is dropped."""
    trusted = [s for s in sources if not s.untrusted and s.inherits]
    untrusted = [s for s in sources if s.untrusted and s.inherits]
    if trusted:
        parent = trusted[-1].inherits
        for s in untrusted:
            if s.inherits != parent:
                _drop(cfg, f"{name}: inherits", s.inherits, s.where, f"{parent!r} is in force")
        return parent, False
    if untrusted:
        return untrusted[-1].inherits, True
    return None, False


def chain(name: str, found: dict[str, list[Source]], cfg: Config) -> list[tuple[str, bool]]:
    """`name` and its ancestors, the root first, each with "reached through an untrusted
    `inherits`".

    :raises ConfigError: an unknown profile, a parent not defined anywhere, or a cycle.
    """
    if name not in found:
        known = ", ".join(sorted(found)) or "none defined"
        raise ConfigError(
            f"unknown profile '{name}'",
            resolution=f"Profiles: {known} (coi profile list).",
        )
    seen: list[str] = [name]
    out: list[tuple[str, bool]] = [(name, False)]
    via_untrusted = False
    current = name
    while True:
        parent, untrusted = parent_of(current, found[current], cfg)
        if parent is None:
            break
        via_untrusted = via_untrusted or untrusted
        if parent in seen:
            loop = " -> ".join([*seen[seen.index(parent) :], parent])
            raise ConfigError(
                f"profile inheritance cycle: {loop}",
                details="defined in: "
                + "; ".join(s.where for n in seen for s in found[n] if s.inherits),
                resolution="Remove one of these 'inherits'.",
            )
        if parent not in found:
            where = "; ".join(s.where for s in found[current] if s.inherits == parent)
            known = ", ".join(sorted(found)) or "none"
            raise ConfigError(
                f"profile '{current}' inherits '{parent}', which is not defined",
                details=f"in {where}",
                resolution=f"Define it or name one of: {known}.",
            )
        seen.append(parent)
        out.append((parent, via_untrusted))
        current = parent
    return list(reversed(out))


def _keeps_current(s: Setting, current: Any, wanted: Any) -> bool:
    """Is what is in force already at least as strict as a built-in profile's value?"""
    from coi.config.untrusted import judge

    if s.trust in ("", "never", "any") or current == wanted:
        return bool(current == wanted)
    return judge(s, current, wanted) is None


def _apply_builtin(cfg: Config, name: str) -> None:
    values, _text = BUILTIN[name]
    for key, wanted in values.items():
        s = BY_KEY.get(key)
        if s is None:
            continue  # a key of a feature this coi does not have
        origin = f"built-in profile {name}"
        cfg.floors.setdefault(key, (wanted, origin))
        if not _keeps_current(s, cfg.values[key], wanted):
            cfg.values[key] = wanted
            cfg.origins[key] = origin
        elif cfg.values[key] == wanted and cfg.origins[key] == "default":
            cfg.origins[key] = origin  # the profile's word now, should the default change


def _apply_file(cfg: Config, name: str, src: Source, untrusted: bool) -> None:
    data = dict(src.data)
    if "profiles" in data:
        data.pop("profiles")
        if untrusted:
            _drop(cfg, "profiles", "", src.where, "no [profiles] inside a profile")
        else:
            raise ConfigError(f"{src.where}: a profile file cannot hold [profiles] tables")
    before = len(cfg.dropped)
    _apply_layer(cfg, data, src.where, untrusted=untrusted)
    for key in [k for k, o in cfg.origins.items() if o == src.where]:
        cfg.origins[key] = f"{src.where} [profile {name}]"
    dropped = cfg.dropped[before:]
    if dropped:
        lines = "".join(f"\n  {d.line()}" for d in dropped)
        what = (
            "is not trusted"
            if src.untrusted
            else "is reached through an 'inherits' of an untrusted file"
        )
        cfg.warnings.append(
            f"profile {name}: {src.where} {what}; these settings from it are dropped:{lines}\n"
            f"  (only settings that tighten the sandbox apply; 'coi trust {src.where}')"
        )


def apply_profile(cfg: Config, name: str, *, cwd: Path, env: Mapping[str, str]) -> None:
    """Apply profile `name` (and what it inherits) over the config files' values.

    :raises ConfigError: no such profile, a cycle, a missing parent, a malformed trusted
        profile file.
    """
    found = discover(cfg, cwd, env)
    links = chain(name, found, cfg)
    cfg.profile_chain = [n for n, _ in links]
    for pname, via_untrusted in links:
        for src in found[pname]:
            untrusted = src.untrusted or via_untrusted
            if src.error:
                cfg.warnings.append(f"profile {pname}: {src.where}: {src.error}: not applied")
            elif src.kind == "built-in":
                _apply_builtin(cfg, pname)
            elif src.kind == "table":
                _apply_table_profile(cfg, pname, untrusted_chain=via_untrusted)
            else:
                _apply_file(cfg, pname, src, untrusted)


def check_floors(cfg: Config) -> None:
    """No value may end up looser than a built-in profile in the chain guarantees.

    :raises UsageError: one does (a flag, a `COI_*` variable or a profile over it).
    """
    for key, (wanted, origin) in cfg.floors.items():
        s = BY_KEY[key]
        current = cfg.values[key]
        if _keeps_current(s, current, wanted):
            continue
        raise UsageError(
            f"{key} = {current!r} ({cfg.origins[key]}) loosens the {origin}, which needs "
            f"{wanted!r}",
            resolution="Drop that setting, or use a profile that does not inherit it.",
        )


def describe(cfg: Config, cwd: Path, env: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every profile for `coi profile list`: where it is defined, what it inherits."""
    out = []
    for name, sources in sorted(discover(cfg, cwd, env).items()):
        parent, _ = parent_of(name, sources, cfg)
        out.append(
            {
                "name": name,
                "inherits": parent,
                "description": BUILTIN[name][1] if name in BUILTIN else "",
                "sources": [
                    {
                        "kind": src.kind,
                        "where": src.where,
                        "trusted": not src.untrusted,
                        **({"trust": src.status} if src.status else {}),
                        **({"error": src.error} if src.error else {}),
                    }
                    for src in sources
                ],
            }
        )
    return out


def from_profile(origin: str) -> bool:
    """Did a profile set this value (its origin names one)?"""
    return "[profile" in origin or origin.startswith("built-in profile")


__all__ = [
    "BUILTIN",
    "HARDENED",
    "Source",
    "apply_profile",
    "chain",
    "check_floors",
    "describe",
    "discover",
    "from_profile",
    "user_dir",
]
