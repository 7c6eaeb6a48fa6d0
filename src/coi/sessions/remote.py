"""Sessions on a remote daemon: what changes (the workspace travels as a copy) and what
does not work there, said at the command instead of silently dropped."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from coi.backend.exec import ExecRequest
from coi.config.paths import coi_home
from coi.errors import CoiError, SessionError
from coi.review.cp import Meter
from coi.sessions import wscache

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


def _scan(spec: SandboxSpec) -> dict[str, wscache.Sig]:
    files, dirs = _excluded(spec)
    root = spec.source or spec.workspace
    return wscache.scan(root, masked_files=frozenset(files), masked_dirs=dirs)


def pack(spec: SandboxSpec, out: Path) -> tuple[int, int]:
    """The workspace (in review mode, the review's work/) as a tar file owned by the agent;
    (entries, bytes of file data). Symbolic links are stored as links, never followed; masked
    paths (and other hard links to masked files), sockets, FIFOs and devices are left out."""
    root = spec.source or spec.workspace
    written, size = wscache.write_tar(root, list(_scan(spec)), out, spec.code_uid)
    return len(written), size


@dataclasses.dataclass(frozen=True)
class Pushed:
    """What one upload of the workspace did (the summary line says it)."""

    entries: int  # entries the sandbox got
    size: int  # bytes of file data in the workspace as sent
    sent: int  # bytes sent over the network (archive and list of deletions)
    changed: int = -1  # files and links sent; -1: the whole workspace was
    removed: int = 0  # entries removed from the cache
    why: str = ""  # why the whole workspace was sent (empty: only what changed)

    def summary(self, took: float) -> str:
        if self.changed >= 0:
            how = f"only what changed: {self.changed} files, {self.removed} removed"
        else:
            how = "the whole workspace" + (f": {self.why}" if self.why else "")
        return (
            f"Copied the workspace to the remote sandbox: {self.entries} entries, "
            f"{self.size / 1e6:.1f} MB of files ({self.sent / 1e6:.1f} MB sent, {how}) in "
            f"{took:.1f} s"
        )


# Unpacks the whole workspace into its folder. After a failed try with the cache, that folder
# may hold part of the cache's copy: files of the workspace as it is now (the deletions were
# applied to the cache before it was copied), which the archive's overwrite.
_WHOLE = (
    'mkdir -p "$T" && chown "$U:$U" "$T" && cd "$T" && tar -x -f "$A"; rc=$?; rm -f "$A"; exit $rc'
)


def push_whole(client: IncusClient, name: str, spec: SandboxSpec) -> Pushed:
    """The whole workspace as one tar, unpacked in the sandbox (no cache).

    :raises SessionError: the copy could not be unpacked there.
    """
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
    env = {"T": spec.workspace_target, "U": str(spec.code_uid), "A": ARCHIVE}
    res = client.exec.recorded(name, ExecRequest(["sh", "-c", _WHOLE], env=env))
    if res.exit_code != 0:
        raise SessionError(
            "could not copy the workspace into the remote sandbox",
            details=res.stderr.decode(errors="replace").strip() or None,
            resolution="The image needs sh and tar.",
        )
    return Pushed(count, size, sent)


def push_workspace(client: IncusClient, name: str, spec: SandboxSpec, log: Log) -> Pushed:
    """Copy the workspace into the sandbox at its target, owned by the agent: through the
    workspace's cache on the server where it can (only what changed since the last session
    is sent), else whole.

    :raises SessionError: the copy could not be made there.
    """
    started = time.monotonic()
    done: Pushed | None = None
    if not client.endpoint.is_local and wscache.supported(client):
        try:
            done = _push_cached(client, name, spec)
        except _NoCache as err:
            log(f"Remote: the workspace's cache on the server was not used ({err}): the whole "
                "workspace is sent")  # fmt: skip
    if done is None:
        done = push_whole(client, name, spec)
    if spec.review:
        # Where `coi review fetch` and `coi shutdown` find the agent's work again.
        client.instances.set_config(name, {TARGET: spec.workspace_target})
    log(done.summary(time.monotonic() - started))
    return done


class _NoCache(Exception):
    """The cache could not be used this time (said; the whole workspace goes instead)."""


# Applies a delta to the cache (attached at $C) and copies the cache to the workspace's
# folder. Mode $M: "delta" (the cache must hold generation $G0) or "whole" (emptied first).
# The generation is removed while the cache changes and written ($G1) only once all is done:
# a cache left halfway is never taken for a complete one.
_CACHED = """
W="$C/ws"
if [ "$M" = delta ] && [ "$(cat "$C/gen" 2>/dev/null)" != "$G0" ]; then
  rm -f "$A" "$D"; exit 42
fi
rm -f "$C/gen"
if [ "$M" != delta ]; then rm -rf "$W"; fi
mkdir -p "$W" && cd "$W" && { [ ! -s "$D" ] || xargs -0 rm -rf -- < "$D"; } \
  && tar -x -f "$A" && mkdir -p "$T" && cp -a "$W/." "$T/" \
  && chown "$U:$U" "$T"
