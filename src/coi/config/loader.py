"""Load config layers (defaults, files, profile, env, CLI) into one Config with origins."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coi.config.schema import BY_KEY, PROFILE_KEYS, Setting
from coi.errors import ConfigError

if TYPE_CHECKING:
    from coi.config.trust import FileRead, TrustStore
    from coi.config.untrusted import Dropped

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Workspace config files, relative to the working directory, in the order they apply. They
# are untrusted (coi.config.trust, coi.config.untrusted: imported only when one exists).
WORKSPACE_FILES = (".coi.toml", ".coi/config.toml")
TRUST_ALL_ENV = "COI_TRUST_ALL"


def trust_all(env: Mapping[str, str]) -> bool:
    """Does the environment ask to trust every workspace config file?"""
    return env.get(TRUST_ALL_ENV, "").strip().lower() in _TRUE


def trust_status(store: TrustStore, read: FileRead, env: Mapping[str, str]) -> str:
    """A workspace file's standing: "trust-all", "trusted" (pinned as it is), "changed"
    (pinned with other content) or "untrusted"."""
    pinned = store.pinned(read.path)
    if trust_all(env):
        return "trust-all"
    if pinned == read.sha256:
        return "trusted"
    return "changed" if pinned else "untrusted"


def _drop(cfg: Config, key: str, value: Any, origin: str, reason: str) -> None:
    from coi.config.untrusted import Dropped

    cfg.dropped.append(Dropped(key, value, origin, reason))


@dataclass
class WorkspaceFile:
    """A config file found in the working directory, and whether it is trusted."""

    path: Path
    status: str  # "untrusted", "trusted", "changed", "trust-all" or "unreadable"
    sha256: str = ""
    key: Path | None = None  # its real path: what `coi trust` pins

    @property
    def trusted(self) -> bool:
        return self.status in ("trusted", "trust-all")


@dataclass
class Config:
    """The merged configuration: values by dotted key, and where each came from."""

    values: dict[str, Any]
    origins: dict[str, str]
    # name -> key -> (value, origin, from an untrusted file)
    profiles: dict[str, dict[str, tuple[Any, str, bool]]] = field(default_factory=dict)
    # name -> (`inherits` of a [profiles.NAME] table, origin, from an untrusted file)
    profile_inherits: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    # The profile applied and the ones it inherits, the root first (coi.config.profiles).
    profile_chain: list[str] = field(default_factory=list)
    # Values a built-in profile in the chain guarantees: no later layer may loosen them.
    floors: dict[str, tuple[Any, str]] = field(default_factory=dict)
    files_read: list[Path] = field(default_factory=list)  # the config files applied, in order
    workspace: list[WorkspaceFile] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    # For the user, on stderr, each time config is loaded (the CLI prints them).
    warnings: list[str] = field(default_factory=list)

    def get(self, key: str) -> Any:
        return self.values[key]

    def get_str(self, key: str) -> str:
        return str(self.values[key])

    def get_bool(self, key: str) -> bool:
        return bool(self.values[key])

    def get_int(self, key: str) -> int:
        return int(self.values[key])

    def get_float(self, key: str) -> float:
        return float(self.values[key])

    def get_list(self, key: str) -> list[Any]:
        return list(self.values[key])

    def get_table(self, key: str) -> dict[str, str]:
        return dict(self.values[key])

    def set(self, key: str, value: Any, origin: str) -> None:
        self.values[key] = _coerce(BY_KEY[key], value, origin)
        self.origins[key] = origin


def own_files(env: Mapping[str, str]) -> list[Path]:
    """The user's and the system's config files, which apply before the workspace's."""
    home = Path(env.get("HOME") or Path.home())
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    return [Path("/etc/coi/config.toml"), xdg / "coi" / "config.toml"]


def config_files(cwd: Path, env: Mapping[str, str]) -> list[Path]:
    """Config files in the order they apply (later wins); missing ones are skipped later."""
    files = [*own_files(env), *(cwd / rel for rel in WORKSPACE_FILES)]
    if env.get("COI_CONFIG"):
        files.append(Path(env["COI_CONFIG"]).expanduser())
    return files


def _suggest(key: str, known: list[str]) -> str:
    import difflib  # only for a mistyped key's suggestion

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"Did you mean '{close[0]}'?" if close else "See 'coi config show' for every key."


def _bad(s: Setting, value: Any, origin: str, expected: str) -> ConfigError:
    return ConfigError(
        f"{origin}: '{s.key}' must be {expected}, got {value!r}",
        resolution=f"{s.key}: {s.help}",
    )


