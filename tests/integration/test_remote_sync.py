"""The workspace's cache on a remote daemon (tests/remotekit.py: a second Incus over HTTPS
only): the first session sends the whole workspace, a later one only what changed; the
sandbox sees exactly the user's files either way; what an agent writes never reaches the
cache or the next session; a missing or unknown cache means a whole upload, said."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests import remotekit
from tests.conftest import run_coi
from tests.integration.test_remote import (
    _add,
    remote,  # noqa: F401  (the second daemon)
)

from coi.sessions import wscache

PROJECT = f"coi-{getpass.getuser()}"

SUMMARY = re.compile(
    r"Copied the workspace to the remote sandbox: (\d+) entries, ([\d.]+) MB of files "
    r"\(([\d.]+) MB sent, (.*)\) in [\d.]+ s"
)

# Inside the sandbox: every entry of the workspace with its kind, owner, mode (a file's mtime)
# and content
# (a link's target), one line each, sorted (busybox's find, stat and sha256sum). A link's
# owner is left out: busybox's tar does not set it (root's), GNU tar's does (the agent's).
LISTING = r"""
cd /workspace && find . -mindepth 1 | sort | while IFS= read -r p; do
  if [ -L "$p" ]; then echo "$p link $(readlink "$p")";
  elif [ -d "$p" ]; then echo "$p dir $(stat -c '%u %a' "$p")";
  elif [ -f "$p" ]; then
    echo "$p file $(stat -c '%u %a %Y' "$p") $(sha256sum < "$p" | cut -c1-64)";
  else echo "$p other"; fi
done
"""


def _listing(root: Path, *, left_out: tuple[str, ...] = ()) -> list[str]:
    """What LISTING prints for the user's folder, as the agent (uid 1000) should see it."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            rel = "./" + str(p.relative_to(root))
            if rel[2:] in left_out:
                continue
            st = os.lstat(p)
            mode = oct(st.st_mode & 0o7777)[2:]
            if p.is_symlink():
                out.append(f"{rel} link {os.readlink(p)}")
            elif p.is_dir():
                out.append(f"{rel} dir 1000 {mode}")
            elif p.is_file():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out.append(f"{rel} file 1000 {mode} {int(st.st_mtime)} {digest}")
    return sorted(out)


MTIME = re.compile(r"^(\S+ file \d+ \d+) (\d+) ")


def _check(stdout: str, expected: list[str]) -> None:
    """The sandbox's listing is the expected one; a file's mtime within a second (busybox's
    tar sets whole seconds, with the whole upload as before)."""
    got = stdout.splitlines()
    assert [MTIME.sub(r"\1 ", x) for x in got] == [MTIME.sub(r"\1 ", x) for x in expected]
    for g, e in zip(got, expected, strict=True):
        mg, me = MTIME.match(g), MTIME.match(e)
        if mg and me:
            assert abs(int(mg[2]) - int(me[2])) <= 1, (g, e)


