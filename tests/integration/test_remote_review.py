"""`--review` on a remote daemon (tests/remotekit.py: a second Incus over HTTPS only): the
review's copy is uploaded, the agent's work comes back into the review when the sandbox
goes (or with `coi review fetch`), and `coi diff`/`coi apply` bring it in, owned by the user.
What the agent leaves is unpacked as data: nothing lands outside the review."""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import remotekit
from tests.conftest import ROOT, coi_argv, run_coi
from tests.integration.conftest import USER, user_dir
from tests.integration.test_remote import remote  # noqa: F401  (the second daemon)
from tests.reviewkit import fingerprint

PROJECT = f"coi-{USER}"


@pytest.fixture
def uenv(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    base: Path,
    user: pwd.struct_passwd,
) -> Iterator[dict[str, str]]:
    """The test user with their own config folders (nothing configured elsewhere: the only
    remote they know is the test's), the second daemon added with a trust token."""
    remotekit.check_route(remote)
    home = user_dir(base / "home", user)
    user_dir(home / ".ssh", user)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA the-user\n")
    e = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(user_dir(base / "xdg", user)),
        "COI_HOME": str(home / ".coi"),
        "COI_IMAGE": "coi-tiny",
        "TERM": "xterm",
        "PYTHONPATH": str(ROOT / "src"),
    }
    added = run_coi(
        "remote", "add", "r1", remote.url, "--token", remote.trust_token(USER), env=e, user=USER
    )
    assert added.returncode == 0, added.stderr
    yield e
    with remote.admin(PROJECT) as c:
        for inst in c.instances.list():
            c.instances.delete(inst.name, force=True)


@pytest.fixture
def ws(base: Path, user: pwd.struct_passwd) -> Path:
    ws = user_dir(base / "ws", user)
    for rel, text in (("a.txt", "one\n"), ("b.txt", "gone\n"), ("sub/deep.txt", "deep\n")):
        (ws / rel).parent.mkdir(exist_ok=True)
        (ws / rel).write_text(text)
    for p in (ws / "a.txt", ws / "b.txt", ws / "sub", ws / "sub" / "deep.txt"):
        os.chown(p, user.pw_uid, user.pw_gid)
    return ws


def _names(remote: remotekit.RemoteDaemon) -> list[str]:  # noqa: F811
    with remote.admin(PROJECT) as c:
        return [i.name for i in c.instances.list()]


def _wait_none(remote: remotekit.RemoteDaemon) -> None:  # noqa: F811
    """The daemon removes a run's sandbox after coi returns: bounded wait."""
    end = time.monotonic() + 60
    while _names(remote):
        assert time.monotonic() < end, f"still on the remote: {_names(remote)}"
        time.sleep(0.3)


def _review_id(stderr: str) -> str:
    found = re.search(r"review (\S+): the agent works on a copy", stderr)
    assert found, stderr
    return found.group(1)


def _diff(rid: str, env: dict[str, str]) -> dict[str, str]:
    res = run_coi("diff", rid, "--format", "json", env=env, user=USER)
    assert res.returncode == 0, res.stderr
    return {f["path"]: f["status"] for f in json.loads(res.stdout)["files"]}