def _to_str(s: Setting, v: Any, origin: str) -> Any:
    if "true" in s.choices and (isinstance(v, bool) or str(v).lower() in _TRUE | _FALSE):
        # A key that grew from a switch into a choice keeps taking the switch's values.
        v = "true" if (v if isinstance(v, bool) else str(v).lower() in _TRUE) else "false"
    if not isinstance(v, str):
        raise _bad(s, v, origin, "a string")
    if s.choices and v not in s.choices:
        raise _bad(s, v, origin, "one of " + ", ".join(s.choices))
    return v


def _to_bool(s: Setting, v: Any, origin: str) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE | _FALSE:
        return v.lower() in _TRUE
    raise _bad(s, v, origin, "true or false")


def _to_int(s: Setting, v: Any, origin: str) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    raise _bad(s, v, origin, "a whole number")


def _to_float(s: Setting, v: Any, origin: str) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise _bad(s, v, origin, "a number")


def _to_list(s: Setting, v: Any, origin: str) -> Any:
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad(s, v, origin, "a list of strings")
    return list(v)


def _to_table(s: Setting, v: Any, origin: str) -> Any:
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise _bad(s, v, origin, "a table of string values")
    return dict(v)


def _to_mounts(s: Setting, v: Any, origin: str) -> Any:
    if not isinstance(v, list) or not all(
        isinstance(m, dict) and set(m) == {"host", "container"} for m in v
    ):
        raise _bad(s, v, origin, "a list of tables with exactly 'host' and 'container'")
    return [dict(m) for m in v]


_COERCE = {
    "str": _to_str,
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "list": _to_list,
    "table": _to_table,
    "mounts": _to_mounts,
}


def _coerce(s: Setting, value: Any, origin: str) -> Any:
    return _COERCE[s.kind](s, value, origin)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested tables to dotted keys, stopping at keys the schema knows."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in BY_KEY or not isinstance(v, dict):
            out[key] = v
        else:
            out.update(_flatten(v, key + "."))
    return out


def _read_file(path: Path) -> dict[str, Any]:
    # Imported where a config file exists (3 ms): commands run without one do not pay for it.
    import tomllib

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"failed to load config: {path}: {err}",
            resolution="Fix the TOML syntax in that file.",
        ) from err
    except OSError as err:
        raise ConfigError(f"failed to load config: {path}: {err.strerror}") from err


def _profile_layer(cfg: Config, data: Mapping[str, Any], origin: str, untrusted: bool) -> None:
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        if untrusted:
            _drop(cfg, "profiles", profiles, origin, "not a table")
            return
        raise ConfigError(f"{origin}: [profiles] must be a table of named profiles")
    for name, body in profiles.items():
        if not isinstance(body, dict):
            if untrusted:
                _drop(cfg, f"profiles.{name}", body, origin, "not a table")
                continue
            raise ConfigError(f"{origin}: [profiles.{name}] must be a table")
        if "inherits" in body:
            parent = body["inherits"]
            if isinstance(parent, str):
                cfg.profile_inherits[name] = (parent, origin, untrusted)
            elif untrusted:
                _drop(cfg, f"profiles.{name}.inherits", parent, origin, "not a profile name")
            else:
                raise ConfigError(f"{origin}: profiles.{name}.inherits must be a profile name")
            body = {k: v for k, v in body.items() if k != "inherits"}
        for k, v in _flatten(body).items():
            s = PROFILE_KEYS.get(k)
            if s is None and untrusted:
                _drop(cfg, f"profiles.{name}.{k}", v, origin, "unknown key")
                continue
            if s is None:
                raise ConfigError(
                    f"{origin}: unknown key 'profiles.{name}.{k}'",
                    resolution=_suggest(k, list(PROFILE_KEYS)),
                )
            shown = f"profiles.{name}.{k}"
            value = _coerce_or_drop(cfg, s, v, origin, untrusted, shown)
            if value is _BAD or (untrusted and not _beside(cfg, name, s, value, origin, shown)):
                continue
            cfg.profiles.setdefault(name, {})[s.key] = (value, origin, untrusted)


def _beside(cfg: Config, name: str, s: Setting, value: Any, origin: str, shown: str) -> bool:
    """May an untrusted profile entry replace the one an earlier file gave this profile?
    (It is judged again, against everything in force, when the profile applies.)"""
    from coi.config.untrusted import judge

    earlier = cfg.profiles.get(name, {}).get(s.key)
    if earlier is None:
        return True
    reason = judge(s, value, earlier[0])
    if reason is not None:
        _drop(cfg, shown, value, origin, f"{reason} (the profile from {earlier[1]})")
    return reason is None


_BAD = object()


def _coerce_or_drop(
    cfg: Config, s: Setting, value: Any, origin: str, untrusted: bool, shown: str
) -> Any:
    """The coerced value; from an untrusted file a bad one is dropped (_BAD), not an error."""
    try:
        return _coerce(s, value, origin)
    except ConfigError as err:
        if not untrusted:
            raise
        _drop(cfg, shown, value, origin, err.message.split(": ", 1)[-1])
        return _BAD