@pytest.fixture
def env(tmp_path: Path, remote: remotekit.RemoteDaemon) -> dict[str, str]:  # noqa: F811
    remotekit.check_route(remote)
    e = remotekit.user_env(tmp_path)
    _add(remote, e)
    return e


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace of 3 MB: 30 files of 100 kB in folders, small files, a link, a FIFO."""
    ws = tmp_path / "ws"
    for i in range(30):
        p = ws / f"d{i % 3}" / f"blob{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(100_000))
    (ws / "notes.txt").write_text("from the host\n")
    (ws / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(ws / "run.sh", 0o755)
    os.symlink("notes.txt", ws / "link")
    os.mkfifo(ws / "fifo")
    return ws


def _run(env: dict[str, str], ws: Path, script: str) -> subprocess.CompletedProcess[str]:
    res = run_coi("--remote", "r1", "run", "--network", "open", "-w", str(ws), "--", "sh",
                  "-c", script, env=env, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res


def _summary(stderr: str) -> tuple[int, float, float, str]:
    found = SUMMARY.search(stderr)
    assert found, stderr
    return int(found[1]), float(found[2]), float(found[3]), found[4]


def _volumes(remote: remotekit.RemoteDaemon) -> dict[str, dict[str, object]]:  # noqa: F811
    """The cache volumes on the daemon (the user's project keeps its volumes in default)."""
    with remote.admin() as c:
        vols = c.get("/1.0/storage-pools/coi/volumes/custom", recursion=1) or []
    return {v["name"]: v for v in vols if v["name"].startswith(wscache.PREFIX)}


def test_the_second_session_sends_only_what_changed(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    env: dict[str, str],
    ws: Path,
) -> None:
    first = _run(env, ws, LISTING)
    entries, size, sent, how = _summary(first.stderr)
    assert how == "the whole workspace: no cache of it on the server yet"
    assert sent >= 3.0 and size >= 3.0
    # The FIFO is left out, as it always was; the link is a link.
    _check(first.stdout, _listing(ws, left_out=("fifo",)))
    assert entries == len(first.stdout.splitlines())
    # The cache is on the server, says whose it is, and is attached to no sandbox.
    vol = _volumes(remote)[wscache.volume_name(str(ws), PROJECT)]
    assert vol["used_by"] == []
    assert str(ws) in str(vol["description"])

    # Nothing changed: nothing is sent (the archive is its end marker, the list empty).
    again = _run(env, ws, LISTING)
    assert again.stdout == first.stdout
    assert _summary(again.stderr)[2:] == (0.0, "only what changed: 0 files, 0 removed")

    # One file changed, one added, one deleted, a link pointed elsewhere, a mode changed.
    with open(ws / "d1" / "blob4.bin", "r+b") as f:
        f.seek(50_000)
        f.write(b"changed by the user")
    (ws / "d2" / "new.txt").write_text("new\n")
    (ws / "d0" / "blob0.bin").unlink()
    (ws / "link").unlink()
    os.symlink("run.sh", ws / "link")
    os.chmod(ws / "notes.txt", 0o600)
    os.chmod(ws / "d0", 0o750)
    third = _run(env, ws, LISTING)
    entries, size, sent, how = _summary(third.stderr)
    assert how == "only what changed: 4 files, 1 removed"
    # One 100 kB file and small ones: about 0.1 MB, where the whole is 3 MB.
    assert sent <= 0.2, third.stderr
    _check(third.stdout, _listing(ws, left_out=("fifo",)))
    assert "./d0/blob0.bin" not in third.stdout
    assert _volumes(remote)[wscache.volume_name(str(ws), PROJECT)]["used_by"] == []


def test_what_the_agent_writes_never_reaches_the_cache(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    env: dict[str, str],
    ws: Path,
) -> None:
    """The agent changes, plants and deletes files, and looks for
    the cache; the next session on the same workspace sees exactly the user's files."""
    agent = (
        "cd /workspace && echo evil > notes.txt && echo planted > d1/planted.sh "
        "&& rm d2/blob2.bin && mkdir -p .git/hooks && echo hook > .git/hooks/post-checkout "
        "&& ln -sf /etc/shadow link; "
        # The cache is not there to reach: not mounted, not at its path.
        f"grep -c {wscache.MOUNT} /proc/mounts; ls {wscache.MOUNT} 2>&1; true"
    )
    first = _run(env, ws, agent)
    assert first.stdout.splitlines()[0] == "0"
    assert "No such file or directory" in first.stdout
    second = _run(env, ws, LISTING)
    assert _summary(second.stderr)[3] == "only what changed: 0 files, 0 removed"
    _check(second.stdout, _listing(ws, left_out=("fifo",)))
    assert "planted" not in second.stdout and ".git" not in second.stdout


def test_a_missing_or_unknown_cache_means_a_whole_upload(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    env: dict[str, str],
    ws: Path,
) -> None:
    _run(env, ws, "true")
    name = wscache.volume_name(str(ws), PROJECT)
    # Its generation changed behind this machine's back: whole, and said.
    gen = remote.root / "pool" / "custom" / f"default_{name}" / "gen"
    gen.write_text("someone else's")
    res = _run(env, ws, LISTING)
    assert _summary(res.stderr)[3] == (
        "the whole workspace: its cache on the server is not the one this machine recorded"
    )
    _check(res.stdout, _listing(ws, left_out=("fifo",)))
    # The manifest on this machine is gone: whole.
    manifests = list((Path(env["COI_HOME"]) / "remote-workspaces").glob("*.json"))
    assert len(manifests) == 1
    assert manifests[0].stat().st_mode & 0o777 == 0o600
    manifests[0].unlink()
    res = _run(env, ws, "true")
    assert _summary(res.stderr)[3] == (
        "the whole workspace: this machine has no record of its cache on the server"
    )
    # The volume is gone: made again, whole.
    with remote.admin() as c:
        c.networks.delete_volume("coi", name)
    (ws / "notes.txt").write_text("after the cache went\n")
    res = _run(env, ws, LISTING)
    assert _summary(res.stderr)[3] == "the whole workspace: no cache of it on the server yet"
    _check(res.stdout, _listing(ws, left_out=("fifo",)))
    # And the one after sends only what changed again.
    res = _run(env, ws, "true")
    assert _summary(res.stderr)[3] == "only what changed: 0 files, 0 removed"


def test_a_file_masked_later_leaves_the_cache(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    env: dict[str, str],
    ws: Path,
) -> None:
    """Sent while not masked, then mask_secrets turned on: the next session removes it from
    the cache and the sandbox, and the cache's disk no longer holds it."""
    (ws / ".env").write_text("API_KEY=sent-before-masking\n")
    first = _run(env, ws, LISTING)
    assert "./.env file" in first.stdout
    conf = Path(env["XDG_CONFIG_HOME"]) / "coi" / "config.toml"
    conf.write_text("[security]\nmask_secrets = true\n")
    second = _run(env, ws, LISTING)
    assert _summary(second.stderr)[3] == "only what changed: 0 files, 1 removed"
    _check(second.stdout, _listing(ws, left_out=("fifo", ".env")))
    _no_secret_in_cache(remote, ws)


def _no_secret_in_cache(rd: remotekit.RemoteDaemon, ws: Path) -> None:
    """Nothing of the secret is in the workspace's cache on the server's disk."""
    cache = rd.root / "pool" / "custom" / f"default_{wscache.volume_name(str(ws), PROJECT)}"
    found = subprocess.run(["grep", "-r", "API_KEY", str(cache)], capture_output=True)
    assert found.returncode == 1, found.stdout


def test_masked_files_stay_out_of_the_cache_too(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    env: dict[str, str],
    ws: Path,
) -> None:
    (ws / ".env").write_text("API_KEY=on-the-host-only\n")
    os.link(ws / ".env", ws / "env-hardlink")
    conf = Path(env["XDG_CONFIG_HOME"]) / "coi" / "config.toml"
    conf.write_text("[security]\nmask_secrets = true\n")
    first = _run(env, ws, LISTING)
    left_out = ("fifo", ".env", "env-hardlink")
    _check(first.stdout, _listing(ws, left_out=left_out))
    (ws / ".env").write_text("API_KEY=changed\n")
    second = _run(env, ws, LISTING)
    assert _summary(second.stderr)[3] == "only what changed: 0 files, 0 removed"
    _check(second.stdout, _listing(ws, left_out=left_out))
    _no_secret_in_cache(remote, ws)


def test_clean_removes_the_caches_only_when_asked(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    env: dict[str, str],
    ws: Path,
) -> None:
    _run(env, ws, "true")
    name = wscache.volume_name(str(ws), PROJECT)
    assert name in _volumes(remote)
    # The same user's cache for another project, kept in the default project as well.
    other = wscache.volume_name(str(ws), "coi-other")
    config = {
        wscache.OWNER_KEY: wscache.owner(),
        wscache.WORKSPACE_KEY: str(ws),
        wscache.PROJECT_KEY: "coi-other",
    }
    with remote.admin() as c:
        c.request("POST", "/1.0/storage-pools/coi/volumes/custom",
                  json={"name": other, "type": "custom", "config": config})  # fmt: skip
    kept = run_coi("--remote", "r1", "clean", "--force", env=env, timeout=120)
    assert kept.returncode == 0, kept.stderr
    assert re.search(r"Kept \d+ workspace cache\(s\) on the server", kept.stdout), kept.stdout
    assert name in _volumes(remote)
    gone = run_coi("--remote", "r1", "clean", "--workspace-caches", "--force", env=env,
                   timeout=120)  # fmt: skip
    assert gone.returncode == 0, gone.stderr
    assert f"Deleted workspace cache {name}" in gone.stdout
    assert name not in _volumes(remote)
    assert other in _volumes(remote)  # another project's: not this clean's
    with remote.admin() as c:
        c.networks.delete_volume("coi", other)
    assert list((Path(env["COI_HOME"]) / "remote-workspaces").glob("*.json")) == []
    res = _run(env, ws, "true")
    assert _summary(res.stderr)[3] == "the whole workspace: no cache of it on the server yet"
    json.dumps(_volumes(remote))  # the listing stays readable after a clean


def test_a_cache_that_cannot_be_attached_means_the_whole_workspace_said(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    env: dict[str, str],
    ws: Path,
) -> None:
    """Under the cache's name, a volume a container cannot attach (a block volume): the
    session says the cache was not used and the sandbox still gets exactly the user's files."""
    name = wscache.volume_name(str(ws), PROJECT)
    with remote.admin() as c:
        c.request(
            "POST",
            "/1.0/storage-pools/coi/volumes/custom",
            json={"name": name, "type": "custom", "content_type": "block",
                  "config": {"size": "10MiB"}},
        )  # fmt: skip
    try:
        res = _run(env, ws, LISTING)
        assert "the workspace's cache on the server was not used" in res.stderr
        assert _summary(res.stderr)[3] == "the whole workspace"
        _check(res.stdout, _listing(ws, left_out=("fifo",)))
        assert not list((Path(env["COI_HOME"]) / "remote-workspaces").glob("*.json"))
    finally:
        with remote.admin() as c:
            c.networks.delete_volume("coi", name)


def test_two_sessions_at_once_take_turns_with_the_cache(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    env: dict[str, str],
    ws: Path,
) -> None:
    """Two sessions of one workspace start together: each sandbox gets exactly the user's
    files, and the cache is whole after (the next session sends nothing)."""
    _run(env, ws, "true")
    (ws / "notes.txt").write_text("changed before two sessions\n")
    cmd = [sys.executable, "-m", "coi", "--remote", "r1", "run", "--network", "open", "-w",
           str(ws), "--", "sh", "-c", LISTING]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    expected = _listing(ws, left_out=("fifo",))
    hows = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        _check(out, expected)
        hows.append(_summary(err)[3])
    # One sent the change, the other found it in the cache already.
    assert sorted(hows) == [
        "only what changed: 0 files, 0 removed",
        "only what changed: 1 files, 0 removed",
    ]
    assert _summary(_run(env, ws, "true").stderr)[3] == "only what changed: 0 files, 0 removed"