def test_run_review_on_a_remote_comes_back_as_a_diff(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],
    ws: Path,
    user: pwd.struct_passwd,
) -> None:
    before = fingerprint(ws)
    agent = (
        "cd /workspace && echo new > new.txt && echo two >> a.txt && rm b.txt "
        "&& mkdir -p made/deeper && echo x > made/deeper/x.txt && ls"
    )
    res = run_coi("--remote", "r1", "run", "--review", "--network", "open", "-w", str(ws),
                  "--", "sh", "-c", agent, env=uenv, user=USER, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["a.txt", "made", "new.txt", "sub"]
    rid = _review_id(res.stderr)
    assert "the review's copy is uploaded into the sandbox" in res.stderr
    assert f"Fetched the agent's work into review {rid}" in res.stderr
    assert "left out" not in res.stderr
    # The sandbox is gone, and the user's folder is byte for byte as it was.
    _wait_none(remote)
    assert fingerprint(ws) == before
    assert _diff(rid, uenv) == {
        "new.txt": "added",
        "a.txt": "modified",
        "b.txt": "deleted",
        "made/deeper/x.txt": "added",
    }
    applied = run_coi("apply", rid, env=uenv, user=USER)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert (ws / "a.txt").read_text() == "one\ntwo\n"
    assert (ws / "new.txt").read_text() == "new\n"
    assert (ws / "made" / "deeper" / "x.txt").read_text() == "x\n"
    assert not (ws / "b.txt").exists()
    for f in ("a.txt", "new.txt", "made", "made/deeper/x.txt"):
        assert (ws / f).stat().st_uid == user.pw_uid, f


def test_the_agents_special_files_come_back_as_data_only(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],
    ws: Path,
    user: pwd.struct_passwd,
) -> None:
    """The agent leaves a link to the user's ~/.ssh, a FIFO, a setuid file and a file with
    its group and others' write: none of it is followed, made or kept as such."""
    ssh = Path(uenv["HOME"]) / ".ssh"
    ssh_before = fingerprint(ssh)
    agent = (
        f"cd /workspace && ln -s {ssh} sshlink && ln -s /etc/passwd etc-link && mkfifo fifo "
        "&& echo '#!/bin/sh' > suid && chmod 6777 suid && echo w > open && chmod 666 open "
        "&& mkdir sshlink2 && true"
    )
    res = run_coi("--remote", "r1", "run", "--review", "--network", "open", "-w", str(ws),
                  "--", "sh", "-c", agent, env=uenv, user=USER, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr
    rid = _review_id(res.stderr)
    assert "left out: 1 FIFOs, sockets or devices" in res.stderr
    work = Path(uenv["COI_HOME"]) / "reviews" / rid / "work"
    assert os.readlink(work / "sshlink") == str(ssh)
    assert not (work / "fifo").exists() and not (work / "fifo").is_symlink()
    assert stat.S_IMODE((work / "suid").lstat().st_mode) == 0o755
    assert stat.S_IMODE((work / "open").lstat().st_mode) == 0o644
    for p in work.rglob("*"):
        assert p.lstat().st_uid == user.pw_uid, p
    diff = _diff(rid, uenv)
    assert diff["sshlink"] == "refused" and diff["etc-link"] == "refused"
    applied = run_coi("apply", rid, "--partial", env=uenv, user=USER)
    assert applied.returncode in (0, 1), applied.stdout + applied.stderr
    # Nothing went through the links: the user's keys are as they were.
    assert fingerprint(ssh) == ssh_before
    assert not (ws / "sshlink").is_symlink()
    assert not (ws / "suid").exists() or not (ws / "suid").stat().st_mode & 0o6000


def test_a_background_shell_is_fetched_on_demand_and_at_shutdown(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],
    ws: Path,
) -> None:
    before = fingerprint(ws)
    bg = run_coi("--remote", "r1", "shell", "--background", "--debug", "--review", "--network",
                 "open", "-w", str(ws), env=uenv, user=USER, timeout=240)  # fmt: skip
    assert bg.returncode == 0, bg.stderr
    rid = _review_id(bg.stderr)
    (name,) = _names(remote)

    def agent(cmd: str, marker: str) -> None:
        sent = run_coi("--remote", "r1", "tmux", "send", name, f"{cmd} && echo {marker}",
                       env=uenv, user=USER)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        end = time.monotonic() + 30
        while marker not in run_coi("--remote", "r1", "tmux", "capture", name, env=uenv,
                                    user=USER).stdout:  # fmt: skip
            assert time.monotonic() < end, f"the pane never showed {marker}"
            time.sleep(0.3)

    agent("echo first > /workspace/first.txt", "did-$((6*7))")
    assert _diff(rid, uenv) == {}  # nothing fetched yet
    # No --remote: the review recorded the daemon and project its sandbox runs on.
    fetched = run_coi("review", "fetch", rid, env=uenv, user=USER, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    assert f"Fetched the agent's work into review {rid}" in fetched.stderr
    assert _diff(rid, uenv) == {"first.txt": "added"}
    # Told to look on the local daemon: the sandbox is not there.
    local = run_coi("--remote", "local", "review", "fetch", rid, env=uenv, user=USER,
                    timeout=120)  # fmt: skip
    assert local.returncode == 2 and f"no sandbox {name}" in local.stderr, local.stderr

    agent("rm /workspace/a.txt && echo later > /workspace/second.txt", "did-$((6*8))")
    down = run_coi("--remote", "r1", "shutdown", name, env=uenv, user=USER, timeout=120)
    assert down.returncode == 0, down.stderr
    _wait_none(remote)
    assert _diff(rid, uenv) == {
        "first.txt": "added",
        "second.txt": "added",
        "a.txt": "deleted",
    }
    assert fingerprint(ws) == before


def test_review_with_a_persistent_remote_sandbox_is_refused_and_leaves_no_review(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],
    ws: Path,
) -> None:
    res = run_coi("--remote", "r1", "run", "--review", "--persistent", "-w", str(ws), "--",
                  "true", env=uenv, user=USER, timeout=120)  # fmt: skip
    assert res.returncode != 0
    assert "review mode on a remote daemon needs a sandbox made for the session" in res.stderr
    listed = run_coi("review", "list", "--format", "json", env=uenv, user=USER)
    assert json.loads(listed.stdout) == []
    assert _names(remote) == []


