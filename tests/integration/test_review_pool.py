"""Review copies on the daemon's btrfs pool (as root): snapshots of a mirror kept in step
with the workspace, two review slots on one folder, and `coi clean --reviews`."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import ROOT, run_coi

from coi.backend import IncusClient
from coi.review import pool

POOL = "coi"


@pytest.fixture
def renv(test_project: str, base: Path) -> dict[str, str]:
    """Root's coi, its own home, review copies forced onto the pool."""
    home = base / "root-home"
    home.mkdir()
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "COI_HOME": str(home / ".coi"),
        "COI_PROJECT": test_project,
        "PYTHONPATH": str(ROOT / "src"),
        "COI_REVIEW_COPY": "pool",
        "TERM": "xterm",
    }


def state(root: Path) -> dict[str, tuple[object, ...]]:
    """Relative path -> kind, mode, owner and content (hash or link text): what a copy must keep."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            what: object
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = stat.S_IFMT(st.st_mode)
            out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what)
    return out


def start(ws: Path, renv: dict[str, str]) -> dict[str, str]:
    res = run_coi("review", "start", "-w", str(ws), "--format", "json", env=renv)
    assert res.returncode == 0, res.stderr
    row: dict[str, str] = json.loads(res.stdout)
    assert row["copy"] == "pool", row
    return row


def test_pool_reviews_are_snapshots_of_a_mirror_kept_in_step(
    client: IncusClient, base: Path, renv: dict[str, str]
) -> None:
    ws = base / "ws"
    (ws / "sub" / "deep").mkdir(parents=True)
    (ws / "a.txt").write_text("one\n")
    (ws / "sub" / "b.txt").write_text("bee\n")
    (ws / "run.sh").write_text("#!/bin/sh\n")
    (ws / "run.sh").chmod(0o750)
    (ws / "link").symlink_to("a.txt")
    (ws / "big.bin").write_bytes(os.urandom(1 << 20) * 8)
    os.mkfifo(ws / "pipe")
    os.chown(ws / "sub" / "b.txt", 1234, 4321)

    first = start(ws, renv)
    store = Path(first["work"]).parent
    base1, work1 = store / "base", store / "work"
    for sub in (base1, work1):
        assert pool.is_subvolume(sub), f"{sub} is not a btrfs snapshot"
    assert client.networks.volume_exists(POOL, pool.VOLUME)
    assert state(base1) == state(ws) == state(work1)
    before = state(ws)

    # The user works on: each kind of change must reach the next review's copy.
    (ws / "a.txt").write_text("one\ntwo\n")
    (ws / "sub" / "b.txt").unlink()
    (ws / "sub" / "new.txt").write_text("new\n")
    (ws / "link").unlink()
    (ws / "link").write_text("a file now\n")
    (ws / "run.sh").chmod(0o700)
    (ws / "sub" / "deep").rmdir()
    (ws / "sub" / "deep").write_text("was a folder\n")
    second = start(ws, renv)
    base2 = Path(second["work"]).parent / "base"
    assert state(base2) == state(ws)
    assert state(base1) == before  # the first review's base is a snapshot: it stays

    # The agent changes a file and puts its size and times back: ctime still tells.
    work2 = Path(second["work"])
    old = (work2 / "sub" / "new.txt").stat()
    (work2 / "sub" / "new.txt").write_text("NEW\n")
    os.utime(work2 / "sub" / "new.txt", ns=(old.st_atime_ns, old.st_mtime_ns))
    diff = run_coi("diff", second["id"], "--format", "json", env=renv)
    assert diff.returncode == 0, diff.stderr
    files = {f["path"]: f["status"] for f in json.loads(diff.stdout)["files"]}
    assert files == {"sub/new.txt": "modified"}

    for rid in (first["id"], second["id"]):
        assert run_coi("discard", rid, env=renv).returncode == 0
    assert not store.exists() and not base2.exists()
    assert client.networks.volume_exists(POOL, pool.VOLUME)  # the mirror stays, a cache

    cleaned = run_coi("clean", "--reviews", "--force", env=renv)
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"Deleting the storage volume {pool.VOLUME}" in cleaned.stdout, cleaned.stdout
    assert not client.networks.volume_exists(POOL, pool.VOLUME)


def _rid(stderr: str) -> str:
    found = re.search(r"review (\S+): the agent works on a copy", stderr)
    assert found, stderr
    return found.group(1)


def test_two_review_slots_on_one_folder_then_the_second_apply_conflicts(
    client: IncusClient, base: Path, renv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = base / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("top\nmiddle\nbottom\n")
    os.chown(ws, user.pw_uid, user.pw_gid)  # a user's folder, reviewed and applied by root
    agents = {
        "one": "sed -i 's/middle/agent one/' a.txt && echo one > only-one.txt",
        "two": "sed -i 's/middle/agent two/' a.txt && echo two > only-two.txt",
    }
    # Both at once (each sleeps after its edit, so the two sandboxes overlap).
    procs = {
        who: subprocess.Popen(
            [
                str(ROOT / ".venv/bin/coi"),
                "run",
                "--review",
                "--image",
                "coi-tiny",
                "-w",
                str(ws),
                "--",
                "sh",
                "-c",
                f"cd /workspace && {script} && sleep 8",
            ],
            env=renv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who, script in agents.items()
    }
    # While both run, `coi clean --reviews` keeps the reviews their sandboxes work on.
    deadline = time.monotonic() + 90
    while len(_reviewing(client)) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    working = _reviewing(client)
    assert len(working) == 2, "the two review sandboxes did not run side by side"
    cleaned = run_coi("clean", "--reviews", "--force", env=renv)
    assert cleaned.returncode == 0, cleaned.stderr
    for rid, name in working.items():
        assert f"kept: {rid} (sandbox {name} works on it)" in cleaned.stdout, cleaned.stdout
    assert client.networks.volume_exists(POOL, pool.VOLUME)
    outs = {who: p.communicate(timeout=180) for who, p in procs.items()}
    for who, (_out, err) in outs.items():
        assert procs[who].returncode == 0, err
    slots = {m.group(1) for _, e in outs.values() if (m := re.search(r"slot (\d+)", e))}
    assert slots == {"1", "2"}, "the two sandboxes did not run side by side"
    rids = {who: _rid(err) for who, (_, err) in outs.items()}
    # Each review knows its sandbox: `--slot N` finds the one made in slot N.
    for who, (_, err) in outs.items():
        found = re.search(r"slot (\d+)", err)
        assert found, err
        by_slot = run_coi("diff", "--slot", found.group(1), "-w", str(ws), "--format", "json",
                          env=renv)  # fmt: skip
        assert json.loads(by_slot.stdout)["review"] == rids[who], by_slot.stderr
    assert (ws / "a.txt").read_text() == "top\nmiddle\nbottom\n"

    listed = run_coi("list", "--format", "json", env=renv)
    pending = {r["id"] for r in json.loads(listed.stdout)["pending_reviews"]}
    assert set(rids.values()) <= pending

    for who, rid in rids.items():
        d = run_coi("diff", rid, "--format", "json", env=renv)
        assert d.returncode == 0, d.stderr
        files = {f["path"]: f["status"] for f in json.loads(d.stdout)["files"]}
        assert files == {"a.txt": "modified", f"only-{who}.txt": "added"}, (who, files)
        text = run_coi("diff", rid, env=renv).stdout
        assert f"+agent {who}" in text and "-middle" in text

    assert run_coi("apply", rids["one"], env=renv).returncode == 0
    assert (ws / "a.txt").read_text() == "top\nagent one\nbottom\n"
    clash = run_coi("apply", rids["two"], env=renv)
    assert clash.returncode != 0
    assert (
        "a.txt" in clash.stdout + clash.stderr
        and "conflict" in (clash.stdout + clash.stderr).lower()
    )
    # Nothing of the second is half-applied: its new file did not come in either.
    assert (ws / "a.txt").read_text() == "top\nagent one\nbottom\n"
    assert not (ws / "only-two.txt").exists()
    assert (ws / "only-one.txt").read_text() == "one\n"
    mine = (ws / "only-one.txt").stat()
    assert (mine.st_uid, mine.st_gid) == (user.pw_uid, user.pw_gid), "root's apply: root's file"

    for rid in rids.values():
        run_coi("discard", rid, env=renv)
    deadline = time.monotonic() + 30
    while _reviewing(client) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_coi("clean", "--reviews", "--force", env=renv).returncode == 0
    assert not client.networks.volume_exists(POOL, pool.VOLUME)


def _reviewing(client: IncusClient) -> dict[str, str]:
    """Review id -> the running sandbox that works on it."""
    from coi.sessions.inventory import containers

    return {c.review: c.name for c in containers(client, lambda: []) if c.review and c.running}


def test_git_mode_on_the_pool_as_root_keeps_the_repository_the_users(
    base: Path, renv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """Root reviews a user's repository on the pool; the agent's commits become a branch
    whose objects, written by git run as the repository's owner, are the user's."""
    from tests.reviewkit import make_repo

    ws = base / "repo"
    make_repo(ws)
    for p in [ws, *ws.rglob("*")]:
        os.lchown(p, user.pw_uid, user.pw_gid)
    row = start(ws, renv)
    work = Path(row["work"])
    env = {"PATH": os.environ["PATH"], "HOME": str(base), "GIT_CONFIG_NOSYSTEM": "1"}
    who = ["-c", "user.name=a", "-c", "user.email=a@example.invalid", "-c", "safe.directory=*"]
    (work / "new.py").write_text("x = 1\n")
    for args in (["add", "new.py"], ["commit", "-qm", "agent work"], ["gc", "-q"]):
        subprocess.run(["git", "-C", str(work), *who, *args], env=env, check=True)

    diff = run_coi("diff", row["id"], env=renv)
    assert "The agent's commits (1; coi apply makes them branch" in diff.stdout, diff.stdout
    res = run_coi("apply", row["id"], env=renv)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Branch coi/{row['id']}: the agent's 1 commit(s)" in res.stdout
    log = subprocess.run(
        ["git", "-C", str(ws), "-c", "safe.directory=*", "log", "-1", "--format=%s",
         f"coi/{row['id']}"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert log.stdout.strip() == "agent work"
    rootly = [p for p in (ws / ".git").rglob("*") if p.lstat().st_uid != user.pw_uid]
    assert rootly == [], f"not the user's: {rootly[:5]}"
    assert (ws / "new.py").stat().st_uid == user.pw_uid
    assert run_coi("discard", row["id"], env=renv).returncode == 0
