"""Review copies on the daemon's btrfs pool: a mirror of each workspace kept in step with
it, and btrfs snapshots of the mirror as a review's base/ and work/ (instant at any size)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from coi.errors import CoiError, ConfigError, NotFound
from coi.fsio import write_atomic
from coi.locks import held
from coi.review.cp import Progress, copy_tree

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.config.loader import Config

# The custom volume that holds every mirror and every review's snapshots, one per project.
VOLUME = "coi-reviews"
BTRFS_MAGIC = 0x9123683E
SUBVOLUME_INO = 256  # a btrfs subvolume's root folder always has this inode number

# What says an entry of the workspace is as it was copied: any change of content or
# metadata moves ctime, which nobody can set back; the rest catches a swapped entry.
Sig = tuple[str, int, int, int, int, int, int, int, str]


@dataclass(frozen=True)
class PoolStore:
    """The review volume's folder, as this host sees it (only root can reach it)."""

    root: Path

    @property
    def mirrors(self) -> Path:
        return self.root / "mirrors"

    @property
    def reviews(self) -> Path:
        return self.root / "reviews"


def _is_btrfs(path: Path) -> bool:
    """Whether `path` is the root of a btrfs subvolume (what the daemon made the volume)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != SUBVOLUME_INO:
        return False
    # os.statvfs has no f_type: `stat -f` says the filesystem's name.
    res = subprocess.run(
        ["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True, check=False
    )
    return res.returncode == 0 and int(res.stdout.strip() or "0", 16) == BTRFS_MAGIC


def _pool_folder(client: IncusClient, pool: str) -> Path | None:
    """Where the daemon mounts `pool` on this host: next to its unix socket (a remote
    daemon's pool is not here)."""
    sock = client.endpoint.socket_path
    if not sock:
        return None
    var = Path(os.path.realpath(sock)).parent
    for base in (var, Path("/var/lib/incus"), Path("/var/lib/lxd")):
        folder = base / "storage-pools" / pool
        if folder.is_dir():
            return folder
    return None


def open_store(client: IncusClient, pool: str, *, create: bool = True) -> PoolStore | None:
    """The review volume on `pool`, made if missing (with `create`); None where coi cannot
    use it: a remote daemon, a pool that is not btrfs, a user who cannot reach the pool's
    folder (only root can), no `btrfs` program."""
    if os.geteuid() != 0 or shutil.which("btrfs") is None:
        return None
    info = client.networks.pool(pool)
    if info is None or info.driver != "btrfs":
        return None
    folder = _pool_folder(client, pool)
    if folder is None:
        return None
    if not client.networks.volume_exists(pool, VOLUME):
        if not create:
            return None
        with contextlib.suppress(CoiError):  # made by another coi meanwhile: fine
            client.networks.create_volume(
                pool, VOLUME, description="coi: review copies (coi clean --reviews)"
            )
    # The volume is in the client's project when that project has its own volumes, else in
    # the default project; the daemon names its folder <project>_<volume>.
    for project in dict.fromkeys((client.project, "default")):
        root = folder / "custom" / f"{project}_{VOLUME}"
        if _is_btrfs(root):
            return PoolStore(root)
    return None


def store_for(cfg: Config) -> PoolStore | None:
    """The store `review.copy` asks for: the pool's where it can be used ("auto"), always
    ("pool"), never ("host").

    :raises ConfigError: "pool" where the pool cannot be used.
    """
    how = cfg.get_str("review.copy")
    if how == "host":
        return None
    from coi.backend.client import IncusClient

    remote = cfg.get_str("incus.remote") or None
    pool = cfg.get_str("incus.pool")
    try:
        with IncusClient.connect(
            env=os.environ, remote=remote, project=cfg.get_str("incus.project")
        ) as client:
            store = open_store(client, pool)
    except CoiError:
        if how == "pool":
            raise
        store = None
    if store is None and how == "pool":
        raise ConfigError(
            f"review.copy = \"pool\", but coi cannot keep copies on the pool '{pool}'",
            details="That needs the local daemon, a btrfs pool, the btrfs program, and root "
            "(only root can reach the pool's folder).",
            resolution='Set review.copy = "auto" (or "host": copies in ~/.coi/reviews).',
        )
    return store


def _btrfs(*args: str) -> None:
    res = subprocess.run(["btrfs", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise CoiError(
            f"btrfs {args[0]} {args[1]} failed",
            details=(res.stderr or res.stdout).strip()[-2000:],
            resolution='Check the pool has room (coi health), or set review.copy = "host".',
        )


def is_subvolume(path: str | Path) -> bool:
    try:
        return os.lstat(path).st_ino == SUBVOLUME_INO and os.path.isdir(path)
    except OSError:
        return False


def delete_subvolume(path: str | Path) -> None:
    """Remove a snapshot the review made (read-only ones too), whatever the agent left in it."""
    if is_subvolume(path):
        _btrfs("subvolume", "delete", str(path))


# -- the mirror --------------------------------------------------------------------------


def _scan(root: str) -> dict[str, Sig]:
    """Every entry under `root` by lstat (links are never followed), relative path -> Sig."""
    out: dict[str, Sig] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel_dir) if rel_dir else root)
        except OSError:
            continue  # gone, or unreadable: cp reports it when it copies
        with it:
            for e in it:
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                target = ""
                if stat.S_ISLNK(st.st_mode):
                    with contextlib.suppress(OSError):
                        target = os.readlink(e.path)
                elif stat.S_ISDIR(st.st_mode):
                    stack.append(rel)
                out[rel] = (
                    _kind(st.st_mode),
                    st.st_mode,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    st.st_ino,
                    st.st_uid,
                    st.st_gid,
                    target,
                )
    return out


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "link")):
        if test(mode):
            return name
    return "fifo" if stat.S_ISFIFO(mode) else "other"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _copy_entry(src: str, dst: str, sig: Sig) -> None:
    """Put one entry of the workspace into the mirror: content, owner, mode, mtime."""
    kind = sig[0]
    if os.path.lexists(dst) and (kind != "dir" or not os.path.isdir(dst) or os.path.islink(dst)):
        _remove(dst)
    if kind == "dir":
        if not os.path.isdir(dst):
            os.mkdir(dst, 0o700)
    elif kind == "file":
        tmp = f"{dst}.coi-sync"
        # copyfile copies in the kernel (copy_file_range); the source is opened without
        # following a link that replaced it meanwhile.
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            with os.fdopen(fd, "rb", closefd=False) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    elif kind == "link":
        os.symlink(sig[8], dst)
    elif kind == "fifo":
        os.mkfifo(dst)
    else:
        return  # sockets and devices: cp -a copies neither usefully; a workspace has none
    os.chown(dst, sig[6], sig[7], follow_symlinks=False)
    if kind != "link":
        os.chmod(dst, stat.S_IMODE(sig[1]))
        os.utime(dst, ns=(sig[3], sig[3]))


