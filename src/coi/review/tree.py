"""Reading and writing inside a folder the agent wrote: by folder descriptor, never following
a symbolic link, never opening anything but a regular file (a FIFO would block)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

# Every open goes through these: O_NOFOLLOW refuses a symlink as the last component,
# O_NONBLOCK keeps a FIFO from blocking the open (it is then refused by fstat).
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CHUNK = 1 << 20


class Unsafe(Exception):
    """A path that is not a plain file or folder where one was expected (the reason)."""


@dataclass(frozen=True)
class Entry:
    """One thing found in a tree, from lstat: never followed."""

    kind: str  # file, dir, symlink, fifo, socket, device, other
    mode: int
    size: int
    target: str = ""  # a symlink's text (read, never followed)
    mtime_ns: int = field(default=0, compare=False)
    # Which file, and when its content or metadata last changed: ctime is set by the kernel
    # on every change and cannot be set back by anyone without the host's clock.
    ino: int = field(default=0, compare=False)
    ctime_ns: int = field(default=0, compare=False)

    def stamp(self) -> list[int]:
        """What says a file is the one copied, untouched since (coi.review.copy's index)."""
        return [self.ino, self.ctime_ns, self.mtime_ns, self.size, self.mode]


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "other"


def open_root(root: str) -> int:
    """A descriptor of `root` itself (which must be a real folder, not a link to one)."""
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as err:
        raise Unsafe(f"{root}: not a folder ({err.strerror})") from None


# Deeper folders are not descended (each level holds a descriptor and a stack frame): the
# folder is reported as kind "deep" instead, and refused.
MAX_DEPTH = 128


def walk(root: str) -> dict[str, Entry]:
    """Every entry under `root`, relative path -> Entry; only real folders are descended."""
    out: dict[str, Entry] = {}
    fd = open_root(root)
    try:
        _walk(fd, "", out, 0)
    finally:
        os.close(fd)
    return out


def walk_under(root: str, rel: str) -> dict[str, Entry]:
    """walk() of the folder `rel` under `root`, reached one real folder at a time, never
    through a link ({} when it is missing or not a real folder)."""
    try:
        with parent_fd(root, f"{rel}/.") as fd:
            mine = os.dup(fd)
    except Unsafe:
        return {}
    out: dict[str, Entry] = {}
    try:
        _walk(mine, "", out, 0)
    finally:
        os.close(mine)
    return out


def _walk(dfd: int, prefix: str, out: dict[str, Entry], depth: int) -> None:
    with os.scandir(dfd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        rel = f"{prefix}{name}"
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # went away while we looked
        kind = kind_of(st.st_mode)
        target = ""
        if kind == "symlink":
            with contextlib.suppress(OSError):
                target = os.readlink(name, dir_fd=dfd)
        out[rel] = Entry(
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_size,
            target,
            st.st_mtime_ns,
            st.st_ino,
            st.st_ctime_ns,
        )
        if kind == "dir" and depth >= MAX_DEPTH:
            out[rel] = Entry("deep", stat.S_IMODE(st.st_mode), 0)
        elif kind == "dir":
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError:
                continue  # unreadable or swapped for a link meanwhile: nothing under it
            try:
                _walk(sub, rel + "/", out, depth + 1)
            finally:
                os.close(sub)


@contextlib.contextmanager
def parent_fd(root: str, rel: str, *, create: bool = False) -> Iterator[int]:
    """A descriptor of the folder holding `rel`, reached one real folder at a time.

    :raises Unsafe: a component on the way is a symlink or not a folder (or is missing and
        `create` is false).
    """
    parts = rel.split("/")
    fd = open_root(root)
    try:
        for i, part in enumerate(parts[:-1]):
            if part in ("", ".", ".."):
                raise Unsafe(f"{rel}: not a plain relative path")
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise Unsafe(f"{'/'.join(parts[: i + 1])}: missing") from None
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                _owned_like_parent(nxt, fd)
            except OSError as err:
                where = "/".join(parts[: i + 1])
                raise Unsafe(f"{where} is not a real folder ({err.strerror})") from None
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def lstat_at(root: str, rel: str) -> Entry | None:
    """What `rel` is (None when absent), without following anything.

    :raises Unsafe: a folder on the way is a symlink or not a folder.
    """
    try:
        with parent_fd(root, rel) as dfd:
            try:
                st = os.stat(rel.rsplit("/", 1)[-1], dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return None
    except Unsafe as err:
        if str(err).endswith(": missing"):
            return None
        raise
    return Entry(kind_of(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, "", st.st_mtime_ns)


def open_file(root: str, rel: str) -> int:
    """A read descriptor of the regular file `rel` (the caller closes it).

    :raises Unsafe: it is not a regular file, or is reached through a symlink.
    """
    with parent_fd(root, rel) as dfd:
        try:
            fd = os.open(rel.rsplit("/", 1)[-1], _FILE_FLAGS, dir_fd=dfd)
        except OSError as err:
            raise Unsafe(f"{rel}: cannot open as a plain file ({err.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Unsafe(f"{rel}: not a plain file ({kind_of(st.st_mode)})")
    return fd


def same_content(root_a: str, root_b: str, rel: str) -> bool:
    """Do two regular files hold the same bytes? Streamed: no size cap, little memory."""
    fa = open_file(root_a, rel)
    try:
        fb = open_file(root_b, rel)
        try:
            if os.fstat(fa).st_size != os.fstat(fb).st_size:
                return False
            while True:
                ca, cb = os.read(fa, CHUNK), os.read(fb, CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def read_file(root: str, rel: str, limit: int) -> bytes:
    """The content of the regular file `rel` (at most `limit` bytes, else refused).

    :raises Unsafe: it is not a regular file, is reached through a symlink, or is too big.
    """
    fd = open_file(root, rel)
    try:
        st = os.fstat(fd)
        if limit and st.st_size > limit:
            raise Unsafe(f"{rel}: larger than the {limit}-byte cap")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, CHUNK):
            total += len(chunk)
            if limit and total > limit:  # grew while read
                raise Unsafe(f"{rel}: larger than the {limit}-byte cap")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _owned_like_parent(fd: int, parent: int) -> None:
    """As root (`sudo coi apply`), what coi makes in your folder is owned like the folder
    it is made in, never by root."""
    if os.geteuid() == 0:
        st = os.fstat(parent)
        os.fchown(fd, st.st_uid, st.st_gid)


def write_file(root: str, rel: str, data: bytes, mode: int) -> None:
    """Put `data` at `rel` under `root`: a temporary file in the same real folder, flushed,
    then renamed over the name (a symlink standing there is replaced, never written
    through). Missing folders are made; a symlink on the way is refused."""
    name = rel.rsplit("/", 1)[-1]
    with parent_fd(root, rel, create=True) as dfd:
        tmp = f".coi-apply-{os.getpid()}-{secrets.token_hex(4)}.tmp"  # short: any name fits
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            try:
                _owned_like_parent(fd, dfd)
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        with contextlib.suppress(OSError):
            os.fsync(dfd)


def remove_file(root: str, rel: str) -> None:
    """Unlink `rel` (the name itself, never what a link points at)."""
    with parent_fd(root, rel) as dfd:
        os.unlink(rel.rsplit("/", 1)[-1], dir_fd=dfd)


def remove_empty_dir(root: str, rel: str) -> bool:
    """rmdir `rel` when it is an empty real folder; False otherwise."""
    try:
        with parent_fd(root, rel) as dfd:
            os.rmdir(rel.rsplit("/", 1)[-1], dir_fd=dfd)
    except (OSError, Unsafe):
        return False
    return True
