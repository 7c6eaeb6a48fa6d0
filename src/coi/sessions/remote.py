"""Sessions on a remote daemon: what changes (the workspace travels as a copy) and what
does not work there, said at the command instead of silently dropped."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coi.backend.exec import ExecRequest
from coi.errors import CoiError, SessionError
from coi.review.cp import Meter

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.sessions.sandbox import Log, SandboxSpec

# Where the workspace's archive waits in the sandbox until it is unpacked (root's, 0600).
ARCHIVE = "/root/.coi-workspace.tar"
# On a remote review sandbox: the folder inside that holds the agent's copy.
TARGET = "user.coi.review_target"
COPY_NOTICE = "changes stay in the remote sandbox (--review brings them back as a review)"


def is_remote(spec: SandboxSpec) -> bool:
    return bool(spec.remote)


def adapt(client: IncusClient, spec: SandboxSpec, log: Log) -> SandboxSpec:
    """The spec as a remote daemon can honour it; refuses what would otherwise be dropped.

    The daemon is on another machine: it cannot mount this machine's folders, and host-side
    watchers (the monitor, the protected paths' checks) would watch the wrong machine.

    :raises SessionError: the session asks for something that cannot work remotely.
    """
    if client.endpoint.is_local:
        return spec
    where = client.endpoint.describe()
    refused = None
    if spec.mounts:
        refused = SessionError(
            "extra mounts need the local daemon",
            details=f"the daemon is {where}: it cannot mount this machine's folders",
            resolution="Remove --mount and [[mounts]] for a remote session.",
        )
    elif spec.review and spec.persistent:
        refused = SessionError(
            "review mode on a remote daemon needs a sandbox made for the session",
            details=f"the daemon is {where}: a persistent sandbox keeps its own copy of the "
            "workspace across sessions, not this review's",
            resolution="Drop --persistent (or --review) for a remote session.",
        )
    elif spec.monitor is not None and spec.monitor.enabled:
        refused = SessionError(
            "the security monitor cannot watch a sandbox on a remote daemon",
            details=f"the daemon is {where}: the monitor reads the container's processes, "
            "files and connections on the machine it runs on, which is not this one",
            resolution="Run without --monitor (monitor.enabled = false) for a remote session.",
        )
    if refused is not None:
        if spec.review:
            from coi.review.copy import discard, find

            discard(find(spec.review, None))  # made for this session: not wanted
        raise refused
    if spec.review:
        log(
            f"Remote: the daemon is {where}; the review's copy is uploaded into the sandbox, "
            f"and the agent's work comes back into review {spec.review} when the sandbox is "
            f"removed ('coi review fetch {spec.review}' meanwhile)"
        )
        if spec.protection is not None and spec.protection.enabled:
            log(
                "Remote: protected paths are not mounted read-only; 'coi apply' still "
                "refuses to write them (unless --include-protected)"
            )
    else:
        if spec.protection is not None and spec.protection.enabled:
            log(
                "Remote: protected paths are not mounted read-only (the agent works on a "
                "copy; nothing it changes reaches your folder)"
            )
        log(f"Remote: the daemon is {where}; the workspace is copied into the sandbox, "
            + COPY_NOTICE)  # fmt: skip
    return dataclasses.replace(
        spec, protection=None, remote=spec.remote or client.endpoint.url or "remote"
    )


def _excluded(spec: SandboxSpec) -> tuple[set[str], tuple[str, ...]]:
    """Masked files and folders (`security.mask_secrets`): not copied at all."""
    files: set[str] = set()
    dirs: list[str] = []
    if spec.masks is not None:
        for m in spec.masks.paths:
            (dirs.append(m.rel.rstrip("/") + "/") if m.kind == "dir" else files.add(m.rel))
    return files, tuple(dirs)


def pack(spec: SandboxSpec, out: Path) -> tuple[int, int]:
    """The workspace (in review mode, the review's work/) as a tar file owned by the agent;
    (entries, bytes of file data). Symbolic links are stored as links, never followed; masked
    paths are left out."""
    root = spec.source or spec.workspace
    files, dirs = _excluded(spec)
    uid = spec.code_uid
    count = size = 0
    kept: set[str] = set()
    # The masked files' inodes: another hard link to one holds the same secret.
    secret: set[tuple[int, int]] = set()
    for rel in files:
        try:
            st = os.lstat(root / rel)
        except OSError:
            continue
        if st.st_nlink > 1:
            secret.add((st.st_dev, st.st_ino))
    for d in dirs:
        for sub, _dirs, names in os.walk(root / d.rstrip("/")):
            for n in names:
                st = os.lstat(os.path.join(sub, n))
                if st.st_nlink > 1:
                    secret.add((st.st_dev, st.st_ino))

    def owned(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        nonlocal count, size
        rel = ti.name[2:] if ti.name.startswith("./") else ti.name
        if rel in files or any((rel + "/").startswith(d) for d in dirs):
            return None
        if ti.islnk() and ti.linkname not in kept:
            # A second name of a file left out (masked): the same content, so left out too.
            return None
        if not (ti.isfile() or ti.isdir() or ti.issym() or ti.islnk()):
            return None  # sockets, FIFOs, devices: nothing to copy
        if secret and (ti.isfile() or ti.islnk()):
            st = os.lstat(root / rel)
            if (st.st_dev, st.st_ino) in secret:
                return None
        kept.add(ti.name)
        ti.uid = ti.gid = uid
        ti.uname = ti.gname = ""
        count += 1
        size += ti.size if ti.isfile() else 0
        return ti

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(os.listdir(root)):
            tar.add(root / entry, arcname=f"./{entry}", recursive=True, filter=owned)
    return count, size


def push_workspace(client: IncusClient, name: str, spec: SandboxSpec, log: Log) -> None:
    """Copy the workspace into the sandbox at its target, owned by the agent.

    :raises SessionError: the copy could not be unpacked there.
    """
    started = time.monotonic()
    target = spec.workspace_target
    with tempfile.TemporaryDirectory(prefix="coi-push-") as tmp:
        archive = Path(tmp) / "workspace.tar"
        count, size = pack(spec, archive)
        sent = archive.stat().st_size
        # Sent with the files API and unpacked by a recorded exec (no websockets): an exec
        # streaming stdin cannot be started again when the daemon loses its child, and
        # these two can.
        meter = Meter("Uploading the workspace", sent)
        client.files.push_file(name, archive, ARCHIVE, uid=0, gid=0, mode=0o600, progress=meter)
        meter.done()
    script = (
        'mkdir -p "$T" && chown "$U:$U" "$T" && cd "$T" && tar -x -f "$A"; rc=$?; '
        'rm -f "$A"; exit $rc'
    )
    req = ExecRequest(
        ["sh", "-c", script], env={"T": target, "U": str(spec.code_uid), "A": ARCHIVE}
    )
    res = client.exec.recorded(name, req)
    if res.exit_code != 0:
        raise SessionError(
            "could not copy the workspace into the remote sandbox",
            details=res.stderr.decode(errors="replace").strip() or None,
            resolution="The image needs sh and tar.",
        )
    if spec.review:
        # Where `coi review fetch` and `coi shutdown` find the agent's work again.
        client.instances.set_config(name, {TARGET: target})
    took = time.monotonic() - started
    log(
        f"Copied the workspace to the remote sandbox: {count} entries, {size / 1e6:.1f} MB "
        f"of files ({sent / 1e6:.1f} MB sent) in {took:.1f} s"
    )


# -- review mode: the agent's work coming back ---------------------------------------------

# Where the workspace's archive is made in the sandbox before it is downloaded (root's).
PULL = "/root/.coi-pull.tar"
# The archive and the extracted files may hold at most this many times review.max_file_size.
CAP_FACTOR = 100


def fetch_cap(spec: SandboxSpec) -> int | None:
    """The most bytes a review's fetch takes: CAP_FACTOR x review.max_file_size (None: no
    cap is set; the free space of the reviews' disk still bounds it)."""
    from coi.config.loader import load_config
    from coi.review.settings import max_file

    cap = max_file(load_config(cwd=spec.workspace, env=os.environ))
    return cap * CAP_FACTOR if cap else None


def _download(
    client: IncusClient, name: str, path: str, local: Path, cap: int | None, room: Path
) -> int:
    """Stream `path` from the sandbox into the new file `local`; its size.

    :raises TooBig: it is bigger than `cap`, or than the free space where it goes (its
        files need as much again).
    """
    from urllib.parse import quote

    from coi.review.untar import TooBig, size_text

    def refuse(size: int, why: str) -> TooBig:
        return TooBig(
            f"the archive of the sandbox's workspace is too big to fetch ({why})",
            details=f"{size_text(size)} or more",
            resolution="Raise review.max_file_size (the cap is "
            f"{CAP_FACTOR} times it), free space, or remove large files in the sandbox and "
            "fetch again ('coi review fetch').",
        )

    def check(size: int) -> None:
        if cap is not None and size > cap:
            raise refuse(size, f"the cap is {size_text(cap)}")
        st = os.statvfs(room)
        free = st.f_bavail * st.f_frsize
        if 2 * size > free:
            raise refuse(size, f"{size_text(free)} free in {room}")

    got = 0
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    meter = Meter("Fetching the agent's work", 0)
    try:
        url = f"/1.0/instances/{quote(name, safe='')}/files"
        with client.stream(url, params={"path": path}) as resp:
            length = resp.headers.get("content-length")
            if length and length.isdigit():
                check(int(length))
                meter.total = int(length)
            for chunk in resp.iter_bytes(1 << 20):
                got += len(chunk)
                check(got)
                meter(got)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
        meter.done()
    return got


def _exchange(a: str, b: str) -> None:
    """Swap two folders in one step (renameat2 RENAME_EXCHANGE) where the kernel can; else
    in two renames (a moment without `b`)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        at_fdcwd, rename_exchange = -100, 2
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    aside = b + ".coi-old"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def fetch_review(
    client: IncusClient,
    name: str,
    review_id: str,
    target: str,
    *,
    cap: int | None,
    log: Log,
) -> None:
    """Bring the agent's work back from the remote sandbox `name`: its workspace `target` as
    a tar made inside, downloaded (at most `cap` bytes), unpacked by `coi.review.untar`'s
    rules into a fresh folder that then takes the place of the review's work/.

    :raises SessionError: the sandbox could not make the archive, or the review is not one
        a remote sandbox works on.
    :raises TooBig: bigger than `cap` or the free space (work/ is left as it was).
    """
    from coi.review.copy import INDEX, find, remove_tree
    from coi.review.untar import extract

    review = find(review_id, None)
    if review.snapshots:
        raise SessionError(
            f"review {review.id} is kept on the local pool: its sandbox works on it directly",
            resolution="Nothing to fetch: 'coi diff' shows the changes.",
        )
    started = time.monotonic()
    script = 'rm -f "$A" && tar -c -f "$A" -C "$T" . ; rc=$?; chmod 600 "$A" 2>/dev/null; exit $rc'
    res = client.exec.recorded(
        name, ExecRequest(["sh", "-c", script], env={"T": target, "A": PULL})
    )
    try:
        if res.exit_code != 0:
            raise SessionError(
                f"could not make an archive of {target} in the remote sandbox {name}",
                details=res.stderr.decode(errors="replace").strip()[-2000:] or None,
                resolution="The image needs sh and tar; is the sandbox's disk full?",
            )
        folder = Path(review.folder)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder))
        try:
            archive = tmp / "work.tar"
            sent = _download(client, name, PULL, archive, cap, folder)
            fresh = tmp / "work"
            fresh.mkdir(mode=0o700)
            ws = os.stat(review.workspace) if os.path.isdir(review.workspace) else None
            owner = (ws.st_uid, ws.st_gid) if os.geteuid() == 0 and ws is not None else None
            got = extract(archive, fresh, max_total=cap, owner=owner, base=Path(review.base))
            os.chmod(fresh, os.stat(review.work).st_mode & 0o7777)
            if owner is not None:
                os.chown(fresh, *owner)
            _exchange(str(fresh), review.work)
            # The stamps of the old work/'s files say nothing of these: `coi diff` reads all.
            (folder / INDEX).unlink(missing_ok=True)
        finally:
            remove_tree(tmp)
    finally:
        with contextlib.suppress(CoiError):
            client.files.delete(name, PULL)
    left = got.skipped_text()
    log(
        f"Fetched the agent's work into review {review.id}: {got.files} files, "
        f"{got.dirs} folders, {got.links} links, {got.size / 1e6:.1f} MB "
        f"({sent / 1e6:.1f} MB received) in {time.monotonic() - started:.1f} s"
        + (f"; left out: {left}" if left else "")
    )


def bring_back(client: IncusClient, name: str, spec: SandboxSpec, log: Log) -> bool:
    """Before a remote review sandbox is removed: fetch its work into the review. False when
    that failed (said, with what to do): the caller keeps the sandbox."""
    if not (spec.remote and spec.review and name):
        return True
    try:
        if not client.instances.get(name).running:
            log(
                f"Warning: {name} stopped before the agent's work could be fetched: review "
                f"{spec.review} holds the workspace as it was uploaded"
            )
            return True
        fetch_review(client, name, spec.review, spec.workspace_target, cap=fetch_cap(spec), log=log)
    except CoiError as err:
        log(
            f"Warning: the agent's work could not be fetched from {name}: {err.message}"
            + (f" ({err.details})" if err.details else "")
        )
        if err.resolution:
            log(f"  {err.resolution}")
        return False
    return True


def fetch_running(
    client: IncusClient, name: str, *, cap: int | None, log: Log, expect: str = ""
) -> str:
    """Fetch the work of the running remote review sandbox `name` into its review; the
    review's id.

    :raises UsageError: not a remote review sandbox of this daemon, or not running.
    """
    from coi import labels
    from coi.errors import NotFound, UsageError

    where = client.endpoint.describe()
    try:
        inst = client.instances.get(name)
    except NotFound:
        raise UsageError(
            f"no sandbox {name} on {where}",
            resolution="Name the daemon it runs on: coi --remote NAME review fetch ...",
        ) from None
    review = inst.config.get(labels.REVIEW, "")
    if client.endpoint.is_local or not review or TARGET not in inst.config:
        raise UsageError(
            f"{name} is not a remote review sandbox: there is nothing to fetch",
            details="a local sandbox works on the review's copy itself",
        )
    if expect and review != expect:
        raise UsageError(f"{name} works on review {review} now, not on {expect}")
    if not inst.running:
        raise UsageError(f"{name} is not running ({inst.status}): its work cannot be fetched")
    fetch_review(client, name, review, inst.config[TARGET], cap=cap, log=log)
    return review


def before_removal(client: IncusClient, name: str, log: Log) -> str | None:
    """`coi shutdown` of a remote review sandbox: its work fetched first. None when done or
    nothing to do; else why not (the caller keeps the sandbox)."""
    from coi import labels

    if client.endpoint.is_local:
        return None
    inst = client.instances.get(name)
    if not inst.running or TARGET not in inst.config or labels.REVIEW not in inst.config:
        return None
    from coi.config.loader import load_config
    from coi.review.settings import max_file

    cap = max_file(load_config(env=os.environ))
    try:
        fetch_running(client, name, cap=cap * CAP_FACTOR if cap else None, log=log)
    except CoiError as err:
        return err.message + (f" ({err.details})" if err.details else "")
    return None