def test_a_fetch_over_the_cap_keeps_the_sandbox_and_the_review_as_it_was(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],
    ws: Path,
) -> None:
    """review.max_file_size 1KB: the cap is 100 KB; the agent writes 300 KB. The fetch is
    refused, work/ is left as uploaded, and coi run keeps the sandbox so nothing is lost: a
    fetch with a larger cap then brings it, and coi kill removes it."""
    small = {**uenv, "COI_REVIEW_MAX_FILE_SIZE": "1KB"}
    res = run_coi("--remote", "r1", "run", "--review", "--network", "open", "-w", str(ws),
                  "--", "sh", "-c", "head -c 300000 /dev/zero > /workspace/big.bin",
                  env=small, user=USER, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr
    rid = _review_id(res.stderr)
    assert "too big to fetch (the cap is 100 KB)" in res.stderr
    assert "Kept container" in res.stderr
    (name,) = _names(remote)
    work = Path(uenv["COI_HOME"]) / "reviews" / rid / "work"
    assert sorted(p.name for p in work.iterdir()) == ["a.txt", "b.txt", "sub"]
    assert not list((work.parent).glob(".fetch-*"))  # nothing half-made left
    fetched = run_coi("--remote", "r1", "review", "fetch", rid, env=uenv, user=USER, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    assert _diff(rid, {**uenv, "COI_REVIEW_MAX_FILE_SIZE": "1MB"}) == {"big.bin": "added"}
    killed = run_coi("--remote", "r1", "kill", name, env=uenv, user=USER, timeout=120)
    assert killed.returncode == 0, killed.stderr
    _wait_none(remote)


def _status(remote: remotekit.RemoteDaemon, name: str) -> str:  # noqa: F811
    with remote.admin(PROJECT) as c:
        return c.instances.get(name).status


def test_a_shell_sandbox_that_stopped_by_itself_is_started_to_fetch_its_work(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],
    ws: Path,
) -> None:
    """The sandbox of a background shell stops without coi (as max_duration's watchdog or
    the agent's poweroff stops it: here the daemon's admin): `coi review fetch` starts it,
    fetches the work and leaves it stopped; `coi shutdown` fetches again and removes it."""
    before = fingerprint(ws)
    bg = run_coi("--remote", "r1", "shell", "--background", "--debug", "--review", "--network",
                 "open", "-w", str(ws), env=uenv, user=USER, timeout=240)  # fmt: skip
    assert bg.returncode == 0, bg.stderr
    rid = _review_id(bg.stderr)
    (name,) = _names(remote)
    sent = run_coi("--remote", "r1", "tmux", "send", name,
                   "echo kept > /workspace/kept.txt && rm /workspace/b.txt && echo did-$((6*7))",
                   env=uenv, user=USER)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    end = time.monotonic() + 30
    while "did-42" not in run_coi("--remote", "r1", "tmux", "capture", name, env=uenv,
                                  user=USER).stdout:  # fmt: skip
        assert time.monotonic() < end, "the agent's command never ran"
        time.sleep(0.3)
    with remote.admin(PROJECT) as c:
        c.instances.stop(name, force=True)
    assert _status(remote, name) == "Stopped"

    fetched = run_coi("review", "fetch", rid, env=uenv, user=USER, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    assert f"{name} stopped by itself" in fetched.stderr
    assert f"Fetched the agent's work into review {rid}" in fetched.stderr
    assert _diff(rid, uenv) == {"kept.txt": "added", "b.txt": "deleted"}
    assert _status(remote, name) == "Stopped"  # left as it was found

    down = run_coi("--remote", "r1", "shutdown", name, env=uenv, user=USER, timeout=120)
    assert down.returncode == 0, down.stderr
    assert f"Fetched the agent's work into review {rid}" in down.stderr
    _wait_none(remote)
    assert _diff(rid, uenv) == {"kept.txt": "added", "b.txt": "deleted"}
    assert fingerprint(ws) == before


def test_a_run_sandbox_deleted_when_it_stopped_says_there_is_nothing_to_fetch(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],
    ws: Path,
) -> None:
    """A `coi run` sandbox is ephemeral: stopped under its command (as the agent's poweroff
    stops it: here the daemon's admin), the daemon deletes it, work and all. coi says so
    (not "kept", not a failed fetch) and the review is as it was uploaded."""
    argv = coi_argv("--remote", "r1", "run", "--review", "--network", "open", "-w", str(ws),
                    "--", "sh", "-c", "echo lost > /workspace/lost.txt && echo wrote && "
                    "sleep 120", user=USER)  # fmt: skip
    proc = subprocess.Popen(argv, env=uenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "wrote\n"  # the command runs: its file is written
        (name,) = _names(remote)
        with remote.admin(PROJECT) as c:
            c.instances.stop(name, force=True)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rid = _review_id(err)
    assert f"{name} is gone (an ephemeral sandbox is deleted when it stops" in err
    assert f"nothing to fetch; review {rid} holds the workspace as it was uploaded" in err
    assert "Kept container" not in err and "could not be fetched" not in err
    _wait_none(remote)
    assert _diff(rid, uenv) == {}


def test_an_interactive_shell_whose_sandbox_stops_under_it_still_brings_the_work_back(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],
    ws: Path,
) -> None:
    """The sandbox stops while the user is attached (as the agent's poweroff stops it: here
    the daemon's admin): the session ends, and its cleanup starts the sandbox to fetch the
    work before removing it."""
    import pexpect

    argv = coi_argv("--remote", "r1", "shell", "--debug", "--review", "--network", "open",
                    "-w", str(ws), user=USER)  # fmt: skip
    child = pexpect.spawn(argv[0], argv[1:], env=uenv, encoding="utf-8", timeout=120,
                          dimensions=(40, 120))  # fmt: skip
    try:
        child.expect("Mode: Interactive")
        rid = _review_id(child.before)
        time.sleep(1)  # let tmux draw its shell before we type
        child.sendline("echo made > /workspace/made.txt && echo did-$((6*7))")
        child.expect("did-42")
        (name,) = _names(remote)
        with remote.admin(PROJECT) as c:
            c.instances.stop(name, force=True)
        child.expect(f"{name} stopped by itself")
        child.expect(f"Fetched the agent's work into review {rid}")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    _wait_none(remote)
    assert _diff(rid, uenv) == {"made.txt": "added"}
