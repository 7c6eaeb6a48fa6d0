"""What changed from a review's base/ to its work/: files added, modified, deleted, text
diffs (difflib), counts, and what was refused (not a plain file or folder), with reasons.

Nothing from the trees is run or followed: no git, no hooks, no attributes; every entry is
lstat'ed, and read only when it is a regular file (O_NOFOLLOW|O_NONBLOCK, coi.review.tree).
"""

from __future__ import annotations

import difflib
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coi.review.tree import Entry, Unsafe, read_file, same_content, walk

if TYPE_CHECKING:
    from coi.review.copy import Review
    from coi.review.gitbranch import Commits

DEFAULT_MAX_FILE = 100 * 2**20

# Control characters shown escaped; a CR is let through only as part of a CRLF line end.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|\r(?!\n)")


# Files host tools read as instructions that are not protected paths by default: applied
# like any file, but flagged so the reader looks twice (`coi diff --stat`, `coi apply`).
WATCHED = {
    ".gitattributes": "host git reads its filter, diff and merge drivers",
    ".gitmodules": "host git reads its submodule URLs and update commands",
    ".envrc": "direnv runs it when you enter the folder (once allowed)",
    ".npmrc": "npm reads its registry, scripts and credentials settings",
    ".pre-commit-config.yaml": "pre-commit runs the hooks it names",
}


def watched(rel: str) -> str:
    """Why a changed path deserves a second look ('' when it does not)."""
    return WATCHED.get(rel.rsplit("/", 1)[-1], "")


@dataclass
class Change:
    """One path that differs."""

    path: str
    status: str  # added, modified, deleted, refused
    binary: bool = False
    added: int = 0  # lines
    removed: int = 0
    reason: str = ""  # why refused
    mode: int = 0  # the new file's mode (work side), 0 for a deletion
    text: str = ""  # the unified diff (text files only)
    note: str = ""  # why to look twice (WATCHED)

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "status": self.status}
        if self.status == "refused":
            out["reason"] = self.reason
        else:
            out.update(binary=self.binary, added=self.added, removed=self.removed)
            if self.note:
                out["note"] = self.note
        return out


@dataclass
class Diff:
    """Every change of one review, in path order."""

    changes: list[Change] = field(default_factory=list)
    # Git mode: changes under .git/, left out of `changes` (the agent's commits come instead).
    git_files: list[str] = field(default_factory=list)

    @property
    def refused(self) -> list[Change]:
        return [c for c in self.changes if c.status == "refused"]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("added", "modified", "deleted", "refused"), 0)
        for c in self.changes:
            out[c.status] += 1
        out["lines_added"] = sum(c.added for c in self.changes)
        out["lines_removed"] = sum(c.removed for c in self.changes)
        return out


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (escape sequences that could hide or
    redraw lines) and undecodable bytes are shown escaped, not sent."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def refusal(entry: Entry, max_file: int) -> str:
    """Why an entry is not handled ('' when it is a plain file or folder within the cap)."""
    if entry.kind == "symlink":
        return f"symbolic link (to {printable(entry.target)!r}): not followed"
    if entry.kind == "fifo":
        return "FIFO (named pipe): not opened"
    if entry.kind == "socket":
        return "socket: not opened"
    if entry.kind == "device":
        return "device file: not opened"
    if entry.kind == "deep":
        return "folders nested deeper than 128 levels: not read"
    if entry.kind not in ("file", "dir"):
        return "not a plain file or folder"
    if entry.kind == "file" and entry.mode & (stat.S_ISUID | stat.S_ISGID):
        return "setuid/setgid file: not taken"
    if entry.kind == "file" and max_file and entry.size > max_file:
        return f"{entry.size} bytes: over the {max_file}-byte review.max_file_size cap"
    return ""


def is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def line_counts(old: bytes, new: bytes) -> tuple[int, int, str]:
    """(lines added, lines removed, the unified diff body without its header)."""
    # Lines end at LF only (str.splitlines would also cut at CR, VT, FF, U+2028...).
    a = [line for line in re.split(r"(?<=\n)", old.decode()) if line]
    b = [line for line in re.split(r"(?<=\n)", new.decode()) if line]
    added = removed = 0
    out: list[str] = []
    for line in list(difflib.unified_diff(a, b, n=3))[2:]:
        if line.startswith("+"):
            added += 1
        elif line.startswith("-"):
            removed += 1
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return added, removed, "".join(out)


def same_file(root_a: str, root_b: str, rel: str, a: Entry, b: Entry) -> bool:
    """Same bytes and the same mode bits (a file's mode is part of what the agent changed)."""
    if a.size != b.size or a.mode != b.mode:
        return False
    return same_content(root_a, root_b, rel)


def _untouched(
    rel: str, a: Entry, b: Entry, index: Mapping[str, list[int]] | None, snapshots: bool
) -> bool:
    """Whether work's file is still the one copied from base (no change moves ctime back)."""
    if index is not None and index.get(rel) == b.stamp() and a.mode == b.mode:
        return True  # untouched since it was copied from base/
    return snapshots and a.stamp() == b.stamp()  # the snapshot's own file