def _allowed(cfg: Config, s: Setting, value: Any, origin: str, shown: str) -> bool:
    """May this value from an untrusted file replace (or extend) what is in force?"""
    from coi.config.untrusted import judge

    reason = judge(s, value, cfg.values[s.key])
    if reason is None:
        return True
    _drop(cfg, shown, value, origin, reason)
    return False


def _apply_layer(
    cfg: Config, data: Mapping[str, Any], origin: str, *, untrusted: bool = False
) -> None:
    """Apply one file. From an untrusted file, what would loosen safety (and any unknown or
    malformed key) is dropped and recorded in `cfg.dropped` instead."""
    _profile_layer(cfg, data, origin, untrusted)
    rest = {k: v for k, v in data.items() if k != "profiles"}
    for key, value in _flatten(rest).items():
        s = BY_KEY.get(key)
        if s is None and untrusted:
            _drop(cfg, key, value, origin, "unknown key")
            continue
        if s is None:
            raise ConfigError(
                f"{origin}: unknown key '{key}'", resolution=_suggest(key, list(BY_KEY))
            )
        value = _coerce_or_drop(cfg, s, value, origin, untrusted, key)
        if value is _BAD or (untrusted and not _allowed(cfg, s, value, origin, key)):
            continue
        if s.append and cfg.origins.get(key, "default") != "default":
            value = [*cfg.values[key], *value]
        cfg.values[key] = value
        cfg.origins[key] = origin


