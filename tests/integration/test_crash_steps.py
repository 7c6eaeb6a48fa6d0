"""kill -9 of `coi build`, `coi snapshot`, `coi file push` and `coi clean` at their steps:
nothing is left half made, nothing runs on unwatched, and the next command works."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import USER, coi_names, proc_state, user_dir, wait_for

from coi import checkpoint
from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.errors import BackendError
from coi.images.builder import BUILD_PREFIX, BUILT_FROM

WITHIN = 10  # seconds: the keeper looks once a second; the daemon's forced stop is quick


def _frozen_then_killed(argv: list[str], env: dict[str, str], step: str) -> None:
    """Start coi, wait until it stopped itself at `step` (the test hook), kill it hard."""
    proc = subprocess.Popen(
        argv, env={**env, checkpoint.ENV: step},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: proc_state(proc.pid) == "T", f"coi to stop at {step}", 120)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _builds(client: IncusClient) -> list[str]:
    return [n for n in client.instances.names() if n.startswith(BUILD_PREFIX)]


def _nameless_builds(client: IncusClient) -> list[str]:
    return [
        i.fingerprint for i in client.images.list() if not i.aliases and BUILT_FROM in i.properties
    ]


@pytest.mark.parametrize("step", checkpoint.BUILD_STEPS)
def test_kill_9_at_each_step_of_coi_build(
    client: IncusClient, coi_env: dict[str, str], tmp_path: Path, unique: str, step: str
) -> None:
    """Within 10 s of the kill no build container runs or remains (the build's keeper ends
    it) and no image it published is left without a name;
    the next build of the same image works."""
    script = tmp_path / "build.sh"
    script.write_text("echo built > /root/built\n")
    argv = coi_argv("build", "custom", unique, "--script", str(script), "--base", "coi-tiny")
    try:
        _frozen_then_killed(argv, coi_env, step)
        killed_at = time.monotonic()
        wait_for(
            lambda: not _builds(client) and not _nameless_builds(client),
            f"what coi build killed at {step} left to go",
            WITHIN + 20,
        )
        took = time.monotonic() - killed_at
        assert took < WITHIN, f"gone after {took:.1f} s"
        assert not client.images.exists(unique)  # it never got its name
        again = run_coi("build", "custom", unique, "--script", str(script), "--base", "coi-tiny",
                        env=coi_env)  # fmt: skip
        assert again.returncode == 0, again.stderr
        made = client.images.alias_target(unique)
        assert made
        assert _builds(client) == [] and _nameless_builds(client) == []
    finally:
        if client.images.exists(unique):
            client.images.delete(client.images.alias_target(unique) or unique)


def test_coi_clean_removes_an_image_a_killed_build_left_without_a_name(
    client: IncusClient, coi_env: dict[str, str], unique: str, pool: str
) -> None:
    """When its keeper could not (it was killed too, e.g. a power loss), `coi clean` finds
    an image a build published and never named, whose build container is gone."""
    name = f"{BUILD_PREFIX}{unique[-6:]}"
    client.instances.create(
        name, image="coi-tiny", devices={"root": {"type": "disk", "path": "/", "pool": pool}}
    )
    try:
        fp = client.images.publish(instance=name, properties={BUILT_FROM: name})
    finally:
        client.instances.delete(name, force=True)
    try:
        dry = run_coi("clean", "--dry-run", env=coi_env)
        assert dry.returncode == 0 and fp[:12] in dry.stdout, dry.stdout
        res = run_coi("clean", "--force", env=coi_env)
        assert res.returncode == 0, res.stderr
        assert not client.images.exists_fingerprint(fp)
    finally:
        if client.images.exists_fingerprint(fp):
            client.images.delete(fp)


def test_kill_9_of_a_file_push_mid_stream_keeps_the_old_file(
    client: IncusClient, coi_env: dict[str, str], tmp_path: Path, unique: str
) -> None:
    """`coi file push` of a big file killed while the daemon receives it: the file it was
    replacing is whole (the push streams beside it and renames over it at the end); the
    next push of that path works and removes the dead push's part."""
    from coi.sessions.files import part_path

    res = run_coi("container", "launch", "coi-tiny", unique, env=coi_env)
    assert res.returncode == 0, res.stderr
    try:
        made = client.exec.capture(unique, ExecRequest(["sh", "-c", "echo old > /data.txt"]))
        assert made.exit_code == 0, made.stderr
        big = tmp_path / "big"
        with big.open("wb") as f:
            f.truncate(400 * 1024 * 1024)  # sparse on the host; streamed whole to the daemon
        proc = subprocess.Popen(
            coi_argv("file", "push", str(big), f"{unique}:/data.txt"), env=coi_env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        part = part_path("/data.txt", proc.pid)

        def streaming() -> bool:
            info = client.files.stat(unique, part)
            return info is not None

        try:
            wait_for(streaming, "the push to be under way", 60)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert client.files.read(unique, "/data.txt") == b"old\n"
        new = tmp_path / "new.txt"
        new.write_text("new\n")
        again = run_coi("file", "push", str(new), f"{unique}:/data.txt", env=coi_env)
        assert again.returncode == 0, again.stderr
        assert client.files.read(unique, "/data.txt") == b"new\n"
        assert client.files.stat(unique, part) is None  # the dead push's part is gone
        assert [n for n in client.files.listdir(unique, "/") if "coi-part" in n] == []
    finally:
        client.instances.delete(unique, force=True)


@pytest.fixture
def full_pool(client: IncusClient, unique: str) -> Iterator[str]:
    """A small storage pool of the test's own (a 160 MiB btrfs loop file), filled to the
    brim by a stopped container of the test's."""
    name = f"coi-it-full-{unique[-6:]}"
    client.networks.create_pool(name, driver="btrfs", config={"size": "160MiB"})
    filler = f"filler-{unique[-6:]}"
    try:
        client.instances.create(
            filler, image="coi-tiny", start=True,
            devices={"root": {"type": "disk", "path": "/", "pool": name}},
        )  # fmt: skip
        client.exec.capture(
            filler, ExecRequest(["sh", "-c", "dd if=/dev/zero of=/fill bs=1M; sync"])
        )
        client.instances.stop(filler, force=True)
        yield name
    finally:
        if client.instances.exists(filler):
            client.instances.delete(filler, force=True)
        for n in client.instances.names():  # anything a failed assertion left on it
            if n.startswith("coi-") and client.instances.get(n).config.get("user.coi.kind"):
                with contextlib.suppress(BackendError):
                    client.instances.delete(n, force=True)
        client.networks.delete_pool(name)


ARGV = ("run", "--image", "coi-tiny", "-w")


def test_a_full_storage_pool_is_a_clear_error_and_leaves_nothing(
    client: IncusClient, full_pool: str, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """`coi run` on a pool with no room: it says the storage is full and what to do, exits
    non-zero, and leaves no container, slot claim or keeper; once there is room it works."""
    ws = user_dir(base / "ws", user)
    env = {**uenv, "COI_POOL": full_pool}
    res = run_coi(
        "run", "--image", "coi-tiny", "-w", str(ws), "--", "echo", "hi", env=env, user=USER
    )
    assert res.returncode == 1, res.stderr
    assert "no space left on device" in res.stderr
    assert "The daemon's storage is full" in res.stderr  # the resolution
    wait_for(lambda: not coi_names(client, ws), "nothing of the failed run to be left", 15)
    assert list((Path(uenv["COI_HOME"]) / "locks").glob("*.claim")) == []
    # What the daemon keeps on the pool: nothing of the failed create's container.
    vols = client.get(f"/1.0/storage-pools/{full_pool}/volumes", recursion=1) or []
    assert [v["name"] for v in vols if v["type"] == "container"] == [
        f"filler-{full_pool.rsplit('-', 1)[1]}"
    ]
    client.instances.delete(f"filler-{full_pool.rsplit('-', 1)[1]}", force=True)
    # btrfs frees a deleted subvolume's space in the background: a few tries, bounded.
    runs: list[subprocess.CompletedProcess[str]] = []

    def works() -> bool:
        runs.append(run_coi(*ARGV, str(ws), "--", "echo", "hi", env=env, user=USER))
        return runs[-1].returncode == 0

    wait_for(works, "coi run to work once the pool has room", 60)
    assert runs[-1].stdout.strip() == "hi", runs[-1].stderr
    wait_for(lambda: not coi_names(client, ws), "the run's sandbox to go", 15)


def test_the_first_coi_after_a_daemon_restart_removes_a_run_sandbox_left_stopped(
    client: IncusClient, pool: str, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """What a power loss leaves (the daemon's own restart is in test_daemon_restart.py): an
    ephemeral `coi run` sandbox, stopped, whose coi is gone. The first coi that sees a daemon
    of another process than the last one it saw has it removed, off its own path; a live
    coi's sandbox (its slot claimed) and a persistent one are never taken."""
    import socket

    from coi import labels
    from coi.sessions import naming

    home = Path(uenv["COI_HOME"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = naming.container_name(str(base / "gone"), 1)
    kept = naming.container_name(str(base / "kept"), 1)
    for name, persistent in ((left, "false"), (kept, "true")):
        client.instances.create(
            name, image="coi-tiny", ephemeral=persistent == "false",
            devices={"root": {"type": "disk", "path": "/", "pool": pool}},
            config={labels.KIND: "run", labels.OWNER_HOST: socket.gethostname(),
                    labels.OWNER_PID: str(dead.pid), labels.PERSISTENT: persistent},
        )  # fmt: skip
    try:
        seen = home / "state" / f"daemon-seen-{client.project}"
        seen.parent.mkdir(parents=True, exist_ok=True)
        seen.write_text("1\n")  # a daemon process of before
        for made in (home, seen.parent, seen):
            os.chown(made, user.pw_uid, user.pw_gid)
        ws = user_dir(base / "ws", user)
        res = run_coi(*ARGV, str(ws), "--", "true", env=uenv, user=USER)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: not client.instances.exists(left), "the left sandbox to go", 30)
        assert client.instances.exists(kept)
        assert seen.read_text().strip() == str(client.server.pid)
        assert "removed " + left in (home / "logs" / "reap.log").read_text()
    finally:
        for name in (left, kept):
            if client.instances.exists(name):
                client.instances.delete(name, force=True)


def test_kill_9_of_coi_clean_midway_and_the_next_clean_finishes(
    client: IncusClient, coi_env: dict[str, str], pool: str, tmp_path: Path
) -> None:
    """`coi clean --force` killed after removing its first container: what it had not got to
    is still whole, and the next `coi clean` removes it."""
    import socket

    from coi import labels
    from coi.sessions import naming

    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [naming.container_name(str(tmp_path / "ws"), n) for n in (1, 2)]
    for name in names:  # two sandboxes of a coi that is gone, stopped
        client.instances.create(
            name, image="coi-tiny",
            devices={"root": {"type": "disk", "path": "/", "pool": pool}},
            config={labels.KIND: "shell", labels.OWNER_HOST: socket.gethostname(),
                    labels.OWNER_PID: str(dead.pid), labels.PERSISTENT: "false",
                    labels.WORKSPACE: str(tmp_path / "ws")},
        )  # fmt: skip
    try:
        _frozen_then_killed(coi_argv("clean", "--force"), coi_env, "clean-removing")
        left = [n for n in names if client.instances.exists(n)]
        assert len(left) == 1, left  # one removed, one not yet
        assert client.instances.get(left[0]).status == "Stopped"
        res = run_coi("clean", "--force", env=coi_env)
        assert res.returncode == 0, res.stderr
        assert [n for n in names if client.instances.exists(n)] == []
    finally:
        for name in names:
            if client.instances.exists(name):
                client.instances.delete(name, force=True)


def test_kill_9_of_a_snapshot_restore_between_stop_and_restore(
    client: IncusClient, coi_env: dict[str, str], unique: str
) -> None:
    """`coi snapshot restore` of a running container killed once it stopped it: the
    container is whole (stopped, as it was before the restore), the snapshot is there, and
    the restore run again brings it back."""
    res = run_coi("container", "launch", "coi-tiny", unique, env=coi_env)
    assert res.returncode == 0, res.stderr
    try:
        client.exec.capture(unique, ExecRequest(["sh", "-c", "echo one > /a"]))
        snap = run_coi("snapshot", "create", "s1", "-c", unique, env=coi_env)
        assert snap.returncode == 0, snap.stderr
        client.exec.capture(unique, ExecRequest(["sh", "-c", "echo two > /a"]))
        argv = coi_argv("snapshot", "restore", "s1", "-c", unique, "-f")
        _frozen_then_killed(argv, coi_env, "snapshot-stopped")
        assert client.instances.get(unique).status == "Stopped"
        assert [s.name for s in client.instances.snapshots(unique)] == ["s1"]
        again = run_coi("snapshot", "restore", "s1", "-c", unique, "-f", env=coi_env)
        assert again.returncode == 0, again.stderr
        client.instances.start(unique)
        out = client.exec.capture(unique, ExecRequest(["cat", "/a"]))
        assert out.stdout == b"one\n"
    finally:
        client.instances.delete(unique, force=True)
