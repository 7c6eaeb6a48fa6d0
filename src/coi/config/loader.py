"""Load config layers (defaults, files, profile, env, CLI) into one Config with origins."""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coi.config.schema import BY_KEY, PROFILE_KEYS, Setting
from coi.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class Config:
    """The merged configuration: values by dotted key, and where each came from."""

    values: dict[str, Any]
    origins: dict[str, str]
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

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


def config_files(cwd: Path, env: Mapping[str, str]) -> list[Path]:
    """Config files in the order they apply (later wins); missing ones are skipped later."""
    home = Path(env.get("HOME") or Path.home())
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    files = [Path("/etc/coi/config.toml"), xdg / "coi" / "config.toml", cwd / ".coi.toml"]
    if env.get("COI_CONFIG"):
        files.append(Path(env["COI_CONFIG"]).expanduser())
    return files


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"Did you mean '{close[0]}'?" if close else "See 'coi config show' for every key."


def _bad(s: Setting, value: Any, origin: str, expected: str) -> ConfigError:
    return ConfigError(
        f"{origin}: '{s.key}' must be {expected}, got {value!r}",
        resolution=f"{s.key}: {s.help}",
    )


def _to_str(s: Setting, v: Any, origin: str) -> Any:
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


def _apply_layer(cfg: Config, data: Mapping[str, Any], origin: str) -> None:
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{origin}: [profiles] must be a table of named profiles")
    for name, body in profiles.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: [profiles.{name}] must be a table")
        flat = _flatten(body)
        for k, v in flat.items():
            if k not in PROFILE_KEYS:
                raise ConfigError(
                    f"{origin}: unknown key 'profiles.{name}.{k}'",
                    resolution=_suggest(k, list(PROFILE_KEYS)),
                )
            cfg.profiles.setdefault(name, {})[PROFILE_KEYS[k].key] = (
                _coerce(PROFILE_KEYS[k], v, origin),
                origin,
            )
    rest = {k: v for k, v in data.items() if k != "profiles"}
    for key, value in _flatten(rest).items():
        s = BY_KEY.get(key)
        if s is None:
            raise ConfigError(
                f"{origin}: unknown key '{key}'", resolution=_suggest(key, list(BY_KEY))
            )
        value = _coerce(s, value, origin)
        if s.append and cfg.origins.get(key, "default") != "default":
            value = [*cfg.values[key], *value]
        cfg.values[key] = value
        cfg.origins[key] = origin


def load_config(
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    files: list[Path] | None = None,
    profile: str | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults < config files < [profiles.NAME] < COI_* env < CLI flags.

    :raises ConfigError: a file is malformed, a key is unknown or a value has the wrong type.
    """
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    cfg = Config(
        values={k: copy.deepcopy(s.default) for k, s in BY_KEY.items()},
        origins=dict.fromkeys(BY_KEY, "default"),
    )
    for path in config_files(cwd, env) if files is None else files:
        if path.is_file():
            cfg.files.append(path)
            _apply_layer(cfg, _read_file(path), str(path))
    if profile:
        if profile not in cfg.profiles:
            known = ", ".join(sorted(cfg.profiles)) or "none defined"
            raise ConfigError(
                f"unknown profile '{profile}'", resolution=f"Profiles in your config: {known}."
            )
        for key, (value, origin) in cfg.profiles[profile].items():
            cfg.values[key] = value
            cfg.origins[key] = f"{origin} [profiles.{profile}]"
    for s in BY_KEY.values():
        for var in s.env:
            if env.get(var) not in (None, ""):
                cfg.set(s.key, env[var], f"env {var}")
                break
    for key, value in (cli or {}).items():
        if value is not None:
            cfg.set(key, value, "command line")
    if cfg.origins["incus.claude_uid"] != "default" and cfg.origins["incus.code_uid"] == "default":
        cfg.values["incus.code_uid"] = cfg.values["incus.claude_uid"]
    return cfg