def _apply_workspace(cfg: Config, cwd: Path, rel: str, env: Mapping[str, str]) -> None:
    """Read a workspace file once (no links followed), check its pin, apply what it may set."""
    shown = cwd / rel
    if not os.path.lexists(shown):
        return  # the common case: nothing to read, nothing more to import
    from coi.config.trust import TrustStore, Unreadable, read_nofollow

    try:
        read = read_nofollow(cwd, rel)
    except Unreadable as err:
        cfg.workspace.append(WorkspaceFile(shown, "unreadable"))
        cfg.warnings.append(f"{err}: not read (a workspace config file must be a regular file)")
        return
    except OSError as err:
        # The agent can make the file unreadable to coi (root inside, mode 000): a warning,
        # not an error that would stop every later command in this folder.
        cfg.workspace.append(WorkspaceFile(shown, "unreadable"))
        cfg.warnings.append(f"{shown}: not read ({err.strerror})")
        return
    if read is None:
        return
    status = trust_status(TrustStore(env=env), read, env)
    entry = WorkspaceFile(shown, status, read.sha256, read.path)
    cfg.workspace.append(entry)
    cfg.files_read.append(shown)
    import tomllib

    try:
        data = tomllib.loads(read.data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        if entry.trusted:
            raise ConfigError(
                f"failed to load config: {shown}: {err}",
                resolution="Fix the TOML syntax in that file.",
            ) from err
        _drop(cfg, "(whole file)", "", str(shown), f"not valid TOML: {err}")
        return
    _apply_layer(cfg, data, str(shown), untrusted=not entry.trusted)


def _workspace_warnings(cfg: Config, env: Mapping[str, str]) -> None:
    if trust_all(env):
        names = ", ".join(str(w.path) for w in cfg.workspace) or "none found here"
        cfg.warnings.append(
            f"{TRUST_ALL_ENV}=1: every workspace config file is trusted without a check "
            f"({names}); settings in it that weaken the sandbox apply"
        )
    for w in cfg.workspace:
        dropped = [d for d in cfg.dropped if d.file == str(w.path)]
        if w.status == "changed":
            head = f"{w.path} changed since you trusted it, so it is untrusted again"
            hint = f"review the change, then 'coi trust {w.path}' trusts it as it is now"
        else:
            head = f"{w.path} is not trusted"
            hint = f"after reviewing it, 'coi trust {w.path}' applies all of it"
        if dropped:
            lines = "".join(f"\n  {d.line()}" for d in dropped)
            cfg.warnings.append(
                f"{head}; these settings from it are dropped:{lines}\n"
                f"  (a workspace file may only make the sandbox stricter; {hint})"
            )
        elif w.status == "changed":
            cfg.warnings.append(f"{head} (nothing in it needs trust now); {hint}")


def _apply_table_profile(cfg: Config, profile: str, *, untrusted_chain: bool = False) -> None:
    """One [profiles.NAME] table's entries (`untrusted_chain`: reached through an
    `inherits` an untrusted file named, so judged like an untrusted file's)."""
    for key, (value, origin, untrusted) in cfg.profiles.get(profile, {}).items():
        shown = f"profiles.{profile}.{key.removeprefix('defaults.')}"
        if (untrusted or untrusted_chain) and not _allowed(cfg, BY_KEY[key], value, origin, shown):
            continue
        cfg.values[key] = value
        cfg.origins[key] = f"{origin} [profiles.{profile}]"


def load_config(
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    files: list[Path] | None = None,
    profile: str | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults < config files < [profiles.NAME] < COI_* env < CLI flags.

    The workspace files (./.coi.toml, ./.coi/config.toml) are untrusted unless pinned with
    `coi trust`: only what tightens the sandbox applies from them; what is dropped is in
    `Config.dropped`, and `Config.warnings` says so.

    :raises ConfigError: a file is malformed, a key is unknown or a value has the wrong type
        (from an untrusted file such keys are dropped instead).
    """
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    cfg = Config(
        values={k: copy.deepcopy(s.default) for k, s in BY_KEY.items()},
        origins=dict.fromkeys(BY_KEY, "default"),
    )
    _switched_remote(cfg, env)
    workspace = {cwd / rel: rel for rel in WORKSPACE_FILES}
    for path in config_files(cwd, env) if files is None else files:
        if path in workspace:
            _apply_workspace(cfg, cwd, workspace[path], env)
        elif path.is_file():
            cfg.files_read.append(path)
            _apply_layer(cfg, _read_file(path), str(path))
    if profile:
        from coi.config.profiles import apply_profile

        apply_profile(cfg, profile, cwd=cwd, env=env)
    _workspace_warnings(cfg, env)
    for s in BY_KEY.values():
        for var in s.env:
            if env.get(var) not in (None, ""):
                cfg.set(s.key, env[var], f"env {var}")
                break
    for key, value in (cli or {}).items():
        if value is not None:
            cfg.set(key, value, "command line")
    if cfg.floors:
        from coi.config.profiles import check_floors

        check_floors(cfg)
    _remote_project(cfg, env)
    if cfg.origins["incus.claude_uid"] != "default" and cfg.origins["incus.code_uid"] == "default":
        cfg.values["incus.code_uid"] = cfg.values["incus.claude_uid"]
    return cfg


def _switched_remote(cfg: Config, env: Mapping[str, str]) -> None:
    """`coi remote switch NAME` stands just above the defaults: a config file, COI_REMOTE
    and --remote still decide."""
    from coi.backend.connection import remotes_store

    if not remotes_store(env).exists():
        return  # no remote was ever added: not worth importing the remotes code (2 ms)
    from coi.backend.remotes import current

    name = current(env)
    if name:
        cfg.values["incus.remote"] = name
        cfg.origins["incus.remote"] = "coi remote switch"


def _remote_project(cfg: Config, env: Mapping[str, str]) -> None:
    """On a remote, the project recorded with it ('coi remote add --project') unless one was
    asked for; 'local' is the local daemon."""
    remote = cfg.values["incus.remote"]
    if remote == "local":
        cfg.values["incus.remote"] = ""
        return
    if not remote or cfg.origins["incus.project"] != "default":
        return
    from coi.backend.remotes import project_of

    project = project_of(remote, env)
    if project:
        cfg.values["incus.project"] = project
        cfg.origins["incus.project"] = f"remote {remote}"


def judge_file(data: Mapping[str, Any], origin: str, env: Mapping[str, str]) -> list[Dropped]:
    """What an untrusted file would lose next to the user's own config files (for `coi trust`).

    :raises ConfigError: the file is malformed as a trusted file would be.
    """
    cfg = Config(
        values={k: copy.deepcopy(s.default) for k, s in BY_KEY.items()},
        origins=dict.fromkeys(BY_KEY, "default"),
    )
    parent = data.get("inherits")
    if "/.coi/profiles/" in origin and isinstance(parent, str):
        # A profile's own file (coi.config.profiles) names its parent at the top level;
        # trusted, the parent applies in full (untrusted, it only tightens).
        data = {k: v for k, v in data.items() if k != "inherits"}
        if parent != "hardened":
            _drop(cfg, "inherits", parent, origin, "its parent then applies in full")
    for path in own_files(env):
        if path.is_file():
            _apply_layer(cfg, _read_file(path), str(path))
    trusted = copy.deepcopy(cfg)
    _apply_layer(trusted, data, origin)  # raises on what would break a trusted load
    _apply_layer(cfg, data, origin, untrusted=True)
    for name, body in cfg.profiles.items():
        for key, (value, prof_origin, untrusted) in body.items():
            if untrusted:
                shown = f"profiles.{name}.{key.removeprefix('defaults.')}"
                _allowed(cfg, BY_KEY[key], value, prof_origin, shown)
    return cfg.dropped
