"""Where the real credential comes from on the host, and OAuth logins: expiry, the refresh
request, and writing refreshed tokens back to the host file (atomically)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coi.config.paths import expand
from coi.credentials.providers import KeyFile, OAuthFile, Provider
from coi.errors import ConfigError

# An access token this close to its expiry (seconds) is refreshed before use: a request
# that takes a while must not carry a token that expires on the way.
REFRESH_SKEW = 60.0
KEY_COMMAND_TIMEOUT = 30.0


@dataclass
class Credential:
    """A real credential, held on the host only. Its repr never shows a secret."""

    kind: str  # "key" (an API key) or "oauth" (an access token, maybe refreshable)
    secret: str = field(repr=False)
    source: str  # where it came from, for messages (never the value)
    refresh_token: str = field(default="", repr=False)
    expires_at: float | None = None  # seconds since the epoch; None: does not expire
    login: OAuthFile | None = None  # how the file is laid out and refreshed
    file: Path | None = None  # the host file refreshed tokens are written back to

    @property
    def refreshable(self) -> bool:
        return self.kind == "oauth" and bool(self.refresh_token) and self.login is not None

    def needs_refresh(self, now: float, skew: float = REFRESH_SKEW) -> bool:
        """Is the access token expired, or about to, and can it be refreshed?"""
        return self.refreshable and self.expires_at is not None and now >= self.expires_at - skew


def _dig(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot read the credential file {path}: {err}",
            resolution="Fix or remove the file, or point [credentials] at another source.",
        ) from err


def read_login(path: Path, login: OAuthFile) -> Credential | None:
    """The OAuth login in `path` (None: no file, or no access token in it)."""
    data = _read_json(path)
    section = _dig(data, login.section)
    if not isinstance(section, dict) or not section.get(login.access):
        return None
    expires = section.get(login.expires)
    expires_at = None
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        expires_at = expires / 1000.0 if login.expires_in_ms else float(expires)
    return Credential(
        kind="oauth",
        secret=str(section[login.access]),
        source=str(path),
        refresh_token=str(section.get(login.refresh) or ""),
        expires_at=expires_at,
        login=login,
        file=path,
    )


def refresh_body(cred: Credential) -> dict[str, str]:
    """The JSON body of the refresh request (the OAuth refresh_token grant)."""
    assert cred.login is not None
    return {
        "grant_type": "refresh_token",
        "refresh_token": cred.refresh_token,
        "client_id": cred.login.client_id,
    }


def apply_refresh(cred: Credential, answer: Mapping[str, Any], now: float) -> None:
    """Take the token endpoint's answer into `cred`.

    :raises ValueError: the answer has no access token.
    """
    access = answer.get("access_token")
    if not isinstance(access, str) or not access:
        raise ValueError("the token endpoint's answer has no access_token")
    cred.secret = access
    rotated = answer.get("refresh_token")
    if isinstance(rotated, str) and rotated:
        cred.refresh_token = rotated
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        cred.expires_at = now + float(expires_in)
    else:
        cred.expires_at = None


def write_login(cred: Credential) -> None:
    """Write the credential's tokens back into its host file, keeping everything else in it:
    a new file beside it (same mode), fsynced, renamed over the old one."""
    assert cred.file is not None and cred.login is not None
    login, path = cred.login, cred.file
    data = _read_json(path)
    if not isinstance(data, dict):
        data = {}
    node = data
    for part in login.section.split("."):
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[login.access] = cred.secret
    node[login.refresh] = cred.refresh_token
    if cred.expires_at is not None:
        node[login.expires] = (
            int(cred.expires_at * 1000) if login.expires_in_ms else int(cred.expires_at)
        )
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def newer_on_disk(cred: Credential) -> bool:
    """Take the login from its file if the file holds a later one (the tool on the host, or
    another session's broker, refreshed it meanwhile): refresh tokens may rotate, so using a
    stale one would fail and could log the user out."""
    if cred.file is None or cred.login is None:
        return False
    disk = read_login(cred.file, cred.login)
    if disk is None or disk.secret == cred.secret:
        return False
    if cred.expires_at is not None and (disk.expires_at or 0) <= cred.expires_at:
        return False
    cred.secret, cred.refresh_token, cred.expires_at = (
        disk.secret,
        disk.refresh_token,
        disk.expires_at,
    )
    return True


def _from_key_file(path: Path) -> Credential:
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise ConfigError(
            f"[credentials] key_file {path}: {err.strerror or err}",
            resolution="Name a readable file holding the key, or remove the entry.",
        ) from err
    if not text:
        raise ConfigError(f"[credentials] key_file {path} is empty")
    return Credential(kind="key", secret=text.splitlines()[0].strip(), source=str(path))


def _from_command(command: str, env: Mapping[str, str]) -> Credential:
    try:
        res = subprocess.run(
            ["/bin/sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=KEY_COMMAND_TIMEOUT,
            env=dict(env),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"[credentials] key_command failed: {err}") from err
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines or not lines[0].strip():
        raise ConfigError(
            f"[credentials] key_command exited {res.returncode} without printing a key",
            details=res.stderr.strip()[-500:] or None,
        )
    return Credential(kind="key", secret=lines[0].strip(), source="[credentials] key_command")


def _from_json_key(home: Path, kf: KeyFile) -> Credential | None:
    path = home / kf.path
    value = _dig(_read_json(path), kf.key)
    if isinstance(value, str) and value.strip():
        return Credential(kind="key", secret=value.strip(), source=f"{path} ({kf.key})")
    return None


def find_credential(
    provider: Provider,
    values: Mapping[str, Any],
    env: Mapping[str, str],
    home: Path,
    *,
    run_command: bool = True,
) -> Credential | None:
    """The provider's real credential, from the first source that has one: [credentials]
    key_command, key_file, oauth_file; the host environment (API key, then OAuth token
    variables); the tools' own key files and login file in `home`. None: nowhere.

    `values` are the config values (`Config.values`). Without `run_command`, a configured
    key_command is not run (it may ask for a passphrase): its credential has no secret.

    :raises ConfigError: a source named in config is broken (a missing file, a failing
        command): an explicit choice is never skipped silently.
    """
    name = provider.name
    command = dict(values.get("credentials.key_command") or {}).get(name)
    if command and not run_command:
        return Credential(kind="key", secret="", source="[credentials] key_command (not run)")
    if command:
        return _from_command(command, env)
    key_file = dict(values.get("credentials.key_file") or {}).get(name)
    if key_file:
        return _from_key_file(expand(key_file, env))
    oauth_file = dict(values.get("credentials.oauth_file") or {}).get(name)
    if oauth_file:
        if provider.oauth_file is None:
            raise ConfigError(f"[credentials] oauth_file: provider {name} has no login format")
        path = expand(oauth_file, env)
        cred = read_login(path, provider.oauth_file)
        if cred is None:
            raise ConfigError(f"[credentials] oauth_file {path} holds no {name} login")
        return cred
    for var in provider.key_env:
        if env.get(var, "").strip():
            return Credential(kind="key", secret=env[var].strip(), source=f"${var}")
    for var in provider.oauth_env:
        if env.get(var, "").strip():
            return Credential(kind="oauth", secret=env[var].strip(), source=f"${var}")
    for kf in provider.key_files:
        found = _from_json_key(home, kf)
        if found:
            return found
    if provider.oauth_file is not None:
        return read_login(home / provider.oauth_file.path, provider.oauth_file)
    return None


def sources_described(provider: Provider) -> str:
    """Where `find_credential` looks, for a message."""
    where = [f"[credentials] key_command/key_file/oauth_file.{provider.name}"]
    where += [f"${v}" for v in (*provider.key_env, *provider.oauth_env)]
    where += [f"~/{kf.path} ({kf.key})" for kf in provider.key_files]
    if provider.oauth_file is not None:
        where.append(f"~/{provider.oauth_file.path}")
    return ", ".join(where)
