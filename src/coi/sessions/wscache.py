"""The workspace's cache on a remote daemon: a custom volume per workspace holding the files
last uploaded, and coi's own record of them, so that a later session sends only what changed.

How a remote session gets its workspace with a cache (issue 29):

1. The workspace is scanned here (the same entries `pack` would send: masked paths, their
   other hard links, sockets, FIFOs and devices left out; links never followed).
2. coi's manifest of the cache (in coi's state folder, 0600: what was sent last time, with
   the cache's generation token) is compared with the scan: the delta is the files and links
   that are new or changed, every folder (cheap, and it carries modes), and the paths to
   delete. The manifest is this machine's: nothing read back from the remote decides what is
   sent (only whether the cache is still the one the manifest describes).
3. The cache volume is attached to the new sandbox at a root-only path, before anything of
   the agent runs there (the sandbox was just made from the image; its command starts after
   this), the delta is applied to it, it is copied to the workspace folder (owned by the agent,
   in the sandbox's own disk, so it goes with the sandbox), and it is detached. The agent never
   sees the cache: what it writes stays in its sandbox and never reaches the next session.

A cache that is missing, or whose generation token is not the manifest's (a session that
failed halfway, another machine's coi), gets the whole workspace again, and the session says
so. A server without the storage API extensions gets today's whole upload with no cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import os
import secrets
import socket
import stat
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from coi.config.paths import coi_home
from coi.errors import SessionError
from coi.fsio import write_atomic
from coi.review.tree import kind_of

if TYPE_CHECKING:
    from coi.backend.client import IncusClient

# The cache volumes' names: the prefix, then a hash of the machine, the user and the folder.
PREFIX = "coi-ws-"
# Where the cache is attached in a sandbox while coi fills the workspace from it (root's).
MOUNT = "/root/.coi-wscache"
DEVICE = "coi-wscache"
# The volume's config key naming whose cache it is (`coi clean --workspace-caches`).
OWNER_KEY = "user.coi.wscache.owner"
WORKSPACE_KEY = "user.coi.wscache.workspace"
PROJECT_KEY = "user.coi.wscache.project"
# What the cache needs of the server: custom volumes in projects, attached as disks.
EXTENSIONS = ("storage", "storage_api_project")
MANIFEST_VERSION = 2  # 2: links are "symlink", as coi.review.tree names them

# What a sandbox gets of a workspace; sockets, FIFOs and devices are never copied.
SENT = ("file", "dir", "symlink")
# One entry of the workspace: kind (one of SENT), mode, size, mtime_ns, ctime_ns,
# inode, link target. ctime moves with any change of content or metadata and nobody can set it
# back, so a file rewritten with its old size and mtime restored is still seen as changed.
Sig = tuple[str, int, int, int, int, int, str]


def _secret_inodes(
    root: Path, masked_files: frozenset[str], masked_dirs: tuple[str, ...]
) -> set[tuple[int, int]]:
    """The masked files' inodes that have other names: those names hold the same secret."""
    secret: set[tuple[int, int]] = set()
    for rel in masked_files:
        with contextlib.suppress(OSError):
            st = os.lstat(root / rel)
            if st.st_nlink > 1:
                secret.add((st.st_dev, st.st_ino))
    for d in masked_dirs:
        for sub, _dirs, names in os.walk(root / d.rstrip("/")):
            for n in names:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(sub, n))
                    if st.st_nlink > 1:
                        secret.add((st.st_dev, st.st_ino))

    return secret


