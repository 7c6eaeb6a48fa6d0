"""Unpacking an archive the agent made (a remote review's work coming back) into a fresh
folder: only files, folders and symbolic links, nothing ever written outside that folder."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from coi.errors import CoiError
from coi.units import size_text as size_text  # sessions.remote imports it from here

_CHUNK = 1 << 20
# Bits a file or folder never gets from the archive: setuid, setgid, sticky, and the group's
# and others' write (unless the same path in the review's base/ had them: see `extract`).
_STRIP = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Unpacked:
    """What an extraction wrote, and what it left out (reason -> how many entries)."""

    files: int = 0
    dirs: int = 0
    links: int = 0
    size: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def skipped_text(self) -> str:
        """'2 FIFOs, sockets or devices, 1 hard link to outside the archive' (or '')."""
        return ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))


class TooBig(CoiError):
    """The archive holds more than the cap allows."""


def safe_parts(name: str) -> tuple[str, ...] | None:
    """The path's components, relative to the folder; None for an absolute name, one with
    '..', or nothing at all (the folder itself is '.')."""
    if name.startswith("/") or "\0" in name:
        return None
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        return None
    return parts


class _Tree:
    """The fresh folder, reached only through folder descriptors opened without following a
    link: a link the archive planted can never be walked through."""

    def __init__(self, root: Path, owner: tuple[int, int] | None) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.owner = owner
        self.made: dict[tuple[str, ...], int] = {}  # folders made here -> their final mode

    def close(self) -> None:
        os.close(self.root_fd)

    @contextlib.contextmanager
    def parent(self, parts: tuple[str, ...]) -> Iterator[int]:
        """The folder holding `parts[-1]`, made (0700) where missing.

        :raises OSError: a component is not a folder made here (a file, a link)."""
        fd = os.dup(self.root_fd)
        try:
            for i, p in enumerate(parts[:-1]):
                try:
                    nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(p, 0o700, dir_fd=fd)
                    self._own(p, fd)
                    self.made.setdefault(parts[: i + 1], 0o700)
                    nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def _own(self, name: str, dir_fd: int) -> None:
        if self.owner is not None:
            os.chown(name, *self.owner, dir_fd=dir_fd, follow_symlinks=False)


def extract(
    archive: Path,
    dest: Path,
    *,
    max_total: int | None,
    owner: tuple[int, int] | None = None,
    base: Path | None = None,
) -> Unpacked:
    """Unpack `archive` (written by the adversary) into the empty folder `dest`.

    Kept: regular files (their data, permission bits without setuid/setgid/sticky and
    group/other write, their mtime), folders, symbolic links as links (never followed: a
    file under a link is left out). A hard link becomes a copy of the file it names when that
    file is earlier in the archive, else it is left out. Left out, counted: FIFOs, sockets,
    devices, names that are absolute or hold '..', a second entry for a name. Everything is
    owned by `owner` (uid, gid) when given (coi runs as root), else by whoever runs this.
    `base`: the review's starting state; a path there with group/other write keeps them.

    :raises TooBig: the files' data exceed `max_total` bytes (what was written stays in
        `dest`, which the caller removes).
    :raises CoiError: the archive is not a tar file.
    """
    out = Unpacked()
    tree = _Tree(dest, owner)
    try:
        # Seekable mode: a hard link's data is read from the member it names, in the archive.
        with tarfile.open(archive, "r:") as tar:
            for ti in tar:
                _one(tar, ti, tree, out, max_total, base)
            _settle_dirs(tree)
    except tarfile.TarError as err:
        raise CoiError(
            "the archive of the sandbox's workspace is not a readable tar file",
            details=str(err),
        ) from err
    finally:
        tree.close()
    return out


def _base_mode(base: Path | None, parts: tuple[str, ...]) -> int:
    if base is None:
        return 0
    try:
        return os.lstat(base.joinpath(*parts)).st_mode
    except (OSError, ValueError):
        return 0


def _mode(ti: tarfile.TarInfo, base: Path | None, parts: tuple[str, ...]) -> int:
    kept = stat.S_IMODE(ti.mode) & ~_STRIP
    return kept | (stat.S_IMODE(ti.mode) & _base_mode(base, parts) & 0o022)


def _one(
    tar: tarfile.TarFile,
    ti: tarfile.TarInfo,
    tree: _Tree,
    out: Unpacked,
    max_total: int | None,
    base: Path | None,
) -> None:
    parts = safe_parts(ti.name)
    if parts is None:
        out.skipped["absolute or '..' names"] += 1
        return
    if not parts:
        return  # the folder itself: it keeps the mode the caller gives it
    if not (ti.isreg() or ti.isdir() or ti.issym() or ti.islnk()):
        out.skipped["FIFOs, sockets or devices"] += 1
        return
    try:
        with tree.parent(parts) as fd:
            name = parts[-1]
            if ti.isdir():
                _dir(tree, fd, name, parts, _mode(ti, base, parts), out)
            elif ti.issym():
                os.symlink(ti.linkname, name, dir_fd=fd)
                tree._own(name, fd)
                out.links += 1
            else:
                _file(tar, ti, tree, fd, name, parts, out, max_total, base)
    except FileExistsError:
        out.skipped["second entries for one name"] += 1
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        # A component is a link or a file: never walked through.
        out.skipped["under a link or a file"] += 1


def _dir(tree: _Tree, fd: int, name: str, parts: tuple[str, ...], mode: int, out: Unpacked) -> None:
    if parts in tree.made:
        tree.made[parts] = mode  # made for an earlier entry inside it: its mode now
        return
    os.mkdir(name, 0o700, dir_fd=fd)  # FileExistsError: a second entry
    tree._own(name, fd)
    tree.made[parts] = mode
    out.dirs += 1


def _file(
    tar: tarfile.TarFile,
    ti: tarfile.TarInfo,
    tree: _Tree,
    fd: int,
    name: str,
    parts: tuple[str, ...],
    out: Unpacked,
    max_total: int | None,
    base: Path | None,
) -> None:
    src = ti
    if ti.islnk():
        # Only a member of this archive, a regular file before this one: its data is copied.
        target = safe_parts(ti.linkname)
        found = None
        if target:
            with contextlib.suppress(KeyError):
                found = tar.getmember("/".join(target))
            if found is None:
                with contextlib.suppress(KeyError):
                    found = tar.getmember("./" + "/".join(target))
        if found is None or not found.isreg() or found.offset >= ti.offset:
            out.skipped["hard links to nothing earlier in the archive"] += 1
            return
        src = found
    data = tar.extractfile(src)
    if data is None:
        out.skipped["FIFOs, sockets or devices"] += 1
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    wfd = os.open(name, flags, 0o600, dir_fd=fd)
    try:
        while chunk := data.read(_CHUNK):
            out.size += len(chunk)
            if max_total is not None and out.size > max_total:
                raise TooBig(
                    f"the sandbox's workspace holds more than {size_text(max_total)} of files",
                    resolution="Raise review.max_file_size (the cap is 100 times it), or "
                    "remove large files in the sandbox and fetch again.",
                )
            view = memoryview(chunk)
            while view:
                view = view[os.write(wfd, view) :]
        if tree.owner is not None:
            os.fchown(wfd, *tree.owner)
        os.fchmod(wfd, _mode(src, base, parts))
        with contextlib.suppress(OverflowError, OSError):
            os.utime(wfd, ns=(int(src.mtime * 1e9), int(src.mtime * 1e9)))
    finally:
        os.close(wfd)
    out.files += 1


def _settle_dirs(tree: _Tree) -> None:
    """Each folder's mode from the archive, deepest first (0700 until then, so that every
    entry inside could be written)."""
    for parts in sorted(tree.made, key=len, reverse=True):
        fd = os.dup(tree.root_fd)
        try:
            for p in parts:
                nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
            os.fchmod(fd, tree.made[parts] | stat.S_IRWXU)
        except OSError:
            pass
        finally:
            os.close(fd)
