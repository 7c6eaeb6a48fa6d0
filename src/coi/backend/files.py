"""Instance files: streamed push and pull of files, directories and symlinks, with modes."""

from __future__ import annotations

import io
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar
from urllib.parse import quote

from coi.errors import BackendError, NotFound

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


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    # Upload bodies must be streamed: an in-memory `bytes` body makes httpcore's
    # partial-send loop re-slice the buffer, which is quadratic (7 s for 64 MiB).
    while chunk := fh.read(_CHUNK):
        yield chunk


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
    ) -> None:
        """Stream a local file into the instance, keeping its mode unless one is given."""
        file_mode = stat.S_IMODE(local.stat().st_mode) if mode is None else mode
        with local.open("rb") as fh:
            self._post(instance, path, _chunks(fh), uid=uid, gid=gid, mode=file_mode, kind="file")

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

    def pull_file(self, instance: str, path: str, local: Path) -> FileInfo:
        """Stream a file out of the instance to `local`, with its mode."""
        # Streamed so big files never sit in memory.
        with self._c.stream(self._url(instance), params={"path": path}) as resp:
            info = self._info(resp.headers)
            if info.type == "symlink":
                target = resp.read().decode()
                # The daemon reports a relative link as an absolute path; inside the pulled
                # tree it must stay relative or it would point at the host's filesystem.
                parent = posixpath.dirname(path.rstrip("/"))
                if target.startswith(parent + "/"):
                    target = posixpath.relpath(target, parent)
                if local.is_symlink() or local.exists():
                    local.unlink()
                local.symlink_to(target)
                return info
            if info.type == "directory":
                return info
            tmp = local.with_name(local.name + ".coi-part")
            with tmp.open("wb") as fh:
                for chunk in resp.iter_bytes(_CHUNK):
                    fh.write(chunk)
            os.chmod(tmp, info.mode)
            tmp.replace(local)
        return info

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

    def pull_tree(self, instance: str, path: str, local: Path) -> int:
        """Copy a directory tree out of the instance into `local` (created). Returns entries.

        `local` should be a fresh directory: the container decides the names in it, and a
        name that is not a plain file name is refused so nothing lands outside `local`.
        """
        count = 0
        info = self.stat(instance, path)
        if info is None:
            raise NotFound(f"{instance}:{path} does not exist")
        local.mkdir(parents=True, exist_ok=True)
        names = self.listdir(instance, path)
        for name in names:
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                raise BackendError(f"refusing unsafe file name {name!r} in {instance}:{path}")

        def pull(name: str) -> FileInfo:
            return self.pull_file(instance, posixpath.join(path, name), local / name)

        # A directory's entries travel side by side: one request each, so latency dominates.
        for name, child in zip(names, _side_by_side(pull, names), strict=True):
            if child.type == "directory":
                count += self.pull_tree(instance, posixpath.join(path, name), local / name)
            count += 1
        os.chmod(local, info.mode)
        return count


T = TypeVar("T")


def _side_by_side(fn: Callable[[str], T], items: list[str], workers: int = 4) -> list[T]:
    """`fn` over items on a few threads (the client's connection pool is thread-safe)."""
    if len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _id(explicit: int | None, local: int) -> int:
    return local if explicit is None else explicit