def scan(
    root: Path,
    *,
    masked_files: frozenset[str] = frozenset(),
    masked_dirs: tuple[str, ...] = (),
) -> dict[str, Sig]:
    """Every entry of `root` a remote sandbox gets, in the order a tar of it needs (each
    folder's entries sorted, a folder before what it holds): relative path -> Sig.

    Left out: the masked files and folders (`masked_dirs` end with '/'), any other hard link
    to a masked file (the same secret under another name), sockets, FIFOs and devices.
    Symbolic links are entries, never followed."""
    secret = _secret_inodes(root, masked_files, masked_dirs)
    out: dict[str, Sig] = {}

    def walk(rel_dir: str) -> None:
        folder = root / rel_dir if rel_dir else root
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return  # gone or unreadable: the tar would fail on it the same way
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rel in masked_files or any((rel + "/").startswith(d) for d in masked_dirs):
                continue
            try:
                st = os.lstat(folder / name)
            except OSError:
                continue
            kind = kind_of(st.st_mode)
            if kind not in SENT:
                continue
            if kind == "file" and secret and (st.st_dev, st.st_ino) in secret:
                continue
            target = ""
            if kind == "symlink":
                try:
                    target = os.readlink(folder / name)
                except OSError:
                    continue
            out[rel] = (
                kind,
                st.st_mode,
                st.st_size if kind == "file" else 0,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                target,
            )
            if kind == "dir":
                walk(rel)

    walk("")
    return out


@dataclasses.dataclass(frozen=True)
class Delta:
    """What a session sends: `send` (in tar order: the folders, files and links that are new
    or changed) and `delete` (paths to remove from the cache first, deepest first: gone,
    changed kind, or re-sent files and links)."""

    send: list[str]
    delete: list[str]
    changed: int  # files and links sent
    removed: int  # entries gone from the workspace


def same(old: Sig, new: Sig, *, strict: bool) -> bool:
    """Whether an entry is as it was sent. `strict` also compares ctime and inode (a scan of
    the same folder); a fresh copy of the folder (a review's) has new ones for every file, so
    there the kind, mode, size, mtime and link target decide (rsync's quick check)."""
    if strict:
        return old == new
    return old[:4] == new[:4] and old[6] == new[6]


def delta(old: Mapping[str, Sig] | None, new: Mapping[str, Sig], *, strict: bool) -> Delta:
    """The delta from what the cache holds (`old`; None: nothing, send everything) to `new`."""
    if old is None:
        files = sum(1 for s in new.values() if s[0] != "dir")
        return Delta(list(new), [], files, 0)
    send: list[str] = []
    delete: set[str] = set()
    changed = 0
    for rel, sig in new.items():
        before = old.get(rel)
        if sig[0] == "dir":
            # A folder's header (1.5 kB with its mtime) only when it is new or changed: its
            # mtime moves when entries come or go, and the header sets it back as it is here.
            if before is None or not same(before, sig, strict=strict):
                send.append(rel)
            if before is not None and before[0] != "dir":
                delete.add(rel)  # a file or link became a folder
            continue
        if before is not None and same(before, sig, strict=strict):
            continue
        send.append(rel)
        changed += 1
        if before is not None:
            delete.add(rel)  # removed first: tar never writes through what was there
    gone = [rel for rel in old if rel not in new]
    delete.update(gone)
    # Deepest first, so a folder's entries go before it (rm -rf would do, this is tidier).
    ordered = sorted(delete, key=lambda p: (-p.count("/"), p))
    return Delta(send, ordered, changed, len(gone))


def write_tar(root: Path, names: list[str], out: Path, uid: int) -> tuple[list[str], int]:
    """A tar of `names` (relative to `root`, in that order) owned by `uid`: links as links,
    a second name of a file already in this archive as a hard link to it. Returns the names
    written (an entry gone or turned into a special file since the scan is left out) and the
    bytes of file data."""
    written: list[str] = []
    size = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in names:
            path = str(root / rel)
            try:
                st = os.lstat(path)
            except OSError:
                continue  # gone since the scan: left out
            if stat.S_ISREG(st.st_mode):
                try:
                    fh = open(path, "rb", opener=_nofollow)  # noqa: SIM115
                except OSError:
                    continue  # gone, or a link now: left out
                with fh:
                    if os.fstat(fh.fileno()).st_ino != st.st_ino:
                        continue  # swapped for another since it was looked at
                    ti = tar.gettarinfo(arcname=f"./{rel}", fileobj=fh)
                    _own(ti, uid)
                    if ti.isreg():
                        tar.addfile(ti, _Exactly(fh, ti.size))
                        size += ti.size
                    else:
                        tar.addfile(ti)  # a second name of a file already in the archive
            else:
                try:
                    ti = tar.gettarinfo(path, arcname=f"./{rel}")
                except OSError:
                    continue
                if not (ti.isdir() or ti.issym()):
                    continue  # sockets, FIFOs, devices
                _own(ti, uid)
                tar.addfile(ti)
            written.append(rel)
    return written, size


