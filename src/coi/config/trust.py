"""Workspace config files read safely, and the user's pins of the ones they trust.

The agent controls the workspace: `.coi.toml` may be a symlink to anything, a FIFO, huge, or
rewritten while coi reads it. So a workspace file is opened without following a link at any
step below the working directory, must be a regular file of at most MAX_BYTES, is read once,
and the sha256 of exactly those bytes is what is compared with the pin and what is parsed.

A pin (`coi trust`) is the sha256 of the file's content, keyed by the file's real absolute
path, in `~/.coi/trusted-config.json` (written to a temporary file, then renamed over).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coi.config.loader import TRUST_ALL_ENV, WORKSPACE_FILES, trust_all
from coi.config.paths import coi_home
from coi.errors import ConfigError
from coi.fsio import write_atomic

__all__ = ["TRUST_ALL_ENV", "WORKSPACE_FILES", "FileRead", "TrustStore", "trust_all"]
MAX_BYTES = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class FileRead:
    """One workspace config file as read: its key (real path), bytes and their sha256."""

    path: Path
    data: bytes
    sha256: str


class Unreadable(Exception):
    """The file is there but not something coi reads (a link, not a regular file, too big)."""


def _read_fd(fd: int, shown: str) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable(f"{shown} is not a regular file")
    if st.st_size > MAX_BYTES:
        raise Unreadable(f"{shown} is larger than {MAX_BYTES} bytes")
    data = b""
    while chunk := os.read(fd, MAX_BYTES + 1 - len(data)):
        data += chunk
        if len(data) > MAX_BYTES:
            raise Unreadable(f"{shown} is larger than {MAX_BYTES} bytes")
    return data


def read_nofollow(base: Path, rel: str) -> FileRead | None:
    """Read `base/rel` following no symlink below `base`; None when it does not exist.

    :raises Unreadable: a component is a symlink (or not a directory), or the file is not a
        regular file or is too large.
    """
    real_base = Path(os.path.realpath(base))
    parts = rel.split("/")
    fd = os.open(real_base, _DIR)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nfd = os.open(part, _FILE if last else _DIR, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
                where = base / "/".join(parts[: i + 1])
                try:
                    link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                except OSError:
                    link = False
                raise Unreadable(
                    f"{where} is a symbolic link" if link else f"{where} is not a directory"
                ) from None
            os.close(fd)
            fd = nfd
        data = _read_fd(fd, str(base / rel))
    finally:
        os.close(fd)
    return FileRead(real_base / rel, data, hashlib.sha256(data).hexdigest())


def pin_key(path: Path) -> Path:
    """The trust store's key for a path: its real directory, then its own name (not followed)."""
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / path.name


class TrustStore:
    """The pins: real absolute path -> sha256 of the content the user trusted."""

    def __init__(self, home: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.path = (home or coi_home(env)) / "trusted-config.json"

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot read the trust store {self.path}: {err}",
                resolution="Remove it and trust your workspace files again (coi trust).",
            ) from err
        files = raw.get("files", {}) if isinstance(raw, dict) else {}
        return {str(k): v for k, v in files.items() if isinstance(v, dict)}

    def pinned(self, key: Path) -> str | None:
        entry = self.load().get(str(key))
        return str(entry["sha256"]) if entry and "sha256" in entry else None

    def _write(self, files: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n"
        write_atomic(self.path, body)

    def _locked(self) -> Any:
        from coi.locks import held

        return held(self.path.with_name("trusted-config.lock"))

    def trust(self, read: FileRead) -> None:
        with self._locked():
            files = self.load()
            files[str(read.path)] = {"sha256": read.sha256, "trusted_at": time.time()}
            self._write(files)

    def untrust(self, key: Path) -> bool:
        with self._locked():
            files = self.load()
            if files.pop(str(key), None) is None:
                return False
            self._write(files)
            return True
