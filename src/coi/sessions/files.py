"""Copying files and directory trees in and out of containers, with modes; what a pull brings
out is data only, and it never writes through a symbolic link on the host."""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coi import checkpoint, helpers
from coi.backend.client import IncusClient
from coi.backend.intake import PullReport, check_destination, drop_stale_parts, part_prefix
from coi.errors import BackendError, NotFound, UsageError

Kind = Literal["file", "directory"]


@dataclass(frozen=True)
class Pushed:
    kind: Kind
    local: Path
    container: str
    path: str


@dataclass(frozen=True)
class Pulled:
    """What a pull wrote (`target`), and one warning per entry it left out or changed."""

    kind: Kind
    container: str
    path: str
    target: Path
    warnings: tuple[str, ...] = ()


def check_push_source(local: Path, *, recursive: bool) -> None:
    """:raises NotFound: `local` does not exist. :raises UsageError: a directory without -r."""
    if not local.exists() and not local.is_symlink():
        raise NotFound(f"source does not exist: {local}")
    if local.is_dir() and not recursive:
        raise UsageError("source is a directory, use -r flag")


def push(
    client: IncusClient, local: Path, container: str, path: str, *, uid: int, gid: int
) -> Pushed:
    """Copy a local file or directory tree to `container:path`, creating its parents.

    :raises NotFound: no such container.
    """
    if not client.instances.exists(container):
        raise NotFound(f"container {container} not found")
    parent = posixpath.dirname(path)
    if parent != "/" and client.files.stat(container, parent) is None:
        client.files.mkdir(container, parent, uid=uid, gid=gid, parents=True)
    if local.is_dir():
        client.files.push_tree(container, local, path, uid=uid, gid=gid)
        return Pushed("directory", local, container, path)
    _drop_dead_parts(client, container, path)
    client.files.push_file_whole(container, local, path, uid=uid, gid=gid, part=part_path(path))
    return Pushed("file", local, container, path)


def part_path(path: str, pid: int | None = None) -> str:
    """Where a push of `path` streams its file first (beside it; the pid of the coi pushing)."""
    parent, base = posixpath.split(path)
    return posixpath.join(parent, f".{base}.coi-part-{os.getpid() if pid is None else pid}")


def _drop_dead_parts(client: IncusClient, container: str, path: str) -> None:
    """Remove what pushes of `path` cut short left beside it (their coi is gone)."""
    parent, base = posixpath.split(path)
    prefix = f".{base}.coi-part-"
    try:
        names = client.files.listdir(container, parent or "/")
    except (BackendError, NotFound):
        return
    for name in names:
        pid = name[len(prefix) :] if name.startswith(prefix) else ""
        if pid.isdigit() and helpers.process_start(int(pid)) is None:
            with contextlib.suppress(BackendError):
                client.files.delete(container, posixpath.join(parent, name))


def _trusted() -> tuple[Path, ...]:
    # Links above the current and home folders are the user's own set-up (a home reached
    # through a link); below them, coi follows none.
    return (Path.cwd(), Path.home())


def pull_destination(local: Path) -> Path:
    """`local` made absolute.

    :raises UsageError: it is, or goes through, a symbolic link.
    """
    return check_destination(local, trusted=_trusted())


def pull(client: IncusClient, container: str, path: str, local: Path, *, recursive: bool) -> Pulled:
    """Copy `container:path` (a file, or with `recursive` a directory tree) to `local`, as
    checked by `pull_destination`.

    :raises NotFound: no such container or path.
    :raises UsageError: a directory without `recursive`; a destination through a link.
    """
    if not client.instances.exists(container):
        raise NotFound(f"container {container} not found")
    info = client.files.stat(container, path)
    if info is None:
        raise NotFound(f"source does not exist: {container}:{path}")
    if info.type == "directory":
        if not recursive:
            raise UsageError("source is a directory, use -r flag")
        report = _pull_dir(client, container, path, local)
        return Pulled("directory", container, path, local, tuple(report.warnings()))
    target = local / posixpath.basename(path) if local.is_dir() else local
    target = check_destination(target, trusted=_trusted())
    report = client.files.pull_file(container, path, target)
    return Pulled("file", container, path, target, tuple(report.warnings()))


def _pull_dir(client: IncusClient, name: str, path: str, local: Path) -> PullReport:
    """Pull into a fresh directory beside `local`, then swap it in: a failed pull leaves the
    old `local` untouched, and nothing the container names can land outside it."""
    local.parent.mkdir(parents=True, exist_ok=True)
    drop_stale_parts(local)
    tmp = Path(tempfile.mkdtemp(prefix=part_prefix(local, "pull"), dir=local.parent))
    try:
        report = client.files.pull_tree(name, path, tmp / "tree")
        checkpoint.step("file-pulled")  # all of it beside `local`, not yet swapped in
        if local.is_symlink():  # made meanwhile: replaced, not followed
            local.unlink()
        elif local.is_dir():
            shutil.rmtree(local)
        elif local.exists():
            local.unlink()
        (tmp / "tree").rename(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
