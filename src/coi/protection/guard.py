"""Host-side guard of protected paths: a record and a copy at session start, verify, restore.

Read-only mounts stop the agent user, not root inside the container (it can unmount them).
So before the agent starts, coi records every protected file (type, mode, sha256) and keeps a
copy under ~/.coi/protected/<container>/; while the session runs and when it ends, it compares
the workspace with that record and puts back anything that changed. The agent controls the
workspace, so every operation here works on directory file descriptors and never follows a
symlink: a planted link cannot make coi read or write outside the workspace.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coi.audit import AuditLog, Event
from coi.config.paths import coi_home
from coi.fsio import write_atomic
from coi.locks import held
from coi.protection.paths import ProtectionPlan

Log = Callable[[str], None]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A recorded tree larger than this is watched by hash only, without a copy to restore from.
MAX_COPY_BYTES = 64 * 1024 * 1024
MAX_ENTRIES = 20_000
MAX_DEPTH = 64
QUARANTINE_BYTES = 64 * 1024 * 1024


@dataclass
class Entry:
    """One file system entry as recorded or as found."""

    type: str  # "dir", "file", "symlink" or "other"
    mode: int
    size: int = 0
    sha256: str = ""
    target: str = ""
    mtime_ns: int = 0
    ctime_ns: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0

    def same_stat(self, other: Entry) -> bool:
        return (self.type, self.mode, self.size, self.mtime_ns, self.ctime_ns, self.ino) == (
            other.type,
            other.mode,
            other.size,
            other.mtime_ns,
            other.ctime_ns,
            other.ino,
        )


@dataclass
class Change:
    rel: str
    what: str  # added, removed, content, mode, type, replaced

    def __str__(self) -> str:
        words = {
            "added": "created",
            "removed": "deleted",
            "content": "content changed",
            "mode": "permissions changed",
            "type": "replaced by another kind of file",
            "replaced": "replaced",
        }
        return f"{self.rel} ({words.get(self.what, self.what)})"


@dataclass
class Report:
    """What one verification found and did."""

    changes: list[Change] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    quarantine: Path | None = None
    notes: list[str] = field(default_factory=list)


class TreeTooLarge(Exception):
    pass


class ParentReplaced(Exception):
    def __init__(self, rel: str) -> None:
        super().__init__(rel)
        self.rel = rel


# -- low-level, symlink-safe file system walking -------------------------------------------


def _stat_entry(st: os.stat_result) -> Entry:
    mode = st.st_mode
    kind = (
        "dir"
        if stat.S_ISDIR(mode)
        else "file"
        if stat.S_ISREG(mode)
        else "symlink"
        if stat.S_ISLNK(mode)
        else "other"
    )
    return Entry(
        type=kind,
        mode=stat.S_IMODE(mode),
        size=st.st_size if kind == "file" else 0,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        uid=st.st_uid,
        gid=st.st_gid,
    )


def _read_file(parent_fd: int, name: str, sink: Callable[[bytes], object] | None) -> str:
    """sha256 of a regular file opened without following links (and without blocking on FIFOs)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=parent_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not-a-file"
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
            if sink:
                sink(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def _open_dir(parent_fd: int, name: str) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


@contextmanager
def _opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _walk_parents(ws_fd: int, parts: list[str]) -> int | None:
    """An fd of the directory holding the leaf; None when a parent is missing.

    :raises ParentReplaced: a parent is a symlink or not a directory any more.
    """
    fd = os.dup(ws_fd)
    for i, part in enumerate(parts):
        try:
            nfd = _open_dir(fd, part)
        except FileNotFoundError:
            os.close(fd)
            return None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ParentReplaced("/".join(parts[: i + 1])) from None
            raise
        os.close(fd)
        fd = nfd
    return fd


def _scan_into(
    parent_fd: int,
    name: str,
    rel: str,
    out: dict[str, Entry],
    *,
    hash_files: bool,
    backup: Path | None,
    depth: int = 0,
) -> None:
    if len(out) >= MAX_ENTRIES or depth > MAX_DEPTH:
        raise TreeTooLarge(rel)
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    entry = _stat_entry(st)
    out[rel] = entry
    if entry.type == "symlink":
        entry.target = os.readlink(name, dir_fd=parent_fd)
    elif entry.type == "file" and (hash_files or backup is not None):
        if backup is not None:
            backup.parent.mkdir(parents=True, exist_ok=True)
            with open(backup, "wb") as f:
                entry.sha256 = _read_file(parent_fd, name, f.write)
        else:
            entry.sha256 = _read_file(parent_fd, name, None)
    elif entry.type == "dir":
        if backup is not None:
            backup.mkdir(parents=True, exist_ok=True)
        with _opened(_open_dir(parent_fd, name)) as fd:
            for child in sorted(os.listdir(fd)):
                _scan_into(
                    fd,
                    child,
                    f"{rel}/{child}",
                    out,
                    hash_files=hash_files,
                    backup=backup / child if backup is not None else None,
                    depth=depth + 1,
                )


def scan(
    workspace: Path, rel: str, *, hash_files: bool = True, backup: Path | None = None
) -> dict[str, Entry]:
    """Every entry at and below `rel`, keyed by workspace-relative path.

    :raises ParentReplaced: a directory on the way is a symlink or a file now.
    :raises TreeTooLarge: more than MAX_ENTRIES entries or deeper than MAX_DEPTH.
    """
    parts = rel.split("/")
    with _opened(os.open(workspace, _DIR_FLAGS)) as ws_fd:
        parent = _walk_parents(ws_fd, parts[:-1])
        if parent is None:
            return {}
        out: dict[str, Entry] = {}
        with _opened(parent):
            _scan_into(parent, parts[-1], rel, out, hash_files=hash_files, backup=backup)
        return out


def diff(recorded: dict[str, Entry], found: dict[str, Entry]) -> list[Change]:
    """Changes from the record, with contents compared by hash (both sides hashed)."""
    changes = []
    for rel in sorted(set(recorded) | set(found)):
        old, new = recorded.get(rel), found.get(rel)
        if old is None:
            changes.append(Change(rel, "added"))
        elif new is None:
            changes.append(Change(rel, "removed"))
        elif old.type != new.type:
            changes.append(Change(rel, "type"))
        elif old.sha256 != new.sha256 or old.target != new.target:
            changes.append(Change(rel, "content"))
        elif old.mode != new.mode:
            changes.append(Change(rel, "mode"))
    return changes


# -- the guard -----------------------------------------------------------------------------


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class Guard:
    """The record, copy and verification of one container's protected paths."""

    def __init__(self, container: str, home: Path | None = None) -> None:
        self.container = container
        self.home = home or coi_home()
        self.dir = self.home / "protected" / container
        self.audit = AuditLog(container, self.home)

    # -- state ----------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def _load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        data["entries"] = {
            top: {rel: Entry(**e) for rel, e in entries.items()}
            for top, entries in data["entries"].items()
        }
        return data

    def _save(self, data: dict[str, Any]) -> None:
        out = dict(data)
        out["entries"] = {
            top: {rel: asdict(e) for rel, e in entries.items()}
            for top, entries in data["entries"].items()
        }
        write_atomic(self.manifest_path, json.dumps(out, indent=1))

    def forget(self) -> None:
        """Drop the record and copy (the container is gone and was verified)."""
        # Under the lock: a `coi clean` and the settle of `coi run` may verify the same
        # container at once; the one that comes second must not read half a removal.
        with held(self.dir / "lock"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- record ---------------------------------------------------------------------------

    def record(self, p: ProtectionPlan) -> list[str]:
        """Record and copy every protected path of the plan; returns notes for the user."""
        notes: list[str] = []
        with held(self.dir / "lock"):
            backup = self.dir / "backup"
            shutil.rmtree(backup, ignore_errors=True)
            entries: dict[str, dict[str, Entry]] = {}
            copied: dict[str, bool] = {}
            for path in p.paths:
                try:
                    found = scan(p.workspace, path.rel, backup=backup / path.rel)
                except (TreeTooLarge, ParentReplaced) as err:
                    notes.append(f"{path.rel}: not watched ({type(err).__name__})")
                    continue
                size = sum(e.size for e in found.values())
                copied[path.rel] = size <= MAX_COPY_BYTES
                if not copied[path.rel]:
                    shutil.rmtree(backup / path.rel, ignore_errors=True)
                    notes.append(f"{path.rel}: {size} bytes, watched without a copy to restore")
                entries[path.rel] = found
            git_ino = 0
            try:
                git_ino = os.lstat(p.workspace / ".git").st_ino
            except FileNotFoundError:
                pass
            self._save(
                {
                    "workspace": str(p.workspace),
                    "recorded_at": time.time(),
                    "git_ino": git_ino,
                    "copied": copied,
                    "entries": entries,
                }
            )
        return notes

    # -- verify ---------------------------------------------------------------------------

    def enforce(self, log: Log | None = None) -> Report:
        """Compare with the record; put back what changed; tell the user and the audit log."""
        report = Report()
        if not self.exists():
            return report
        with held(self.dir / "lock"):
            if not self.exists():
                # Verified and forgotten by another coi since the look above (the lock
                # file alone was made again by this one): nothing is left to check.
                shutil.rmtree(self.dir, ignore_errors=True)
                return report
            data = self._load()
            workspace = Path(data["workspace"])
            if not workspace.is_dir():
                return report
            self._recover_git_dir(workspace, data, report)
            # One folder for everything this check sets aside (not one per second ticked).
            quarantine = (
                self.home / "quarantine" / self.container / f"{_stamp()}-{uuid.uuid4().hex[:6]}"
            )
            dirty = False
            for top, recorded in data["entries"].items():
                changes = self._changes(workspace, top, recorded)
                if changes is None:  # same as recorded; stat fields were refreshed
                    dirty = True
                    continue
                if not changes:
                    continue
                report.changes.extend(changes)
                self._restore(workspace, top, data, report, quarantine)
                dirty = True
            if dirty:
                self._save(data)
        if report.changes or report.notes:
            self._tell(report, log)
        return report

    def _changes(
        self, workspace: Path, top: str, recorded: dict[str, Entry]
    ) -> list[Change] | None:
        """Changes of one protected path; [] unchanged; None unchanged but re-stat'ed."""
        try:
            quick = scan(workspace, top, hash_files=False)
        except ParentReplaced as err:
            return [Change(err.rel, "replaced")]
        except TreeTooLarge:
            return [Change(top, "added")]
        if quick.keys() == recorded.keys() and all(quick[k].same_stat(recorded[k]) for k in quick):
            return []
        try:
            found = scan(workspace, top)
        except ParentReplaced as err:
            return [Change(err.rel, "replaced")]
        except TreeTooLarge:
            return [Change(top, "added")]
        changes = diff(recorded, found)
        if changes:
            return changes
        # Touched but identical (same bytes and modes): remember the new stat, no alarm.
        recorded.clear()
        recorded.update(found)
        return None

    def _recover_git_dir(self, workspace: Path, data: dict[str, Any], report: Report) -> None:
        """If `.git` was moved aside and replaced, move the real one back."""
        want = int(data.get("git_ino") or 0)
        if not want:
            return
        git = workspace / ".git"
        try:
            if os.lstat(git).st_ino == want:
                return
        except FileNotFoundError:
            pass
        with os.scandir(workspace) as it:
            original = next(
                (e for e in it if e.inode() == want and e.is_dir(follow_symlinks=False)), None
            )
        if original is None:
            report.notes.append(
                ".git is not the directory recorded at session start and the original "
                "was not found at the top of the workspace"
            )
            return
        if os.path.lexists(git):
            aside = f".git.coi-tampered-{_stamp()}"
            os.rename(git, workspace / aside)
            report.notes.append(f"the .git found was moved to {aside}")
        os.rename(original.path, git)
        report.changes.append(Change(".git", "replaced"))
        report.restored.append(f".git (moved back from {original.name})")

    # -- restore --------------------------------------------------------------------------

    def _restore(
        self, workspace: Path, top: str, data: dict[str, Any], report: Report, quarantine: Path
    ) -> None:
        recorded: dict[str, Entry] = data["entries"][top]
        if recorded and not data["copied"].get(top):
            report.failed.append(f"{top} (no copy: it was too large to keep)")
            return
        parts = top.split("/")
        try:
            with (
                _opened(os.open(workspace, _DIR_FLAGS)) as ws_fd,
                _opened(self._parent_for_restore(ws_fd, parts[:-1], quarantine)) as pfd,
            ):
                self._evict(pfd, parts[-1], top, quarantine, report)
                if recorded:
                    self._put_back(pfd, parts[-1], top, recorded, self.dir / "backup")
            found = scan(workspace, top)
        except (OSError, ParentReplaced, TreeTooLarge) as err:
            report.failed.append(f"{top} ({err})")
            return
        if diff(recorded, found):
            report.failed.append(f"{top} (still differs after restoring)")
            return
        recorded.clear()
        recorded.update(found)
        report.restored.append(top)

    def _parent_for_restore(self, ws_fd: int, parts: list[str], quarantine: Path) -> int:
        """Open (creating or reclaiming) each directory above the protected path."""
        fd = os.dup(ws_fd)
        for part in parts:
            try:
                nfd = _open_dir(fd, part)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = _open_dir(fd, part)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    os.close(fd)
                    raise
                # A link or file where a directory was: keep it as evidence, then replace it.
                self._evict(fd, part, part, quarantine, Report())
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = _open_dir(fd, part)
            os.close(fd)
            fd = nfd
        return fd

    def _evict(self, pfd: int, name: str, rel: str, quarantine: Path, report: Report) -> None:
        """Copy what is there to the quarantine, then remove it (or move it aside)."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        _copy_out(pfd, name, quarantine / rel, [QUARANTINE_BYTES])
        report.quarantine = quarantine
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
        except OSError:
            # Made by root inside the container (another host uid): coi may not delete it,
            # but it may rename it in a directory the user owns.
            aside = f"{name}.coi-tampered-{_stamp()}"
            os.rename(name, aside, src_dir_fd=pfd, dst_dir_fd=pfd)
            report.notes.append(f"could not delete the changed {rel}: moved it to {aside}")

    def _put_back(
        self, pfd: int, name: str, rel: str, recorded: dict[str, Entry], backup: Path
    ) -> None:
        e = recorded[rel]
        if e.type == "symlink":
            os.symlink(e.target, name, dir_fd=pfd)
            return
        if e.type == "dir":
            os.mkdir(name, 0o700, dir_fd=pfd)
            with _opened(_open_dir(pfd, name)) as fd:
                prefix = rel + "/"
                children = sorted(
                    k[len(prefix) :]
                    for k in recorded
                    if k.startswith(prefix) and "/" not in k[len(prefix) :]
                )
                for child in children:
                    self._put_back(fd, child, prefix + child, recorded, backup)
                self._finish(fd, e)
            return
        if e.type == "file":
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with _opened(os.open(name, flags, 0o600, dir_fd=pfd)) as fd:
                with open(backup / rel, "rb") as src:
                    while chunk := src.read(1 << 20):
                        os.write(fd, chunk)
                self._finish(fd, e)

    @staticmethod
    def _finish(fd: int, e: Entry) -> None:
        if os.geteuid() == 0:
            os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    # -- telling --------------------------------------------------------------------------

    def _tell(self, report: Report, log: Log | None) -> None:
        action = "restored" if report.restored and not report.failed else "alerted"
        where = str(report.quarantine) if report.quarantine else None
        self.audit.write(
            Event(
                level="high",
                category="protected_path",
                title="Protected path modified",
                description="; ".join(str(c) for c in report.changes) or "; ".join(report.notes),
                evidence={
                    "changes": [asdict(c) for c in report.changes],
                    "restored": report.restored,
                    "failed": report.failed,
                    "quarantine": where,
                    "notes": report.notes,
                },
                action=action,
            )
        )
        if log is None:
            return
        lines = [f"⚠ PROTECTED PATHS CHANGED in {self.container}"]
        lines += [f"  {c}" for c in report.changes]
        if report.restored:
            restored = ", ".join(report.restored)
            lines.append(f"→ Restored from the copy taken at session start: {restored}")
        for f in report.failed:
            lines.append(f"→ NOT restored: {f}")
        for n in report.notes:
            lines.append(f"→ {n}")
        if where:
            lines.append(f"→ The changed files are kept in {where}")
        lines.append(f"→ Logged to audit: {self.audit.path}")
        log("\n".join(lines))


def _copy_out(pfd: int, name: str, dest: Path, budget: list[int], depth: int = 0) -> None:
    """Evidence copy of an entry (no links followed), within a byte budget and depth."""
    if depth > MAX_DEPTH:
        return
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if stat.S_ISLNK(st.st_mode):
        dest.with_name(dest.name + ".symlink").write_text(os.readlink(name, dir_fd=pfd) + "\n")
    elif stat.S_ISREG(st.st_mode):
        if st.st_size > budget[0]:
            dest.with_name(dest.name + ".too-large").write_text(f"{st.st_size} bytes\n")
            return
        budget[0] -= st.st_size
        with open(dest, "wb") as f:
            _read_file(pfd, name, f.write)
    elif stat.S_ISDIR(st.st_mode):
        dest.mkdir(exist_ok=True)
        with _opened(_open_dir(pfd, name)) as fd:
            for child in sorted(os.listdir(fd))[:MAX_ENTRIES]:
                _copy_out(fd, child, dest / child, budget, depth + 1)


@contextmanager
def watching(guard: Guard | None, interval: float, log: Log) -> Iterator[None]:
    """Verify every `interval` seconds in a thread while the block runs (no-op without a guard)."""
    if guard is None or interval <= 0:
        yield
        return
    import threading

    stop = threading.Event()

    def loop() -> None:
        failures = 0
        while not stop.wait(interval):
            try:
                guard.enforce(log)
                failures = 0
            except Exception as err:  # the watch must outlive a bad sweep
                failures += 1
                if failures == 1:
                    log(f"Warning: protected path check failed: {err}")

    thread = threading.Thread(target=loop, name="coi-protect", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def settle(container: str, *, removed: bool, log: Log | None = None) -> Report:
    """Verify a container's protected paths now; drop the record once the container is gone."""
    guard = Guard(container)
    report = guard.enforce(log)
    if removed:
        guard.forget()
    return report


def settle_when_gone(container: str, operation: str, *, project: str, remote: str | None) -> int:
    """Start a detached `settle` that runs once the container has stopped existing.

    `coi run` leaves the removal of its sandbox to the daemon and returns at once; the last
    check of the protected paths must come after every process inside is dead, so a small
    host process waits on the daemon's stop operation (at most 60 s), then verifies and
    restores.
    """
    import subprocess
    import sys

    argv = [sys.executable, "-m", "coi.protection.guard", container, "--project", project]
    argv += ["--operation", operation]
    if remote:
        argv += ["--remote", remote]
    # Not on coi's stdout: `out=$(coi run -- cmd)` (any reader of the command's output)
    # would wait for this process, that is for the daemon's stop, before it saw the end. Its
    # words (what it restored) still go to coi's stderr.
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    return proc.pid


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    import time

    from coi.backend.client import IncusClient
    from coi.errors import CoiError, NotFound

    ap = argparse.ArgumentParser(prog="coi-settle")
    ap.add_argument("container")
    ap.add_argument("--project", default="default")
    ap.add_argument("--remote", default=None)
    ap.add_argument("--operation", default="")
    a = ap.parse_args(argv)

    def log(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    try:
        with IncusClient.connect(remote=a.remote, project=a.project) as client:
            if a.operation not in ("", "-"):
                # The daemon holds this request until the stop is done: no polling.
                try:
                    client.wait_operation(a.operation, what=f"stop {a.container}", timeout=60)
                except NotFound:
                    pass  # finished long enough ago for the daemon to forget it
            # An ephemeral container's deletion follows its stop by a few milliseconds.
            deadline = time.monotonic() + 10
            while client.instances.exists(a.container) and time.monotonic() < deadline:
                time.sleep(0.05)
            gone = not client.instances.exists(a.container)
    except CoiError as err:
        log(f"Warning: could not watch {a.container} go ({err}); checking now")
        gone = False
    settle(a.container, removed=gone, log=log)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