def _own(ti: tarfile.TarInfo, uid: int) -> None:
    ti.uid = ti.gid = uid
    ti.uname = ti.gname = ""


class _Exactly:
    """A file read as `size` bytes whatever happens to it meanwhile: one shrinking while it
    is sent is padded with zeros (its ctime moved, so the next session sends it again), so the
    archive stays whole; tarfile reads no further than `size`."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.left = fh, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        if len(data) < n:
            data += b"\0" * (n - len(data))
        self.left -= n
        return data


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


# -- the manifest (this machine's record of the cache) ----------------------------------------


def owner() -> str:
    """Whose caches these are: the user and the machine (two machines' caches never mix)."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def volume_name(workspace: str, project: str, member: str = "") -> str:
    """The cache's volume: per machine, user, workspace and project (projects without
    volumes of their own all keep theirs in the default project), and on a cluster per member
    (a pool of the member's own disk: a sandbox attaches volumes of its member only)."""
    text = f"{owner()}\n{project}\n{workspace}" + (f"\n{member}" if member else "")
    return PREFIX + hashlib.sha256(text.encode()).hexdigest()[:20]


def manifests_dir(env: Mapping[str, str] | None = None) -> Path:
    return coi_home(env) / "remote-workspaces"


def manifest_path(url: str, project: str, workspace: str, member: str = "") -> Path:
    text = f"{url}\n{project}\n{workspace}" + (f"\n{member}" if member else "")
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    return manifests_dir() / f"{key}.json"


@dataclasses.dataclass
class Manifest:
    """What the cache volume holds, as coi sent it."""

    url: str
    project: str
    workspace: str
    volume: str
    generation: str
    root: str  # the folder scanned (the workspace, or a review's copy of it)
    entries: dict[str, Sig]


def load_manifest(path: Path) -> Manifest | None:
    """The manifest at `path`; None when missing or unreadable (a whole upload follows)."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != MANIFEST_VERSION:
            return None
        entries = {
            str(k): (str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]), str(v[6]))
            for k, v in data["entries"].items()
        }
        return Manifest(
            url=str(data["url"]),
            project=str(data["project"]),
            workspace=str(data["workspace"]),
            volume=str(data["volume"]),
            generation=str(data["generation"]),
            root=str(data["root"]),
            entries=entries,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def save_manifest(path: Path, m: Manifest) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"version": MANIFEST_VERSION, **dataclasses.asdict(m)}
    write_atomic(path, json.dumps(data, separators=(",", ":")).encode(), mode=0o600)


def new_generation() -> str:
    return secrets.token_hex(16)


# -- the volume on the server -------------------------------------------------------------------


def supported(client: IncusClient) -> bool:
    """Whether the server has what the cache needs (its API extensions, never its version)."""
    return all(client.has_extension(e) for e in EXTENSIONS)


def ensure_volume(
    client: IncusClient, pool: str, name: str, workspace: str, member: str = ""
) -> bool:
    """Make the cache volume when missing (on a cluster, on `member`); True when it was made
    (it is empty).

    :raises BackendError: the server would not make it."""
    from coi.errors import Conflict, NotFound

    path = f"/1.0/storage-pools/{_q(pool)}/volumes/custom"
    where = {"target": member} if member else None
    try:
        client.request("GET", f"{path}/{_q(name)}", params=where)
        return False
    except NotFound:
        pass
    body = {
        "name": name,
        "type": "custom",
        "content_type": "filesystem",
        "description": f"coi: cache of the workspace {owner()}:{workspace} for remote sessions "
        "(coi clean --workspace-caches)",
        "config": {OWNER_KEY: owner(), WORKSPACE_KEY: workspace, PROJECT_KEY: client.project},
    }
    try:
        client.request("POST", path, params=where, json=body)
    except Conflict:
        return False  # made meanwhile by another session: its generation decides
    return True


def _q(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


@contextlib.contextmanager
def attached(client: IncusClient, instance: str, pool: str, volume: str) -> Iterator[None]:
    """The cache attached to `instance` at MOUNT for the block, detached after whatever
    happens (the agent's command starts only after this)."""
    from coi.errors import BackendError

    client.instances.add_device(
        instance, DEVICE, {"type": "disk", "pool": pool, "source": volume, "path": MOUNT}
    )
    try:
        yield
    finally:
        try:
            client.instances.remove_device(instance, DEVICE)
        except BackendError as err:
            raise NotDetached(
                f"could not detach the workspace's cache from {instance}",
                details=err.message,
                resolution="The session does not start with it attached; try again.",
            ) from err


class NotDetached(SessionError):
    """The cache is still attached to the sandbox: the agent must not start there."""


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """One cache volume of this user on the server (`coi clean --workspace-caches`)."""

    name: str
    workspace: str
    used_by: list[str]
    member: str = ""  # the cluster member whose disk holds it ('' off a cluster)


def list_caches(client: IncusClient, pool: str) -> list[CacheInfo]:
    """This user's (and this machine's) cache volumes on `pool` for the client's project (kept
    in it, or in the default project where the project has no volumes of its own)."""
    from coi.errors import NotFound

    try:
        vols = client.get(f"/1.0/storage-pools/{_q(pool)}/volumes/custom", recursion=1) or []
    except NotFound:
        return []
    me = owner()
    out = []
    for v in vols:
        name = str(v.get("name") or "")
        config = v.get("config") or {}
        # The default project may hold the caches of several projects: this one's only.
        mine = config.get(OWNER_KEY) == me and config.get(PROJECT_KEY) == client.project
        if name.startswith(PREFIX) and mine:
            where = str(v.get("location") or "")
            out.append(
                CacheInfo(
                    name,
                    str(config.get(WORKSPACE_KEY) or ""),
                    list(v.get("used_by") or []),
                    "" if where == "none" else where,
                )
            )
    return sorted(out, key=lambda c: c.name)


def remove_caches(client: IncusClient, pool: str, caches: list[CacheInfo]) -> list[str]:
    """Delete the cache volumes (and this machine's manifests of them on this server and
    project); the names removed. One in use (a session filling its workspace from it) is
    left.

    :raises BackendError: the server refused a deletion other than for being in use."""
    removed = []
    for c in caches:
        if c.used_by:
            continue
        client.request(
            "DELETE",
            f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{_q(c.name)}",
            params={"target": c.member} if c.member else None,
        )
        removed.append(c.name)
    gone = set(removed)
    folder = manifests_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        m = load_manifest(path)
        if m is None or (
            m.volume in gone
            and m.url == (client.endpoint.url or "")
            and m.project == client.project
        ):
            path.unlink(missing_ok=True)
    return removed


__all__ = [
    "DEVICE",
    "MOUNT",
    "PREFIX",
    "CacheInfo",
    "Delta",
    "Manifest",
    "NotDetached",
    "Sig",
    "attached",
    "delta",
    "ensure_volume",
    "list_caches",
    "load_manifest",
    "manifest_path",
    "remove_caches",
    "same",
    "save_manifest",
    "scan",
    "supported",
    "volume_name",
    "write_tar",
]
