"""Git mode of a review: the agent's commits become a branch of your repository. Nothing of
the agent's runs: its HEAD is read as text, its new object files are copied into a private
folder, and your own git (no hooks, no global config) checks and takes them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from coi.errors import CoiError, UsageError
from coi.review.copy import Review
from coi.review.tree import Unsafe, lstat_at, open_file, read_file, walk_under

SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
REF = re.compile(r"refs/heads/(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,200}")
LOOSE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{38}(?:[0-9a-f]{24})?")
PACK = re.compile(r"pack/pack-[0-9a-f]{40,64}\.pack")
SMALL = 4096  # HEAD and a loose ref
PACKED_REFS = 16 << 20
MAX_COMMITS = 1000
ZERO = "0" * 40


@dataclass
class Commits:
    """The agent's commits that your repository does not have, newest first."""

    head: str = ""  # the commit the agent's HEAD names
    start: str = ""  # the commit your HEAD named when the review began
    new: list[tuple[str, str]] = field(default_factory=list)  # (sha, subject)
    problem: str = ""  # why they cannot be brought in ("" when they can)


def is_git(review: Review) -> bool:
    """Git mode: your folder and the review's base are repositories (a real `.git` folder;
    a worktree's or submodule's `.git` file is not)."""
    try:
        mine = lstat_at(review.workspace, ".git")
        base = lstat_at(review.base, ".git")
    except Unsafe:
        return False
    return mine is not None and mine.kind == "dir" and base is not None and base.kind == "dir"


def in_git(path: str) -> bool:
    """Whether a review path is git's own data (not a file git mode applies)."""
    return path == ".git" or path.startswith(".git/")


def head_of(root: str) -> str:
    """The commit `root/.git/HEAD` names, read as data: a commit id, or a branch found as a
    loose ref or in packed-refs; "" when it names none."""
    try:
        text = read_file(root, ".git/HEAD", SMALL).decode("ascii", "replace").strip()
    except Unsafe:
        return ""
    if SHA.fullmatch(text):
        return text
    ref = text.removeprefix("ref: ").strip()
    if not text.startswith("ref: ") or not REF.fullmatch(ref):
        return ""
    try:
        value = read_file(root, f".git/{ref}", SMALL).decode("ascii", "replace").strip()
        return value if SHA.fullmatch(value) else ""
    except Unsafe:
        pass  # not a loose ref: look in packed-refs
    try:
        packed = read_file(root, ".git/packed-refs", PACKED_REFS).decode("utf-8", "replace")
    except Unsafe:
        return ""
    for line in packed.splitlines():
        sha, _, name = line.partition(" ")
        if name == ref and SHA.fullmatch(sha):
            return sha
    return ""


def _owner(ws: str) -> tuple[int, int] | None:
    """Who git runs as: the repository's owner when coi runs as root (what it writes in
    your `.git` stays yours), else coi's own user (None)."""
    if os.geteuid() != 0:
        return None
    st = os.stat(os.path.join(ws, ".git"))
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


class _Git:
    """Your git on your repository, reading nothing else: no system or global config, no
    hooks, no fsmonitor; the agent's new objects, if given, as a read-only alternate."""

    def __init__(self, ws: str, tmp: str, objects: str = "") -> None:
        git = shutil.which("git")
        if git is None:
            raise CoiError("git is not installed: git mode needs it to take the agent's commits")
        from coi.review.apply import git_env

        self.argv = [
            git,
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
            "-c",
            f"safe.directory={ws}",
            f"--git-dir={os.path.join(ws, '.git')}",
        ]
        self.env = git_env(tmp)
        if objects:
            self.env["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = objects
        self.owner = _owner(ws)
        self.tmp = tmp

    def __call__(
        self, *args: str, stdin: bytes | None = None, stdout: int | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.argv, *args],
            env=self.env,
            cwd=self.tmp,
            input=stdin,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=600,
            check=False,
            user=self.owner[0] if self.owner else None,
            group=self.owner[1] if self.owner else None,
        )