@dataclass
class Synced:
    """What one sync did: entries copied and removed, and whether it was the first."""

    copied: int
    removed: int
    first: bool


def _state_file(mirror: Path) -> Path:
    return mirror.with_name(mirror.name + ".json")


def mirror_of(store: PoolStore, workspace: str) -> Path:
    key = hashlib.sha256(workspace.encode()).hexdigest()[:16]
    return store.mirrors / key


def sync(store: PoolStore, workspace: str, progress: Progress | None = None) -> Synced:
    """Bring the workspace's mirror in step with the workspace: the first time a whole
    copy (`cp -a`), after that only what changed (the caller holds the mirror's lock).
    The workspace is scanned before it is copied, so an entry changed during the copy is
    copied again next time, never missed."""
    mirror = mirror_of(store, workspace)
    state_file = _state_file(mirror)
    try:
        old = {k: tuple(v) for k, v in json.loads(state_file.read_text())["entries"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        old = None
    now = _scan(workspace)
    if old is None or not is_subvolume(mirror):
        delete_subvolume(mirror)
        _remove(str(mirror))
        store.mirrors.mkdir(mode=0o700, parents=True, exist_ok=True)
        _btrfs("subvolume", "create", str(mirror))
        try:
            copy_tree(workspace, str(mirror), what=f"{workspace} onto the pool", progress=progress)
        except CoiError:
            delete_subvolume(mirror)
            raise
        synced = Synced(len(now), 0, True)
    else:
        gone = sorted((k for k in old if k not in now), reverse=True)  # children first
        for rel in gone:
            _remove(os.path.join(mirror, rel))
        changed = sorted(k for k, v in now.items() if old.get(k) != v)  # parents first
        for rel in changed:
            if os.path.dirname(rel) and not os.path.isdir(mirror / os.path.dirname(rel)):
                continue  # its folder went away between the scan and now
            with contextlib.suppress(FileNotFoundError):
                _copy_entry(os.path.join(workspace, rel), str(mirror / rel), now[rel])
        # A folder's mtime moves when entries are made in it: set the folders' last.
        for rel in reversed(changed):
            if now[rel][0] == "dir" and os.path.isdir(mirror / rel):
                os.utime(mirror / rel, ns=(now[rel][3], now[rel][3]))
        synced = Synced(len(changed), len(gone), False)
    top = os.lstat(workspace)
    os.chown(mirror, top.st_uid, top.st_gid)
    os.chmod(mirror, stat.S_IMODE(top.st_mode))
    write_atomic(state_file, json.dumps({"workspace": workspace, "entries": now}))
    return synced


@contextlib.contextmanager
def mirror_lock(store: PoolStore, workspace: str) -> Iterator[Path]:
    """Hold the workspace's mirror (one sync or snapshot at a time); yields its folder."""
    mirror = mirror_of(store, workspace)
    with held(mirror.with_name(mirror.name + ".lock")):
        yield mirror


def snapshot(
    store: PoolStore, workspace: str, base: str, work: str, progress: Progress | None = None
) -> Synced:
    """base/ (read-only) and work/ of a review: snapshots of the freshly synced mirror."""
    with mirror_lock(store, workspace) as mirror:
        synced = sync(store, workspace, progress)
        _btrfs("subvolume", "snapshot", "-r", str(mirror), base)
    _btrfs("subvolume", "snapshot", base, work)
    return synced


def drop_mirrors(store: PoolStore, keep: set[str]) -> list[str]:
    """Remove the mirrors of workspaces not in `keep`; returns the workspaces removed."""
    dropped = []
    for state_file in sorted(store.mirrors.glob("*.json")) if store.mirrors.is_dir() else ():
        mirror = state_file.with_suffix("")
        try:
            ws = str(json.loads(state_file.read_text()).get("workspace", ""))
        except (OSError, ValueError, AttributeError):
            ws = ""
        if ws in keep:
            continue
        _drop(mirror)
        dropped.append(ws or mirror.name)
    return dropped


def drop_mirror(store: PoolStore, workspace: str) -> None:
    """Remove one workspace's mirror (its next review copies the whole folder again)."""
    _drop(mirror_of(store, workspace))


def _drop(mirror: Path) -> None:
    lock = mirror.with_name(mirror.name + ".lock")
    with held(lock):
        delete_subvolume(mirror)
        _remove(str(mirror))
        _state_file(mirror).unlink(missing_ok=True)
    lock.unlink(missing_ok=True)


def remove_volume(client: IncusClient, pool: str) -> bool:
    """Delete the review volume (everything in it); whether there was one."""
    try:
        client.networks.delete_volume(pool, VOLUME)
    except NotFound:
        return False
    return True


__all__ = [
    "VOLUME",
    "PoolStore",
    "Synced",
    "delete_subvolume",
    "drop_mirror",
    "drop_mirrors",
    "is_subvolume",
    "mirror_of",
    "open_store",
    "remove_volume",
    "snapshot",
    "store_for",
    "sync",
]
