"""Instance files: streamed push of files, directories and symlinks, with modes; pulls that
bring out data only (see `coi.backend.intake`)."""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar
from urllib.parse import quote

from coi.backend.intake import (
    PullReport,
    check_name,
    drop_stale_parts,
    host_mode,
    kind_of,
    new_file,
    part_prefix,
    shown,
)
from coi.backend.sftp import Attrs, SFTPSession, SFTPUnavailable
from coi.errors import BackendError, IncusTimeout, NotFound, UsageError

if TYPE_CHECKING:
    from coi.backend.client import IncusClient

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileInfo:
    """Owner, mode and type of a path inside an instance."""

    uid: int
    gid: int
    mode: int
    type: str  # file, directory, symlink


def _chunks(fh: BinaryIO, progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    # Upload bodies must be streamed: an in-memory `bytes` body makes httpcore's
    # partial-send loop re-slice the buffer, which is quadratic (7 s for 64 MiB).
    sent = 0
    while chunk := fh.read(_CHUNK):
        yield chunk
        sent += len(chunk)
        if progress is not None:
            progress(sent)


class FilesAPI:
    """`/1.0/instances/<name>/files`."""

    def __init__(self, client: IncusClient) -> None:
        self._c = client

    def _url(self, instance: str) -> str:
        return f"/1.0/instances/{quote(instance, safe='')}/files"

    def _post(
        self,
        instance: str,
        path: str,
        content: bytes | Iterator[bytes],
        *,
        uid: int,
        gid: int,
        mode: int,
        kind: str,
        write: str = "overwrite",
    ) -> None:
        """Create or write one path: a file, directory or symlink (the daemon's one POST)."""
        p = self._c.header_prefix
        headers = {
            f"{p}uid": str(uid),
            f"{p}gid": str(gid),
            f"{p}mode": f"{mode:04o}",
            f"{p}type": kind,
            f"{p}write": write,
            "Content-Type": "application/octet-stream",
        }
        self._c.request(
            "POST", self._url(instance), params={"path": path}, content=content, headers=headers
        )

    # -- single objects ------------------------------------------------------------------

    def push_bytes(
        self,
        instance: str,
        path: str,
        data: bytes,
        *,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o644,
        append: bool = False,
    ) -> None:
        """Write small content to a file (for large content use `push_file`)."""
        self._post(
            instance,
            path,
            _chunks(io.BytesIO(data)),
            uid=uid,
            gid=gid,
            mode=mode,
            kind="file",
            write="append" if append else "overwrite",
        )

    def push_file(
        self,
        instance: str,
        local: Path,
        path: str,
        *,
        uid: int = 0,
        gid: int = 0,
        mode: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream a local file into the instance, keeping its mode unless one is given;
        `progress` is told the bytes sent so far."""
        file_mode = stat.S_IMODE(local.stat().st_mode) if mode is None else mode
        with local.open("rb") as fh:
            body = _chunks(fh, progress)
            self._post(instance, path, body, uid=uid, gid=gid, mode=file_mode, kind="file")

    def push_file_whole(
        self,
        instance: str,
        local: Path,
        path: str,
        *,
        uid: int = 0,
        gid: int = 0,
        part: str,
    ) -> None:
        """`push_file`, whole or not at all: streamed to `part` (a path beside `path`), then
        renamed over `path` in one step. A push cut short (coi killed, the connection lost)
        leaves `path` as it was and `part` behind: the daemon writes a file as it receives it.
        Where the daemon has no SFTP (old LXD), written in place.

        :raises SFTPUnavailable: never; falls back as said.
        """
        try:
            sftp = SFTPSession.open(self._c, instance)
        except SFTPUnavailable:
            self.push_file(instance, local, path, uid=uid, gid=gid)
            return
        with sftp:
            self.push_file(instance, local, part, uid=uid, gid=gid)
            try:
                sftp.rename_over(part, path)
            except BackendError:
                with contextlib.suppress(BackendError):
                    self.delete(instance, part)
                raise

    def mkdir(
        self,
        instance: str,
        path: str,
        *,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o755,
        parents: bool = False,
    ) -> None:
        """Create a directory (and, with `parents`, its missing parents)."""
        if parents:
            parent = posixpath.dirname(path.rstrip("/"))
            if parent and parent != "/" and self.stat(instance, parent) is None:
                self.mkdir(instance, parent, uid=uid, gid=gid, mode=mode, parents=True)
        self._post(instance, path, b"", uid=uid, gid=gid, mode=mode, kind="directory")

    def symlink(self, instance: str, path: str, target: str, *, uid: int = 0, gid: int = 0) -> None:
        self._post(instance, path, target.encode(), uid=uid, gid=gid, mode=0o777, kind="symlink")

    def stat(self, instance: str, path: str) -> FileInfo | None:
        """Owner, mode and type of a path, or None when it does not exist."""
        try:
            if self._c.has_extension("instance_file_head"):
                resp = self._c.raw_request("HEAD", self._url(instance), params={"path": path})
            else:
                resp = self._c.raw_request("GET", self._url(instance), params={"path": path})
        except NotFound:
            return None
        return self._info(resp.headers)

    def _info(self, headers: object) -> FileInfo:
        h = {k.lower(): v for k, v in dict(headers).items()}  # type: ignore[call-overload]
        p = self._c.header_prefix.lower()
        return FileInfo(
            uid=int(h.get(f"{p}uid", 0)),
            gid=int(h.get(f"{p}gid", 0)),
            mode=int(h.get(f"{p}mode", "0"), 8),
            type=h.get(f"{p}type", "file"),
        )

    def read(self, instance: str, path: str) -> bytes:
        """Read a whole (small) file."""
        resp = self._c.raw_request("GET", self._url(instance), params={"path": path})
        return resp.content

    def listdir(self, instance: str, path: str) -> list[str]:
        resp = self._c.raw_request("GET", self._url(instance), params={"path": path})
        return [str(x) for x in resp.json().get("metadata") or ()]

    def delete(self, instance: str, path: str) -> None:
        self._c.request("DELETE", self._url(instance), params={"path": path})

    def pull_file(self, instance: str, path: str, local: Path) -> PullReport:
        """Copy a regular file out of the instance to `local`, with its permission bits (never
        setuid, setgid, sticky or world-writable: see `coi.backend.intake`).

        It is written to a new temporary file beside `local` and renamed over it, so a link
        standing at `local` is replaced, never written through.

        :raises UsageError: the path is a link, FIFO, socket or device (nothing is written);
            or `local` is a symbolic link or a directory.
        """
        report = PullReport()
        if local.is_symlink() or local.is_dir():
            what = "a symbolic link" if local.is_symlink() else "a directory"
            raise UsageError(f"destination {local} is {what}; not written through or over")
        with self._source(instance) as src:
            attrs = src.lstat(path)
            kind = kind_of(attrs.mode)
            if kind != "file":
                raise UsageError(
                    f"{instance}:{shown(path)} is a {kind}: only files and directories are "
                    "copied out of a container",
                    details=_link_details(src, path, kind),
                    resolution="Pull the file it names instead (a path to a regular file).",
                )
            drop_stale_parts(local)
            fd, tmp = tempfile.mkstemp(prefix=part_prefix(local, "part"), dir=local.parent)
            try:
                copied = src.copy_file(path, fd)
                if copied is None:
                    raise UsageError(f"{instance}:{shown(path)} stopped being a regular file")
                mode, removed = host_mode(copied, directory=False)
                os.fchmod(fd, mode)
                os.close(fd)
                fd = -1
                os.replace(tmp, local)  # a link put at `local` meanwhile is replaced, too
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                Path(tmp).unlink(missing_ok=True)
                raise
        report.strip(path, removed)
        report.entries = 1
        return report

    def _source(self, instance: str) -> _Source:
        """How to read the instance's files: SFTP (true types and modes) where the daemon has
        it, else the files API (which cannot tell a FIFO or device from an empty file)."""
        try:
            return _SFTPSource(SFTPSession.open(self._c, instance))
        except SFTPUnavailable:
            return _FilesAPISource(self, instance)

    # -- trees ---------------------------------------------------------------------------

    def push_tree(
        self,
        instance: str,
        local: Path,
        path: str,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> int:
        """Copy a local directory tree to `path`; keep modes. Returns the number of entries.

        Owners are `uid`/`gid` when given, else the local owner ids.
        """
        count = 0
        st = local.stat()
        self._ensure_dir(instance, path, st, uid, gid)
        for root, dirs, files in os.walk(local):
            rel = os.path.relpath(root, local)
            remote_root = path if rel == "." else posixpath.join(path, *Path(rel).parts)
            for d in sorted(dirs):
                lp = Path(root) / d
                rp = posixpath.join(remote_root, d)
                lst = lp.lstat()
                if stat.S_ISLNK(lst.st_mode):
                    self.symlink(
                        instance,
                        rp,
                        os.readlink(lp),
                        uid=_id(uid, lst.st_uid),
                        gid=_id(gid, lst.st_gid),
                    )
                    dirs.remove(d)
                else:
                    self._ensure_dir(instance, rp, lst, uid, gid)
                count += 1

            def push(f: str, root: str = root, remote_root: str = remote_root) -> None:
                lp = Path(root) / f
                rp = posixpath.join(remote_root, f)
                lst = lp.lstat()
                if stat.S_ISLNK(lst.st_mode):
                    self.symlink(
                        instance,
                        rp,
                        os.readlink(lp),
                        uid=_id(uid, lst.st_uid),
                        gid=_id(gid, lst.st_gid),
                    )
                elif stat.S_ISREG(lst.st_mode):
                    self.push_file(
                        instance, lp, rp, uid=_id(uid, lst.st_uid), gid=_id(gid, lst.st_gid)
                    )

            _side_by_side(push, sorted(files))
            count += len(files)
        return count

    def _ensure_dir(
        self, instance: str, path: str, st: os.stat_result, uid: int | None, gid: int | None
    ) -> None:
        self.mkdir(
            instance,
            path,
            uid=_id(uid, st.st_uid),
            gid=_id(gid, st.st_gid),
            mode=stat.S_IMODE(st.st_mode),
        )

    def pull_tree(self, instance: str, path: str, local: Path) -> PullReport:
        """Copy a directory tree out of the instance into `local` (created); what comes out is
        data: plain files and directories only, with permission bits only.

        Symbolic links, FIFOs, sockets and device nodes are left out, setuid, setgid, sticky
        and world-writable bits removed; the report names each. A name that is not one plain
        file name is refused, so nothing lands outside `local`. Entries are created new
        (never an existing one, never through a link), so `local` should be a fresh folder.

        :raises UsageError: `path` is no directory, or `local` is a symbolic link.
        """
        if local.is_symlink():
            raise UsageError(f"destination {local} is a symbolic link; not written through")
        report = PullReport()
        with self._source(instance) as src:
            attrs = src.lstat(path)
            if kind_of(attrs.mode) != "directory":
                raise UsageError(
                    f"{instance}:{shown(path)} is a {kind_of(attrs.mode)}, not a directory"
                )
            local.mkdir(parents=True, exist_ok=True)
            if local.is_symlink() or not local.is_dir():
                raise UsageError(f"destination {local} is not a plain directory")
            dir_modes: list[tuple[Path, int]] = []
            mode, removed = host_mode(attrs.mode or 0o700, directory=True)
            report.strip(path, removed)
            dir_modes.append((local, mode))
            todo = [(path, local)]
            while todo:
                rdir, ldir = todo.pop()
                for name, child in sorted(src.listdir(rdir)):
                    check_name(name, f"{instance}:{shown(rdir)}")
                    rpath = posixpath.join(rdir, os.fsdecode(name))
                    lpath = ldir / os.fsdecode(name)
                    kind = kind_of(child.mode)
                    if kind == "directory":
                        os.mkdir(lpath, 0o700)
                        mode, removed = host_mode(child.mode or 0o700, directory=True)
                        dir_modes.append((lpath, mode))
                        todo.append((rpath, lpath))
                    elif kind == "file":
                        fd = new_file(lpath)
                        try:
                            copied = src.copy_file(rpath, fd)
                            if copied is not None:
                                mode, removed = host_mode(copied, directory=False)
                                os.fchmod(fd, mode)
                        finally:
                            os.close(fd)
                        if copied is None:
                            lpath.unlink()
                            report.drop(rpath, "changed into a non-file while copied")
                            continue
                    else:
                        report.drop(rpath, _why(src, rpath, kind))
                        continue
                    report.strip(rpath, removed)
                    report.entries += 1
            # Deepest first, so no directory loses write permission before it is filled.
            for d, m in reversed(dir_modes):
                os.chmod(d, m)
        return report


def _why(src: _Source, path: str, kind: str) -> str:
    if kind != "symbolic link":
        return kind
    return f"symbolic link -> {shown(src.readlink(path))}"


def _link_details(src: _Source, path: str, kind: str) -> str | None:
    return f"It is a {_why(src, path, kind)}." if kind == "symbolic link" else None


class _Source:
    """Reads an instance's entries for a copy out; `mode` is a full st_mode (type bits)."""

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def lstat(self, path: str) -> Attrs:
        raise NotImplementedError

    def listdir(self, path: str) -> list[tuple[bytes, Attrs]]:
        raise NotImplementedError

    def readlink(self, path: str) -> bytes:
        raise NotImplementedError

    def copy_file(self, path: str, fd: int) -> int | None:
        """Copy a regular file's bytes to `fd`; its mode, or None if it is no longer a file."""
        raise NotImplementedError


class _SFTPSource(_Source):
    def __init__(self, session: SFTPSession) -> None:
        self.s = session

    def close(self) -> None:
        self.s.close()

    def lstat(self, path: str) -> Attrs:
        return self.s.lstat(path)

    def listdir(self, path: str) -> list[tuple[bytes, Attrs]]:
        return self.s.listdir(path)

    def readlink(self, path: str) -> bytes:
        return self.s.readlink(path)

    def copy_file(self, path: str, fd: int) -> int | None:
        # Listed as a file, but the agent may have swapped in something else since: what
        # was opened is checked (a FIFO swapped in makes the open itself wait: the session's
        # timeout ends that).
        handle, attrs = self.s.open_read(path)
        try:
            if kind_of(attrs.mode) != "file" or attrs.mode is None:
                return None
            self.s.read_into(handle, path, fd, attrs.size or 0)
            return attrs.mode
        finally:
            self.s.close_handle(handle, path)


_GET_WAIT = 10.0  # seconds a files API GET may stay silent before it is taken for a FIFO


class _FilesAPISource(_Source):
    """The files API: it reports links, but calls every other non-directory a "file" with
    its permission bits only. An empty "file" is not read (a FIFO's read would never end);
    a device node reads as empty (the daemon sends st_size bytes). Without HEAD (an old
    daemon) even a stat opens the entry: one silent for `_GET_WAIT` is left out as a FIFO."""

    def __init__(self, api: FilesAPI, instance: str) -> None:
        self.api = api
        self.instance = instance

    def lstat(self, path: str) -> Attrs:
        c = self.api._c
        head = c.has_extension("instance_file_head")
        try:
            resp = c.raw_request(
                "HEAD" if head else "GET",
                self.api._url(self.instance),
                params={"path": path},
                timeout=None if head else _GET_WAIT,
            )
        except NotFound:
            raise NotFound(f"{self.instance}:{path} does not exist") from None
        except IncusTimeout:
            # Without HEAD, the GET opens the entry, and on a FIFO the daemon never answers.
            if head:
                raise
            return Attrs(stat.S_IFIFO, 0, None, None)
        info = self.api._info(resp.headers)
        fmt = {"directory": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(info.type, stat.S_IFREG)
        size = resp.headers.get("content-length")
        return Attrs(fmt | info.mode, int(size) if size else None, info.uid, info.gid)

    def listdir(self, path: str) -> list[tuple[bytes, Attrs]]:
        out = []
        for n in self.api.listdir(self.instance, path):
            try:
                attrs = self.lstat(posixpath.join(path, n))
            except NotFound:  # gone, or a name the API's JSON could not carry (not UTF-8)
                attrs = Attrs(None, None, None, None)
            out.append((os.fsencode(n), attrs))
        return out

    def readlink(self, path: str) -> bytes:
        return self.api.read(self.instance, path)

    def copy_file(self, path: str, fd: int) -> int | None:
        attrs = self.lstat(path)
        if kind_of(attrs.mode) != "file" or attrs.mode is None:
            return None
        if not attrs.size:
            return attrs.mode
        left = attrs.size
        with self.api._c.stream(self.api._url(self.instance), params={"path": path}) as resp:
            if self.api._info(resp.headers).type != "file":
                return None
            for chunk in resp.iter_bytes(_CHUNK):
                view = memoryview(chunk)[:left]
                while view:
                    view = view[os.write(fd, view) :]
                left -= min(left, len(chunk))
                if not left:
                    break
        return attrs.mode


T = TypeVar("T")


def _side_by_side(fn: Callable[[str], T], items: list[str], workers: int = 4) -> list[T]:
    """`fn` over items on a few threads (the client's connection pool is thread-safe)."""
    if len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _id(explicit: int | None, local: int) -> int:
    return local if explicit is None else explicit