def _copy_object(review: Review, rel: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd = open_file(review.work, f".git/objects/{rel}")
    try:
        with open(dest, "wb") as out:
            while chunk := os.read(fd, 1 << 20):
                out.write(chunk)
    finally:
        os.close(fd)


def _quarantine(review: Review, tmp: str) -> str:
    """The agent's new object files (loose objects and packs that base did not have), copied
    as plain files into `tmp/objects`, each pack indexed afresh by your git (the agent's
    `.idx`, `info/alternates` and anything else are never read)."""
    objects = os.path.join(tmp, "objects")
    os.makedirs(os.path.join(objects, "pack"))
    old = walk_under(review.base, ".git/objects")
    for rel, entry in walk_under(review.work, ".git/objects").items():
        if entry.kind != "file" or rel in old:
            continue  # object files never change: one base has is base's
        if not (LOOSE.fullmatch(rel) or PACK.fullmatch(rel)):
            continue
        dest = os.path.join(objects, rel)
        try:
            _copy_object(review, rel, dest)
        except Unsafe:
            continue  # swapped for something else meanwhile: its objects are missing, said below
        if rel.startswith("pack/"):
            git = shutil.which("git") or "git"
            res = subprocess.run(
                [git, "index-pack", dest],
                cwd=tmp,
                capture_output=True,
                timeout=600,
                check=False,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp},
            )
            if res.returncode != 0:
                os.unlink(dest)  # a broken pack: its objects count as missing
    return objects


@contextmanager
def _scratch(review: Review) -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="coi-gitmode-")
    try:
        owner = _owner(review.workspace)
        if owner:
            os.chown(tmp, *owner)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commits(review: Review, tmp: str) -> tuple[Commits, _Git | None]:
    found = Commits(head=head_of(review.work), start=head_of(review.base))
    if not found.head:
        if found.start:
            found.problem = "the agent's HEAD names no commit (its .git/HEAD was changed)"
        return found, None
    if found.head == found.start:
        return found, None
    objects = _quarantine(review, tmp)
    owner = _owner(review.workspace)
    if owner:
        for dirpath, dirs, files in os.walk(tmp):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(dirpath, name), *owner)
    git = _Git(review.workspace, tmp, objects)
    res = git(
        "rev-list",
        f"--max-count={MAX_COMMITS}",
        "--no-commit-header",
        "--format=%H %s",
        found.head,
        "--not",
        "--all",
    )
    if res.returncode != 0:
        why = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        found.problem = f"its commits are not all in the review ({why[0][:200]})"
        return found, None
    for line in res.stdout.decode(errors="replace").splitlines():
        sha, _, subject = line.partition(" ")
        if SHA.fullmatch(sha):
            found.new.append((sha, subject))
    return found, git


def commits(review: Review) -> Commits:
    """The agent's commits your repository does not have (read only: nothing is written)."""
    with _scratch(review) as tmp:
        return _commits(review, tmp)[0]


def check_branch_name(name: str) -> None:
    """:raises UsageError: not a name git takes for a branch."""
    git = shutil.which("git") or "git"
    res = subprocess.run(
        [git, "check-ref-format", "--branch", name], capture_output=True, check=False
    )
    if res.returncode != 0 or name.startswith("-"):
        raise UsageError(
            f"'{name}' is not a valid branch name",
            resolution="Choose another with --branch (for example coi/my-change).",
        )


def make_branch(review: Review, name: str) -> Commits:
    """Bring the agent's commits into your repository as the new branch `name`: its new
    objects packed by your git from the private copy, taken with `index-pack --strict`
    (every object checked), the history proved complete without the copy, then the branch
    made only if it does not exist. Nothing is written when anything fails (`problem`)."""
    check_branch_name(name)
    with _scratch(review) as tmp:
        found, git = _commits(review, tmp)
        if found.problem or not found.new or git is None:
            return found
        ref = f"refs/heads/{name}"
        if git("rev-parse", "-q", "--verify", ref).returncode == 0:
            found.problem = f"your repository already has a branch {name}"
            return found
        listed = git("rev-list", "--objects", found.head, "--not", "--all")
        shas = b"\n".join(line.split(b" ", 1)[0] for line in listed.stdout.splitlines())
        pack_path = os.path.join(tmp, "agent.pack")
        with open(pack_path, "wb") as pack:
            packed = git("pack-objects", "--stdout", stdin=shas + b"\n", stdout=pack.fileno())
        if listed.returncode != 0 or packed.returncode != 0:
            found.problem = "your git could not pack the agent's objects"
            return found
        mine = _Git(review.workspace, tmp)  # from here on: your repository alone
        with open(pack_path, "rb") as pack:
            took = mine("index-pack", "--stdin", "--strict", stdin=pack.read())
        if took.returncode != 0:
            why = took.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            found.problem = f"your git refused the agent's objects ({why[0][:200]})"
            return found
        if mine("rev-list", "--objects", found.head, "--not", "--all").returncode != 0:
            found.problem = "the agent's history is incomplete in your repository"
            return found
        made = mine("update-ref", "-m", f"coi apply: review {review.id}", ref, found.head, ZERO)
        if made.returncode != 0:
            found.problem = (
                f"could not make the branch {name}: "
                + made.stderr.decode(errors="replace").strip()[:200]
            )
        return found
