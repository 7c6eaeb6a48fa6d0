"""An agent's attacks on a review copy, shared by the unit and the integration tests: each
planted command touches a marker file if anything ever runs it."""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

HUGE_CAP = 1 << 20  # the tests' review.max_file_size: 1 MiB


@dataclass
class Plants:
    markers: Path  # where planted commands would leave a file
    outside: Path  # a folder outside the workspace a link points into
    ssh: Path  # the stand-in for ~/.ssh
    refused: dict[str, str]  # path -> a word its refusal reason must hold
    protected: list[str]  # refused unless --include-protected


def make_repo(ws: Path) -> None:
    """The user's workspace: a git repository with one commit and a README."""
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "README.md").write_text("# project\n\nline one\nline two\nline three\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(ws), "GIT_CONFIG_NOSYSTEM": "1"}
    for args in (
        ["init", "-q", "-b", "main"],
        ["-c", "user.name=u", "-c", "user.email=u@example.invalid", "add", "README.md"],
        ["-c", "user.name=u", "-c", "user.email=u@example.invalid", "commit", "-qm", "one"],
    ):
        subprocess.run(["git", "-C", str(ws), *args], env=env, check=True)


def _script(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\ntouch {marker}\ncat\n")
    path.chmod(0o755)


def plant(work: Path, scratch: Path) -> Plants:
    """Everything the brief lists, planted in the agent's copy `work` (a git repository)."""
    markers = scratch / "markers"
    markers.mkdir(mode=0o777, exist_ok=True)
    markers.chmod(0o777)
    tools = work / ".tools"
    for name in ("hook", "hookspath", "fsmonitor", "external", "clean", "smudge", "merge"):
        _script(tools / f"{name}.sh", markers / name)
    _script(work / ".git" / "hooks" / "pre-commit", markers / "hook")
    _script(work / ".githooks" / "pre-commit", markers / "hookspath")
    with (work / ".git" / "config").open("a") as f:
        f.write(
            f"[core]\n\thooksPath = .githooks\n\tfsmonitor = {tools}/fsmonitor.sh\n"
            f"[diff]\n\texternal = {tools}/external.sh\n"
            f'[filter "evil"]\n\tclean = {tools}/clean.sh\n\tsmudge = {tools}/smudge.sh\n'
            f'[merge "evil"]\n\tdriver = {tools}/merge.sh %O %A %B\n'
        )
    (work / ".gitattributes").write_text("* filter=evil merge=evil\n")
    # The agent's change to a tracked file (the user edits another line of it meanwhile).
    (work / "README.md").write_text("# project\n\nline one\nline two\nline THREE by agent\n")
    ssh = scratch / "home" / ".ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text("ssh-ed25519 AAAA user@host\n")
    outside = scratch / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "victim.txt").write_text("untouched\n")
    os.symlink(ssh, work / "ssh")
    os.symlink("/etc/passwd", work / "passwd")
    os.symlink(outside, work / "linked")  # a folder that is a link: never descended
    os.mkfifo(work / "pipe")
    (work / "suid").write_bytes(b"#!/bin/sh\ntouch /nonexistent\n")
    (work / "suid").chmod(0o4755)
    with (work / "huge.bin").open("wb") as f:
        f.truncate(HUGE_CAP + 1)
    return Plants(
        markers,
        outside,
        ssh,
        refused={
            "ssh": "symbolic link",
            "passwd": "symbolic link",
            "linked": "symbolic link",
            "pipe": "FIFO",
            "suid": "setuid",
            "huge.bin": "cap",
        },
        protected=[".git/config", ".git/hooks/pre-commit"],
    )


def fingerprint(*roots: Path) -> dict[str, str]:
    """path -> what it is (content hash, link target): to prove nothing outside changed."""
    out: dict[str, str] = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
                else:
                    out[str(p)] = "dir" if p.is_dir() else "other"
    return out


def run_the_plants(work: Path, home: Path, user: str | None = None) -> None:
    """The control: plain git in the agent's copy (as the folder's owner: git refuses another
    user's repository) runs the planted commands, proving they are live, so their markers
    staying absent under coi means something."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1"}
    ident = ["-c", "user.name=u", "-c", "user.email=u@example.invalid"]
    who = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"] if user else []
    for args in (["status"], ["diff"], ["add", "README.md"], [*ident, "commit", "-qm", "x"]):
        argv = [*who, "git", "-C", str(work), *args]
        subprocess.run(argv, env=env, capture_output=True, check=False)
