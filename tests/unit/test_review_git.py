"""Git mode of a review (coi.review.gitbranch), with real git: the agent's commits become a
branch of the user's repository; what the agent left in its .git is data, never run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from tests.reviewkit import make_repo

from coi.errors import UsageError
from coi.review import gitbranch
from coi.review.apply import apply
from coi.review.copy import Review, start
from coi.review.diff import compare_review

PROTECTED = [".git/hooks", ".git/config", ".coi.toml"]


def git(repo: Path, *args: str, check: bool = True) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(repo), "GIT_CONFIG_NOSYSTEM": "1"}
    who = ["-c", "user.name=agent", "-c", "user.email=agent@example.invalid"]
    res = subprocess.run(
        ["git", "-C", str(repo), *who, *args], env=env, capture_output=True, text=True
    )
    if check:
        assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture
def review(tmp_path: Path) -> Review:
    ws = tmp_path / "repo"
    make_repo(ws)
    return start(ws, home=tmp_path / "reviews")


def agent_commits(work: Path, *, gc: bool = False) -> None:
    (work / "feature.py").write_text("def feature():\n    return 1\n")
    git(work, "add", "feature.py")
    git(work, "commit", "-qm", "Add feature")
    (work / "README.md").write_text("# project\n\nline one\nline two\nline three\nmore\n")
    git(work, "commit", "-qam", "Document it")
    if gc:
        git(work, "gc", "-q")
    (work / "notes.txt").write_text("not committed\n")


def plant_config(work: Path, marker: Path) -> None:
    """After its commits, the agent arms its .git: anything run leaves `marker`."""
    script = work / ".evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    with (work / ".git" / "config").open("a") as f:
        f.write(f"[core]\n\tfsmonitor = {script}\n\thooksPath = .\n[uploadpack]\n")
        f.write(f"\tpackObjectsHook = {script}\n")
    for hook in ("reference-transaction", "post-checkout", "post-merge"):
        (work / ".git" / "hooks" / hook).write_text(f"#!/bin/sh\ntouch {marker}\n")
        (work / ".git" / "hooks" / hook).chmod(0o755)


@pytest.mark.parametrize("gc", [False, True], ids=["loose", "packed"])
def test_the_agents_commits_become_a_branch_and_its_files_come_too(
    review: Review, tmp_path: Path, gc: bool
) -> None:
    ws, work = Path(review.workspace), Path(review.work)
    main_before = git(ws, "rev-parse", "main")
    agent_commits(work, gc=gc)
    marker = tmp_path / "ran"
    plant_config(work, marker)

    diff, commits = compare_review(review)
    assert commits is not None and not commits.problem
    assert [s for _, s in commits.new] == ["Document it", "Add feature"]
    assert {c.path for c in diff.changes} == {"feature.py", "README.md", "notes.txt", ".evil.sh"}
    assert diff.git_files  # objects, refs, logs, config, hooks: never files here

    res = apply(review, protected=PROTECTED)
    assert res.written and not res.blocked, (res.refused, res.conflicts)
    assert res.branch == f"coi/{review.id}"
    assert git(ws, "log", "--format=%s", res.branch) == "Document it\nAdd feature\none"
    assert git(ws, "rev-parse", "main") == main_before  # your branch did not move
    assert git(ws, "fsck", "--strict", "--no-dangling") == ""
    assert (ws / "notes.txt").read_text() == "not committed\n"
    assert not marker.exists(), "something the agent planted ran"
    assert "fsmonitor" not in (ws / ".git" / "config").read_text()


def test_branch_only_with_a_name_writes_no_file(review: Review) -> None:
    ws = Path(review.workspace)
    agent_commits(Path(review.work))
    res = apply(review, protected=PROTECTED, branch="agent/feature", files=False)
    assert res.branch == "agent/feature" and res.written
    assert git(ws, "log", "-1", "--format=%s", "agent/feature") == "Document it"
    assert not (ws / "feature.py").exists() and not (ws / "notes.txt").exists()
    assert review.state == "applied"


def test_a_branch_name_git_refuses_or_one_that_exists(review: Review) -> None:
    ws = Path(review.workspace)
    agent_commits(Path(review.work))
    with pytest.raises(UsageError):
        apply(review, protected=PROTECTED, branch="bad..name")
    git(ws, "branch", "taken")
    res = apply(review, protected=PROTECTED, branch="taken")
    assert not res.written and "already has a branch taken" in dict(res.refused)[".git"]
    assert not (ws / "feature.py").exists()  # all or nothing


def _refused(review: Review) -> str:
    ws = Path(review.workspace)
    refs_before = git(ws, "for-each-ref")
    res = apply(review, protected=PROTECTED)
    assert not res.written and not res.branch
    assert git(ws, "for-each-ref") == refs_before
    assert not (ws / "feature.py").exists()
    return dict(res.refused)[".git"]


def test_a_head_pointing_outside_the_repository_is_refused(review: Review) -> None:
    work = Path(review.work)
    agent_commits(work)
    (work / ".git" / "HEAD").write_text("ref: refs/heads/../../../../etc/passwd\n")
    assert "HEAD names no commit" in _refused(review)


def test_a_fabricated_commit_id_is_refused(review: Review) -> None:
    work = Path(review.work)
    agent_commits(work)
    (work / ".git" / "refs" / "heads" / "main").write_text("1" * 40 + "\n")
    assert "not all in the review" in _refused(review)


def test_objects_reached_only_through_the_agents_alternates_are_not_taken(
    review: Review, tmp_path: Path
) -> None:
    """The agent moves its new objects out and points `info/alternates` at them: coi never
    reads alternates, so the commits are missing, not fetched from anywhere."""
    work = Path(review.work)
    agent_commits(work, gc=True)
    elsewhere = tmp_path / "elsewhere"
    os.rename(work / ".git" / "objects" / "pack", elsewhere)
    (work / ".git" / "objects" / "pack").mkdir()
    (work / ".git" / "objects" / "info" / "alternates").write_text(f"{elsewhere.parent}\n")
    assert "not all in the review" in _refused(review)


def test_an_objects_folder_that_is_a_link_is_not_followed(review: Review, tmp_path: Path) -> None:
    work = Path(review.work)
    agent_commits(work, gc=True)
    real = tmp_path / "objects-real"
    os.rename(work / ".git" / "objects", real)
    os.symlink(real, work / ".git" / "objects")
    assert "not all in the review" in _refused(review)


def test_a_forged_object_file_is_refused_by_the_strict_check(review: Review) -> None:
    """A loose object file named after one id but holding another object: packed and taken
    by content, the id the agent's branch names is not among what came in."""
    work = Path(review.work)
    agent_commits(work)
    head = git(work, "rev-parse", "HEAD")
    parent = git(work, "rev-parse", "HEAD~1")
    head_file = work / ".git" / "objects" / head[:2] / head[2:]
    parent_file = work / ".git" / "objects" / parent[:2] / parent[2:]
    head_file.chmod(0o644)
    head_file.write_bytes(parent_file.read_bytes())
    assert "history is incomplete" in _refused(review)


def test_no_git_mode_for_a_plain_folder(tmp_path: Path) -> None:
    ws = tmp_path / "plain"
    ws.mkdir()
    (ws / "a.txt").write_text("a\n")
    r = start(ws, home=tmp_path / "reviews")
    assert not gitbranch.is_git(r) and compare_review(r)[1] is None
    with pytest.raises(UsageError):
        apply(r, protected=PROTECTED, files=False)