rc=$?
rm -f "$A" "$D"
if [ $rc -eq 0 ]; then printf '%s' "$G1" > "$C/gen" && chmod 600 "$C/gen"; fi
exit $rc
"""
# Where the list of paths to delete from the cache waits in the sandbox (root's, 0600).
DELETIONS = "/root/.coi-workspace.del"
STALE = 42


def _push_cached(client: IncusClient, name: str, spec: SandboxSpec) -> Pushed:
    """The workspace through its cache on the server (see coi.sessions.wscache).

    :raises _NoCache: the cache could not be used; nothing of it reached the workspace's
        folder that the whole upload would not replace.
    :raises SessionError: the cache could not be detached (the agent must not start).
    """
    from coi.errors import BackendError
    from coi.locks import held

    root = spec.source or spec.workspace
    workspace = str(spec.workspace)
    url, project = client.endpoint.url or "", client.project
    # On a cluster, a cache on the sandbox's member (a pool on each member's own disk: a
    # sandbox attaches its member's volumes only).
    try:
        member = client.instances.get(name).location if client.server.clustered else ""
    except BackendError as err:
        raise _NoCache(err.message) from err
    vol = wscache.volume_name(workspace, project, member)
    mpath = wscache.manifest_path(url, project, workspace, member)
    entries = _scan(spec)
    with held(coi_home() / "locks" / f"{vol}.lock"):
        try:
            made = wscache.ensure_volume(client, spec.pool, vol, workspace, member)
        except BackendError as err:
            raise _NoCache(f"the server did not make its volume: {err.message}") from err
        m = wscache.load_manifest(mpath)
        old: dict[str, wscache.Sig] | None = None
        why = ""
        if made:
            why = "no cache of it on the server yet"
        elif m is None or m.volume != vol:
            why = "this machine has no record of its cache on the server"
        else:
            old = m.entries
        generation = wscache.new_generation()
        try:
            with wscache.attached(client, name, spec.pool, vol):
                if old is not None and m is not None:
                    got = client.exec.recorded(
                        name,
                        ExecRequest(["cat", f"{wscache.MOUNT}/gen"]),
                        read_output=lambda _code: True,
                    )
                    if got.exit_code != 0 or got.stdout.decode(errors="replace") != m.generation:
                        why = "its cache on the server is not the one this machine recorded"
                        old = None
                strict = old is not None and m is not None and m.root == str(root)
                strict = strict and spec.source is None
                d = wscache.delta(old, entries, strict=strict)
                with tempfile.TemporaryDirectory(prefix="coi-push-") as tmp:
                    archive = Path(tmp) / "workspace.tar"
                    written, _ = wscache.write_tar(root, d.send, archive, spec.code_uid)
                    listing = b"".join(os.fsencode(p) + b"\0" for p in d.delete)
                    sent = archive.stat().st_size + len(listing)
                    meter = Meter("Uploading the workspace", sent)
                    client.files.push_file(
                        name, archive, ARCHIVE, uid=0, gid=0, mode=0o600, progress=meter
                    )
                    meter.done()
                client.files.push_bytes(name, DELETIONS, listing, uid=0, gid=0, mode=0o600)
                env = {
                    "C": wscache.MOUNT,
                    "T": spec.workspace_target,
                    "U": str(spec.code_uid),
                    "A": ARCHIVE,
                    "D": DELETIONS,
                    "M": "delta" if old is not None else "whole",
                    "G0": m.generation if (old is not None and m is not None) else "",
                    "G1": generation,
                }
                res = client.exec.recorded(name, ExecRequest(["sh", "-c", _CACHED], env=env))
        except wscache.NotDetached:
            raise
        except BackendError as err:
            raise _NoCache(err.message) from err
        if res.exit_code == STALE:
            raise _NoCache("its cache on the server changed meanwhile")
        if res.exit_code != 0:
            err_text = res.stderr.decode(errors="replace").strip()[-500:]
            raise _NoCache(f"unpacking failed: {err_text or res.exit_code}")
        # What the cache holds now: the scan, less what vanished before it could be sent.
        skipped = set(d.send) - set(written)
        kept = {rel: sig for rel, sig in entries.items() if rel not in skipped}
        wscache.save_manifest(
            mpath,
            wscache.Manifest(url, project, workspace, vol, generation, str(root), kept),
        )
    size = sum(s[2] for rel, s in kept.items() if s[0] == "file")
    if old is None:
        return Pushed(len(kept), size, sent, why=why)
    return Pushed(len(kept), size, sent, changed=d.changed, removed=d.removed)


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


@contextlib.contextmanager
def _running(client: IncusClient, name: str, log: Log, *, stop_after: bool) -> Iterator[None]:
    """The sandbox `name` running while the block fetches its work: one that stopped by
    itself (its command powered it off, `max_duration` stopped it) is started for it, and
    with `stop_after` stopped again at the end (left as it was found).

    The fetch needs an exec (`tar` inside): the files API could read a stopped container's
    files one by one, but not its links, and one archive keeps the fetch's single set of
    rules (`coi.review.untar`). Started again, the sandbox is what it was: its network
    policy and limits are its own config; what its boot runs is the agent's, in there.

    :raises NotFound: the sandbox is gone (an ephemeral one is deleted when it stops).
    """
    from coi.errors import NotFound

    inst = client.instances.get(name)
    if inst.status != "Stopped":
        yield
        return
    if inst.ephemeral:
        # The daemon is deleting it (it stopped): started now, it would be lost halfway.
        raise NotFound(f"{name} stopped and is being deleted (ephemeral)")
    log(
        f"{name} stopped by itself (its command powered it off, or max_duration was "
        "reached): starting it to fetch the agent's work"
    )
    client.instances.start(name)
    try:
        yield
    finally:
        if stop_after:
            with contextlib.suppress(CoiError):
                client.instances.stop(name, force=True)


def gone_note(name: str, review_id: str) -> str:
    """What is said when a review's sandbox is gone before its work came back."""
    return (
        f"{name} is gone (an ephemeral sandbox is deleted when it stops: its command "
        f"powered it off, or it was stopped): nothing to fetch; review "
        f"{review_id} holds the workspace as it was uploaded"
    )