def compare(
    base: str,
    work: str,
    *,
    max_file: int = DEFAULT_MAX_FILE,
    index: Mapping[str, list[int]] | None = None,
    snapshots: bool = False,
) -> Diff:
    """The changes from `base` to `work` (both folders), refused entries included.

    `index` (the review's record of work/ as copied from base/): a file whose inode and
    ctime are still those is not read, it is base's. With `snapshots` (work/ a btrfs
    snapshot of base/), a file with base's own inode and ctime is base's. Anything else is
    compared byte by byte.
    """
    old, new = walk(base), walk(work)
    diff = Diff()
    for rel in sorted(old.keys() | new.keys()):
        a, b = old.get(rel), new.get(rel)
        if a is not None and b is not None and a.kind == b.kind:
            if a.kind == "dir":
                continue
            if a.kind == "symlink" and a.target == b.target:
                continue  # a link the user had, left as it was
            if a.kind != "file":
                if a == b:
                    continue
                diff.changes.append(Change(rel, "refused", reason=refusal(b, max_file)))
                continue
            if _untouched(rel, a, b, index, snapshots):
                continue
            try:
                if same_file(base, work, rel, a, b):
                    continue  # unchanged, even when it is big or setuid in the user's folder
            except Unsafe as err:
                diff.changes.append(Change(rel, "refused", reason=str(err)))
                continue
        # A path the agent added, changed or removed: each side must be a plain file/folder.
        why = refusal(b, max_file) if b is not None else ""
        if not why and a is not None and a.kind not in ("file", "dir"):
            why = refusal(a, max_file)  # a link or special file of the user's, removed/replaced
        if not why and a is not None and b is not None and a.kind == "dir" != b.kind:
            why = "a folder replaced by a file: not handled, change it by hand"
        if why:
            diff.changes.append(Change(rel, "refused", reason=why))
            continue
        try:
            change = _change(base, work, rel, a, b, max_file)
        except Unsafe as err:  # swapped for something else while we read
            change = Change(rel, "refused", reason=str(err))
        if change is not None:
            change.note = watched(rel) if change.status != "deleted" else ""
            diff.changes.append(change)
    return diff


def compare_review(
    review: Review, *, max_file: int = DEFAULT_MAX_FILE, commits: bool = True
) -> tuple[Diff, Commits | None]:
    """A review's changes; in git mode (coi.review.gitbranch) without git's own files, which
    are never applied as files, and with the agent's new commits instead (None otherwise, or
    without `commits`: `coi apply` finds them once, as it makes their branch)."""
    from coi.review import gitbranch

    diff = compare(
        review.base,
        review.work,
        max_file=max_file,
        index=review.index(),
        snapshots=review.snapshots,
    )
    if not gitbranch.is_git(review):
        return diff, None
    diff.git_files = [c.path for c in diff.changes if gitbranch.in_git(c.path)]
    diff.changes = [c for c in diff.changes if not gitbranch.in_git(c.path)]
    return diff, gitbranch.commits(review) if commits else None


def _change(
    base: str, work: str, rel: str, a: Entry | None, b: Entry | None, cap: int
) -> Change | None:
    a_file = a is not None and a.kind == "file"
    b_file = b is not None and b.kind == "file"
    if a_file and b_file:
        status = "modified"  # compare() has seen they differ
    elif b_file:
        status = "added"  # new, or a folder in base replaced by this file
    elif a_file:
        status = "deleted"  # gone, or replaced by a folder
    else:
        return None  # folders appearing or going: their files say what changed
    change = Change(rel, status, mode=b.mode if b is not None and b_file else 0)
    if a_file and a is not None and cap and a.size > cap:
        change.binary = True  # the user's own big file, changed or removed: not read
        return change
    old = read_file(base, rel, cap) if a_file else b""
    new = read_file(work, rel, cap) if b_file else b""
    if not (is_text(old) and is_text(new)):
        change.binary = True
        return change
    change.added, change.removed, body = line_counts(old, new)
    src = f"a/{rel}" if a_file else "/dev/null"
    dst = f"b/{rel}" if b_file else "/dev/null"
    header = f"diff --coi a/{rel} b/{rel}\n"
    if a is not None and b is not None and a_file and b_file and a.mode != b.mode:
        header += f"old mode {a.mode:o}\nnew mode {b.mode:o}\n"
    change.text = header + (f"--- {src}\n+++ {dst}\n" + body if body else "")
    return change


def render_text(diff: Diff) -> str:
    """The whole diff for a terminal: unified diffs, binary files named, refusals listed."""
    out: list[str] = []
    for c in diff.changes:
        if c.status == "refused":
            out.append(f"refused {c.path}: {c.reason}\n")
        elif c.binary:
            out.append(f"Binary file {c.path} {c.status}\n")
        else:
            out.append(c.text)
    return printable("".join(out))


def render_stat(diff: Diff) -> str:
    """`git diff --stat`-like: one line per path, then the totals."""
    if not diff.changes:
        return "No changes.\n"
    width = max(len(c.path) for c in diff.changes)
    lines = []
    for c in diff.changes:
        if c.status == "refused":
            what = f"refused: {c.reason}"
        elif c.binary:
            what = f"binary ({c.status})"
        else:
            what = f"{c.added + c.removed:>5} " + "+" * min(c.added, 40) + "-" * min(c.removed, 40)
        lines.append(f" {c.path:<{width}} | {what}" + (f"  (note: {c.note})" if c.note else ""))
    n = diff.counts()
    changed = n["added"] + n["modified"] + n["deleted"]
    tail = (
        f" {changed} file{'s' if changed != 1 else ''} changed"
        f" ({n['added']} added, {n['modified']} modified, {n['deleted']} deleted),"
        f" {n['lines_added']} insertions(+), {n['lines_removed']} deletions(-)"
    )
    if n["refused"]:
        tail += f", {n['refused']} refused"
    return printable("\n".join(lines) + "\n" + tail + "\n")
