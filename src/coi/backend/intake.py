"""What comes out of a container is data: which entries a copy out keeps, their host modes,
the names it accepts, and writing them on the host without following any link."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from coi.errors import BackendError, UsageError

# Names of what is never copied out: a link would point the host at the host's own files, a
# device node or FIFO is no data at all (reading one blocks or never ends).
_DROPPED_KINDS = {
    stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}

# Bits a host file never gets from a container: setuid/setgid would make the agent's
# program run as whoever pulled it (often root); sticky means nothing on a pulled copy;
# world-writable would let any host user change (or plant links in) what was pulled.
_STRIPPED_BITS = (
    (stat.S_ISUID, "setuid bit"),
    (stat.S_ISGID, "setgid bit"),
    (stat.S_ISVTX, "sticky bit"),
    (stat.S_IWOTH, "world-writable bit"),
)

SHOWN_LIMIT = 20  # warning lines a copy prints before it summarizes the rest


def kind_of(mode: int | None) -> str:
    """`file`, `directory`, or why an entry of this full st_mode is not copied."""
    if mode is None:
        return "entry of unknown type"
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFREG:
        return "file"
    if fmt == stat.S_IFDIR:
        return "directory"
    return _DROPPED_KINDS.get(fmt, f"entry of unknown type {fmt:o}")


def host_mode(mode: int, *, directory: bool) -> tuple[int, list[str]]:
    """The permission bits a copied entry gets on the host, and the names of bits removed.

    Directories keep rwx for their owner so the user can always read and remove what coi
    wrote (a container could hand out a mode 000 tree that not even `rm -r` gets through).
    """
    removed = [name for bit, name in _STRIPPED_BITS if mode & bit]
    keep = stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH)
    if directory:
        keep |= stat.S_IRWXU
    return keep, removed


def check_name(name: bytes | str, where: str) -> None:
    """A directory entry's name from the container must be one plain name.

    :raises BackendError: empty, `.`/`..`, or holding `/` or NUL; a daemon never lists such
        a name, so it is refused rather than joined to a host path.
    """
    raw = os.fsencode(name)
    if raw in (b"", b".", b"..") or b"/" in raw or b"\0" in raw:
        raise BackendError(f"refusing unsafe file name {shown(raw)} in {where}")


def shown(text: bytes | str) -> str:
    """A name from the container made safe to print: control characters (which could drive
    the user's terminal) and undecodable bytes are escaped."""
    s = os.fsdecode(text) if isinstance(text, bytes) else text
    out = []
    for ch in s:
        if ch.isprintable() and ch != "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


@dataclass
class PullReport:
    """What a copy out of a container wrote, and what it left out or changed."""

    entries: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (path inside, why)
    changed: list[tuple[str, str]] = field(default_factory=list)  # (path inside, bits removed)

    def drop(self, path: str, why: str) -> None:
        self.dropped.append((path, why))

    def strip(self, path: str, removed: Iterable[str]) -> None:
        names = list(removed)
        if names:
            self.changed.append((path, " and ".join(names)))

    def warnings(self, limit: int = SHOWN_LIMIT) -> list[str]:
        """One line per entry left out or changed, the first `limit` of them, then a count."""
        lines = [f"not copied: {shown(p)} ({shown(why)})" for p, why in self.dropped]
        lines += [f"{shown(p)}: copied without its {what}" for p, what in self.changed]
        if len(lines) > limit:
            rest = len(lines) - limit
            lines = [*lines[:limit], f"... and {rest} more not copied or changed"]
        return lines


def check_destination(dest: Path, *, trusted: Iterable[Path] = ()) -> Path:
    """`dest` made absolute, after checking no component of it is a symbolic link.

    Components inside a `trusted` folder that lexically prefixes `dest` (the current folder,
    the home folder: the user's own set-up, such as a home reached through a link) are
    checked only below it. coi never writes through a link, whoever made it.

    :raises UsageError: a component is a symbolic link.
    """
    dest = Path(os.path.abspath(dest))
    start = Path(dest.anchor)
    for anchor in trusted:
        anchor = Path(os.path.abspath(anchor))
        inside = dest == anchor or anchor in dest.parents
        if inside and len(anchor.parts) > len(start.parts):
            start = anchor
    path = start
    for part in dest.parts[len(start.parts) :]:
        path = path / part
        if path.is_symlink():
            raise UsageError(
                f"destination goes through a symbolic link: {path} -> {os.readlink(path)}",
                details="coi does not write through links on the host, whoever made them.",
                resolution="Name the real folder instead, or remove the link.",
            )
    return dest


def new_file(path: Path) -> int:
    """Create `path` for writing (mode 0600): never an existing entry, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o600)


def sanitize_tree(root: Path, report: PullReport | None = None) -> PullReport:
    """Make a tree on the host hold only data: remove every entry that is not a plain file
    or directory and the bits `host_mode` removes (for trees that came out of a sandbox by
    another way than a pull, e.g. copies of older saved state)."""
    report = PullReport() if report is None else report
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = kind_of(st.st_mode)
            rel = str(p.relative_to(root))
            if kind not in ("file", "directory"):
                p.unlink()
                report.drop(rel, kind)
                if name in dirnames:
                    dirnames.remove(name)
                continue
            mode, removed = host_mode(st.st_mode, directory=kind == "directory")
            if mode != stat.S_IMODE(st.st_mode):
                os.chmod(p, mode)
            report.strip(rel, removed)
            report.entries += 1
    return report


def part_prefix(local: Path, kind: str) -> str:
    """The name a pull's temporary file or folder beside `local` starts with: it carries this
    process's id, so a pull killed half way is recognised, and removed, by the next one."""
    return f".{local.name}.{kind}-{os.getpid()}-"


def drop_stale_parts(local: Path) -> list[Path]:
    """Remove what pulls into `local` that died half way (kill -9) left beside it: their
    temporary files and folders, named by `part_prefix`, of processes that no longer run."""
    import shutil

    gone: list[Path] = []
    if not local.parent.is_dir():
        return gone
    for p in local.parent.glob(f".{glob_escape(local.name)}.*-*-*"):
        kind, _, rest = p.name[len(local.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("part", "pull") or not pid.isdigit() or _runs(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