def _going(client: IncusClient, name: str, wait: float = 10.0) -> bool:
    """After a failed fetch: is the sandbox gone, or going? An ephemeral one stopped under
    the fetch (its command powered it off) makes the exec fail ("Failed to retrieve PID")
    while the daemon is still deleting it: waited for, bounded."""
    from coi.errors import NotFound

    end = time.monotonic() + wait
    while True:
        try:
            inst = client.instances.get(name)
        except NotFound:
            return True
        except CoiError:
            return False
        if not inst.ephemeral or time.monotonic() > end:
            return False
        time.sleep(0.3)


def bring_back(client: IncusClient, name: str, spec: SandboxSpec, log: Log) -> bool:
    """Before a remote review sandbox is removed: fetch its work into the review (a stopped
    one is started for it). False when that failed (said, with what to do): the caller
    keeps the sandbox."""
    from coi.errors import NotFound

    if not (spec.remote and spec.review and name):
        return True
    try:
        with _running(client, name, log, stop_after=False):
            fetch_review(
                client, name, spec.review, spec.workspace_target, cap=fetch_cap(spec), log=log
            )
    except NotFound:
        log(f"Warning: {gone_note(name, spec.review)}")
        return True
    except CoiError as err:
        if _going(client, name):
            log(f"Warning: {gone_note(name, spec.review)}")
            return True
        log(
            f"Warning: the agent's work could not be fetched from {name}: {err.message}"
            + (f" ({err.details})" if err.details else "")
        )
        if err.resolution:
            log(f"  {err.resolution}")
        return False
    return True


def fetch_running(
    client: IncusClient,
    name: str,
    *,
    cap: int | None,
    log: Log,
    expect: str = "",
    stop_after: bool = True,
) -> str:
    """Fetch the work of the remote review sandbox `name` into its review (one that stopped
    by itself is started for it, and with `stop_after` stopped again); the review's id.

    :raises UsageError: not a remote review sandbox of this daemon, or frozen.
    """
    from coi import labels
    from coi.errors import NotFound, UsageError

    where = client.endpoint.describe()
    try:
        inst = client.instances.get(name)
    except NotFound:
        raise UsageError(
            f"no sandbox {name} on {where}",
            details="It may be gone: a 'coi run' sandbox is deleted when it stops (its "
            "command powered it off, or max_duration was reached), and its work with it.",
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
    if not inst.running and inst.status != "Stopped":
        raise UsageError(
            f"{name} is {inst.status}: its work cannot be fetched",
            resolution=f"'coi resume {name}' first (the security monitor paused it)"
            if inst.status == "Frozen"
            else None,
        )
    # A sandbox that stopped by itself is started for the fetch and stopped again, unless
    # it is removed next anyway.
    with _running(client, name, log, stop_after=stop_after):
        fetch_review(client, name, review, inst.config[TARGET], cap=cap, log=log)
    return review


def before_removal(client: IncusClient, name: str, log: Log) -> str | None:
    """`coi shutdown` of a remote review sandbox: its work fetched first (a stopped one is
    started for it). None when done or nothing to do; else why not (the caller keeps the
    sandbox)."""
    from coi import labels

    if client.endpoint.is_local:
        return None
    inst = client.instances.get(name)
    if TARGET not in inst.config or labels.REVIEW not in inst.config:
        return None
    if inst.status not in ("Running", "Stopped"):
        return f"it is {inst.status}"
    from coi.config.loader import load_config
    from coi.review.settings import max_file

    cap = max_file(load_config(env=os.environ))
    try:
        fetch_running(
            client, name, cap=cap * CAP_FACTOR if cap else None, log=log, stop_after=False
        )
    except CoiError as err:
        return err.message + (f" ({err.details})" if err.details else "")
    return None
