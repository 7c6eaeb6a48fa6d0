"""Sessions on a remote daemon: what changes (the workspace travels as a copy) and what
does not work there, said at the command instead of silently dropped."""

from __future__ import annotations

import dataclasses
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coi.backend.exec import ExecRequest
from coi.errors import SessionError

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.sessions.sandbox import Log, SandboxSpec

# Where the workspace's archive waits in the sandbox until it is unpacked (root's, 0600).
ARCHIVE = "/root/.coi-workspace.tar"
COPY_NOTICE = "changes stay in the remote sandbox; coi diff/apply for remotes comes next"


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
    if spec.mounts:
        raise SessionError(
            "extra mounts need the local daemon",
            details=f"the daemon is {where}: it cannot mount this machine's folders",
            resolution="Remove --mount and [[mounts]] for a remote session.",
        )
    if spec.source is not None or spec.review:
        raise SessionError(
            "review mode does not work on a remote daemon yet",
            details=f"the daemon is {where}",
            resolution="Run without --review: on a remote, the sandbox always works on a copy ("
            + COPY_NOTICE
            + ").",
        )
    if spec.monitor is not None and spec.monitor.enabled:
        raise SessionError(
            "the security monitor cannot watch a sandbox on a remote daemon",
            details=f"the daemon is {where}: the monitor reads the container's processes, "
            "files and connections on the machine it runs on, which is not this one",
            resolution="Run without --monitor (monitor.enabled = false) for a remote session.",
        )
    if spec.protection is not None and spec.protection.enabled:
        log(
            "Remote: protected paths are not mounted read-only (the agent works on a copy; "
            "nothing it changes reaches your folder in this version)"
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
    """The workspace as a tar file owned by the agent; (entries, bytes of file data).
    Symbolic links are stored as links, never followed; masked paths are left out."""
    root = spec.workspace
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
        client.files.push_file(name, archive, ARCHIVE, uid=0, gid=0, mode=0o600)
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
    took = time.monotonic() - started
    log(
        f"Copied the workspace to the remote sandbox: {count} entries, {size / 1e6:.1f} MB "
        f"of files ({sent / 1e6:.1f} MB sent) in {took:.1f} s"
    )
