"""Bringing a review's changes into the user's folder: a three-way merge per path against
what the user changed meanwhile; all or nothing unless asked for the clean files only."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from coi.errors import CoiError
from coi.locks import held
from coi.review import gitbranch
from coi.review.copy import Review, mark_applied
from coi.review.diff import DEFAULT_MAX_FILE, Change, compare_review, is_text
from coi.review.gitbranch import Commits
from coi.review.tree import (
    Entry,
    Unsafe,
    lstat_at,
    read_file,
    remove_empty_dir,
    remove_file,
    same_content,
    walk,
    write_file,
)

# What a written file may keep of the mode the agent gave it: no setuid, setgid, sticky or
# world-writable bit.
MODE_MASK = 0o775
LABELS = ("-L", "yours", "-L", "base", "-L", "review")


@dataclass
class Step:
    """What apply does (or would do) for one path."""

    path: str
    action: str  # write, delete, none
    how: str  # added, taken, merged, deleted, already
    data: bytes = b""
    mode: int = 0o644
    ours: Entry | None = None  # the user's file when planned: rechecked before it is replaced
    note: str = ""  # why to look twice (coi.review.diff.WATCHED)


@dataclass
class Applied:
    """The outcome: what was written, and what was not, each with its reason."""

    review: Review
    steps: list[Step] = field(default_factory=list)  # planned (and, if `written`, done)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    written: bool = False
    # Git mode (coi.review.gitbranch): the agent's new commits, the branch made of them,
    # and the changes under .git/ that are never applied as files.
    commits: Commits | None = None
    branch: str = ""
    git_files: list[str] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return bool(self.conflicts or self.refused)


def is_protected(rel: str, patterns: list[str]) -> str:
    """The protected pattern `rel` is (or is under); '' when none. `*` matches one component."""
    parts = rel.split("/")
    for pattern in patterns:
        pp = pattern.split("/")
        if len(parts) >= len(pp) and all(
            fnmatch.fnmatchcase(parts[i], pp[i]) for i in range(len(pp))
        ):
            return pattern
    return ""


def git_env(tmp: str) -> dict[str, str]:
    """An environment in which git reads no config, attributes or hooks of anyone's: no
    system or global config, HOME and XDG_CONFIG_HOME in an empty folder, no repository
    found above the working folder, nothing inherited (GIT_CONFIG_PARAMETERS, GIT_DIR...)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": tmp,
        "XDG_CONFIG_HOME": tmp,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_CEILING_DIRECTORIES": os.path.dirname(tmp),
        "LC_ALL": "C",
    }


def merge_text(ours: bytes, base: bytes, theirs: bytes) -> tuple[bytes, int]:
    """`git merge-file -p --diff3` on three temporary files in a private empty folder:
    (the result, the number of conflicting hunks; 0 is a clean merge).

    :raises CoiError: git is missing or failed.
    """
    git = shutil.which("git")
    if git is None:
        raise CoiError("git is not installed: a file changed on both sides cannot be merged")
    tmp = tempfile.mkdtemp(prefix="coi-merge-")
    try:
        for name, data in (("yours", ours), ("base", base), ("review", theirs)):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        res = subprocess.run(
            [git, "merge-file", "-p", "--diff3", *LABELS, "yours", "base", "review"],
            cwd=tmp,
            env=git_env(tmp),
            capture_output=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if res.returncode < 0 or res.returncode > 127:
        raise CoiError("git merge-file failed", details=res.stderr.decode(errors="replace"))
    return res.stdout, res.returncode


def _plan_one(review: Review, ws: str, c: Change, cap: int) -> Step | tuple[str, str]:
    """A step, or (`conflict` or `refused`, reason)."""
    try:
        ours = lstat_at(ws, c.path)
    except Unsafe as err:
        return ("refused", f"in your folder, {err}: not written through")
    if ours is not None and ours.kind != "file":
        return ("conflict", f"in your folder it is a {ours.kind}, not a file")
    if c.status == "deleted":
        if ours is None:
            return Step(c.path, "none", "already")
        base = lstat_at(review.base, c.path)
        if base is not None and ours.mode == base.mode and same_content(ws, review.base, c.path):
            return Step(c.path, "delete", "deleted", ours=ours)
        return ("conflict", "changed in your folder, deleted in the review")
    theirs = read_file(review.work, c.path, cap)
    mode = c.mode & MODE_MASK
    if ours is not None and ours.mode & MODE_MASK == mode and same_content(ws, review.work, c.path):
        return Step(c.path, "none", "already")
    if c.status == "added":
        if ours is None:
            return Step(c.path, "write", "added", theirs, mode)
        return ("conflict", "added in your folder too, with other content")
    if ours is None:
        return ("conflict", "deleted in your folder, changed in the review")
    base_entry = lstat_at(review.base, c.path)
    if (
        base_entry is not None
        and ours.mode == base_entry.mode
        and same_content(ws, review.base, c.path)
    ):
        return Step(c.path, "write", "taken", theirs, mode, ours)
    # Both changed it: a text merge, never of binary files.
    try:
        mine = read_file(ws, c.path, cap)
        old = read_file(review.base, c.path, cap)
    except Unsafe as err:
        return ("conflict", f"changed on both sides and not mergeable: {err}")
    if not (is_text(mine) and is_text(old) and is_text(theirs)):
        return ("conflict", "binary file changed on both sides")
    merged, hunks = merge_text(mine, old, theirs)
    if hunks:
        return ("conflict", f"changed on both sides: {hunks} conflicting hunk(s)")
    return Step(c.path, "write", "merged", merged, ours.mode & MODE_MASK, ours)


def plan(
    review: Review,
    *,
    protected: list[str],
    include_protected: bool = False,
    max_file: int = DEFAULT_MAX_FILE,
) -> Applied:
    """What applying `review` would do, nothing written."""
    ws = review.workspace
    result = Applied(review)
    # The agent's commits are not looked for here: `apply` finds them once, as it makes
    # their branch (before any file is written).
    diff, _ = compare_review(review, max_file=max_file, commits=False)
    result.git_files = diff.git_files
    for c in diff.changes:
        if c.status == "refused":
            result.refused.append((c.path, c.reason))
            continue
        pattern = is_protected(c.path, protected)
        if pattern and not include_protected:
            result.refused.append(
                (c.path, f"protected path ({pattern}): only with --include-protected")
            )
            continue
        try:
            got = _plan_one(review, ws, c, max_file)
        except Unsafe as err:
            got = ("refused", str(err))
        if isinstance(got, Step):
            got.note = c.note
            result.steps.append(got)
        elif got[0] == "conflict":
            result.conflicts.append((c.path, got[1]))
        else:
            result.refused.append((c.path, got[1]))
    return result


def _unchanged(ws: str, step: Step) -> bool:
    now = lstat_at(ws, step.path)
    if step.ours is None:
        return now is None
    return now is not None and now == step.ours and now.mtime_ns == step.ours.mtime_ns


def apply(
    review: Review,
    *,
    protected: list[str],
    include_protected: bool = False,
    partial: bool = False,
    max_file: int = DEFAULT_MAX_FILE,
    branch: str = "",
    files: bool = True,
) -> Applied:
    """Apply `review` to its workspace. Nothing is written when anything conflicts or is
    refused, unless `partial`: then the clean paths are written and the rest reported.
    In git mode the agent's new commits become the branch `branch` (default coi/<id>)
    first; `files=False`: only that branch.

    :raises UsageError: the review is not pending, or not in git mode and only the branch
        is asked for.
    """
    from coi.errors import UsageError

    if review.state != "pending":
        raise UsageError(f"review {review.id} is {review.state}, not pending")
    if (branch or not files) and not gitbranch.is_git(review):
        raise UsageError(
            f"review {review.id} is not of a git repository: there are no commits to branch",
            resolution="Drop --branch/--branch-only: coi apply brings the files.",
        )
    if branch:
        gitbranch.check_branch_name(branch)
    # One apply at a time into one folder: two reviews applied at once would each plan
    # against a folder the other is changing.
    key = hashlib.sha256(review.workspace.encode()).hexdigest()[:16]
    with held(Path(review.folder).parent / f".apply-{key}.lock"):
        result = plan(
            review, protected=protected, include_protected=include_protected, max_file=max_file
        )
        if not files:
            result.steps, result.conflicts, result.refused = [], [], []
        if result.blocked and not partial:
            return result
        if gitbranch.is_git(review):
            # The branch first: a new ref and objects, nothing of yours changed; when it
            # cannot be made, no file is written either (unless --partial).
            name = branch or f"coi/{review.id}"
            made = gitbranch.make_branch(review, name)
            if made.problem:
                result.refused.append((".git", f"the agent's commits: {made.problem}"))
                if not partial:
                    return result
            elif made.new:
                result.branch, result.commits = name, made
        if not files:
            result.written = True
            if not result.blocked:
                mark_applied(review)
            return result
        return _apply(review, result, partial)


def _apply(review: Review, result: Applied, partial: bool) -> Applied:
    ws = review.workspace
    done: list[Step] = []
    # Deletions first, so a file replaced by a folder (or the reverse) has room.
    for step in sorted(result.steps, key=lambda s: s.action != "delete"):
        if step.action == "none":
            done.append(step)
            continue
        try:
            if not _unchanged(ws, step):
                result.conflicts.append((step.path, "changed in your folder while applying"))
                continue
            if step.action == "delete":
                remove_file(ws, step.path)
            else:
                write_file(ws, step.path, step.data, step.mode)
        except (Unsafe, OSError) as err:
            result.refused.append((step.path, f"not written: {err}"))
            continue
        done.append(step)
    _prune_folders(review, ws)
    result.steps = done
    result.written = True
    review.applied = sorted({*review.applied, *(s.path for s in done if s.action != "none")})
    if result.blocked:
        review.save()  # partial: still pending, with what was written so far
    else:
        mark_applied(review)
    return result


def _prune_folders(review: Review, ws: str) -> None:
    """Folders the agent removed go from the user's folder too, when they are empty there."""
    base, work = walk(review.base), walk(review.work)
    gone = [rel for rel, e in base.items() if e.kind == "dir" and rel not in work]
    for rel in sorted(gone, key=lambda r: r.count("/"), reverse=True):
        remove_empty_dir(ws, rel)
