"""Sessions on the real daemon, run as an unprivileged host user whose uid is not 1000."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pexpect
import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import (
    USER,
    coi_names,
    converse,
    leave,
    remove_containers,
    spawn_shell,
    user_dir,
    wait_gone,
)

from coi import labels
from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.sessions.context import MARK


@pytest.mark.lxd
def test_run_as_user_ownership_exit_code_and_no_leftover(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_coi(
        "run",
        "--image",
        "coi-tiny",
        "--workspace",
        str(ws),
        "-e",
        "FOO=bar",
        "-e",
        "X=a,b=c",
        "--",
        "sh",
        "-c",
        'id -u; echo "FOO=$FOO SECRET=$SECRET_TOKEN"; echo "X=$X"; touch /workspace/x; exit 7',
        env=uenv,
        user=USER,
    )
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines() == ["1000", "FOO=bar SECRET=", "X=a,b=c"]
    assert (ws / "x").stat().st_uid == user.pw_uid
    assert (ws / "x").stat().st_gid == user.pw_gid
    wait_gone(client, ws)


@pytest.mark.lxd
def test_a_folder_whose_owner_the_daemon_may_not_map_is_refused_first(
    client: IncusClient, coi_env: dict[str, str], tmp_path: Path
) -> None:
    """A folder owned by a uid that root may not delegate (no /etc/subuid entry covers it):
    the daemon would fail the start with "forkstart ... exit status 1"; coi says why first."""
    ws = tmp_path / "foreign"
    ws.mkdir()
    os.chown(ws, 4242, 4343)
    assert "root:4242:" not in Path("/etc/subuid").read_text()
    res = run_coi("run", "--image", "coi-tiny", "-w", str(ws), "--", "true", env=coi_env)
    assert res.returncode == 1, res.stderr
    assert "cannot be mapped into a sandbox: its uid 4242 is not delegated" in res.stderr
    assert "root:4242:1" in res.stderr and "Launching container" not in res.stderr
    assert coi_names(client, ws) == []


@pytest.mark.lxd
def test_root_on_a_root_owned_folder_writes_as_root_or_is_refused_first(
    client: IncusClient, coi_env: dict[str, str], tmp_path: Path, pool: str
) -> None:
    """Root running coi on its own folder: where the daemon can map host root (idmapped mounts
    and 'root:0:1', which coi setup adds), the agent's files come back owned by root; where
    it cannot, coi refuses before any container is made instead of a read-only workspace."""
    ws = tmp_path / "rootws"
    ws.mkdir()
    assert ws.stat().st_uid == 0 and os.getuid() == 0
    res = run_coi(
        "run",
        "--image",
        "coi-tiny",
        "-w",
        str(ws),
        "--",
        "sh",
        "-c",
        "id -u; touch /workspace/x",
        env=coi_env,
    )
    verdict = (client.networks.pool(pool) or pytest.fail("no pool")).config.get(labels.MAP_ROOT)
    # coi setup probed the daemon: it must have said, one way or the other.
    assert verdict in ("true", "false")
    if verdict == "true":
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ["1000"]
        assert (ws / "x").stat().st_uid == 0 and (ws / "x").stat().st_gid == 0
    else:
        assert res.returncode == 1
        assert "belongs to root" in res.stderr and "could not write it" in res.stderr
        assert "Launching container" not in res.stderr
        assert not (ws / "x").exists()
    assert coi_names(client, ws) == [] or wait_gone(client, ws) is None


@pytest.mark.lxd
def test_a_command_that_does_not_exist_exits_127_like_a_shell(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_coi(
        "run", "--image", "coi-tiny", "-w", str(ws), "--", "no-such-cmd", env=uenv, user=USER
    )
    assert res.returncode == 127, res.stderr
    assert "no-such-cmd: command not found" in res.stderr
    assert "Operation not found" not in res.stderr
    wait_gone(client, ws)


def test_run_capture_json_keeps_exit_code(
    base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_coi(
        "run",
        "--image",
        "coi-tiny",
        "-w",
        str(ws),
        "--capture",
        "--format",
        "json",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
        env=uenv,
        user=USER,
    )
    assert res.returncode == 3
    assert json.loads(res.stdout) == {"stdout": "out\n", "stderr": "err\n", "exit_code": 3}


def test_ten_parallel_runs_get_ten_slots(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)

    def one(_: int) -> subprocess.CompletedProcess[str]:
        return run_coi(
            "run",
            "--image",
            "coi-tiny",
            "-w",
            str(ws),
            "--",
            "sh",
            "-c",
            "hostname; sleep 2",
            env=uenv,
            user=USER,
            timeout=240,
        )

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    failed = [r.stderr[-800:] for r in results if r.returncode != 0]
    assert not failed, failed
    slots = {
        int(line.rsplit("-", 1)[1])
        for r in results
        for line in r.stderr.splitlines()
        if line.startswith("Launching container ")
        for line in [line.split()[2]]
    }
    assert slots == set(range(1, 11))
    wait_gone(client, ws)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_removes_container(
    client: IncusClient,
    base: Path,
    uenv: dict[str, str],
    user: pwd.struct_passwd,
    signum: int,
    code: int,
) -> None:
    ws = user_dir(base / "ws", user)
    proc = subprocess.Popen(
        coi_argv("run", "--image", "coi-tiny", "-w", str(ws), "--", "sleep", "60", user=USER),
        env=uenv,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not coi_names(client, ws) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signum)  # SIGINT is what Ctrl-C sends
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "cleaning up" in err
    wait_gone(client, ws)


def test_shell_without_tmux_saves_the_conversation(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    child = spawn_shell(uenv, ws, "--tmux=false")
    child.expect("Mode: Direct")
    converse(child, "no tmux here")
    child.expect("standin> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    (saved,) = (Path(uenv["COI_HOME"]) / "sessions-standin").iterdir()
    assert (saved / ".standin" / "conversation.log").read_text() == "no tmux here\n"
    wait_gone(client, ws)


@pytest.mark.lxd
def test_shell_saves_conversation_and_resumes_only_in_its_workspace(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    other = user_dir(base / "other", user)
    child = spawn_shell(uenv, ws)
    converse(child, "hello from turn one")
    leave(child)
    sessions = list((Path(uenv["COI_HOME"]) / "sessions-standin").iterdir())
    assert len(sessions) == 1
    log = sessions[0] / ".standin" / "conversation.log"
    assert log.read_text() == "hello from turn one\n"
    assert json.loads((sessions[0] / "metadata.json").read_text())["workspace"] == str(ws)
    wait_gone(client, ws)

    child = spawn_shell(uenv, ws, "--resume")
    child.expect("earlier: hello from turn one")
    converse(child, "turn two")
    leave(child)
    assert log.read_text() == "hello from turn one\nturn two\n"

    res = run_coi(
        "shell",
        "--tool",
        "standin",
        "--image",
        "coi-tiny",
        "-w",
        str(other),
        "--resume",
        env=uenv,
        user=USER,
    )
    assert res.returncode == 1
    assert "no previous session to resume for this workspace" in res.stderr
    wait_gone(client, other)


def test_persistent_container_keeps_installed_files(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    child = spawn_shell(uenv, ws, "--persistent", "--debug")
    child.expect("Mode: Interactive")
    time.sleep(1)  # let tmux draw its shell before we type
    child.sendline("echo installed > /home/code/tool.txt; exit")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    names = coi_names(client, ws)
    assert len(names) == 1
    try:
        child = spawn_shell(uenv, ws, "--persistent", "--debug", "--slot", "1")
        child.expect("Mode: Interactive")
        time.sleep(1)
        child.sendline("cat /home/code/tool.txt; exit")
        child.expect("installed")
        child.expect(pexpect.EOF, timeout=60)
        child.close()
    finally:
        remove_containers(client, ws)


def test_claude_settings_are_merged_not_overwritten(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    home = Path(uenv["HOME"])
    claude_dir = user_dir(home / ".claude", user)
    host_settings = {
        "env": {"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_REGION": "eu-west-1"},
        "model": "my-model",
    }
    (claude_dir / "settings.json").write_text(json.dumps(host_settings))
    (home / ".claude.json").write_text(json.dumps({"userID": "abc"}))
    for p in (claude_dir / "settings.json", home / ".claude.json"):
        os.chown(p, user.pw_uid, user.pw_gid)
    res = run_coi(
        "shell", "--tool", "claude", "--debug", "--background", "--image", "coi-tiny",
        "-w", str(ws), env=uenv, user=USER,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (name,) = coi_names(client, ws)
    try:
        inside = json.loads(client.files.read(name, "/home/code/.claude/settings.json"))
        state = json.loads(client.files.read(name, "/home/code/.claude.json"))
        info = client.files.stat(name, "/home/code/.claude/settings.json")
    finally:
        client.instances.delete(name, force=True)
    assert inside["env"] == {
        "CLAUDE_CODE_USE_BEDROCK": "1",
        "AWS_REGION": "eu-west-1",
        "CLAUDE_CODE_EFFORT_LEVEL": "medium",
    }
    assert inside["model"] == "my-model"
    assert inside["permissions"] == {"defaultMode": "bypassPermissions"}
    assert state["userID"] == "abc" and state["bypassPermissionsModeAccepted"] is True
    assert info is not None and (info.uid, info.mode) == (1000, 0o600)
    # The host's own file is untouched.
    assert json.loads((claude_dir / "settings.json").read_text()) == host_settings


def _own(text: str) -> str:
    """A tool's instructions file without the sandbox context coi adds after the user's."""
    return text.split(MARK, 1)[0].rstrip("\n") + "\n"


def test_settings_are_merged_with_the_containers_own_and_planted_links_are_not_followed(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """coi reads and writes the agent's settings as the agent user, in one command each way;
    a file too big for that goes through the daemon's file API. The agent, between two
    sessions of a persistent container, plants links to make coi read or write elsewhere."""
    ws = user_dir(base / "ws", user)
    claude_dir = user_dir(Path(uenv["HOME"]) / ".claude", user)
    big = ("# notes\n" + "x" * 100 + "\n") * 1000  # 109 KB: over what one variable carries
    (claude_dir / "CLAUDE.md").write_text(big)
    argv = ("shell", "--tool", "claude", "--debug", "--background", "--persistent", "--slot")
    argv += ("1", "--image", "coi-tiny", "-w", str(ws))
    res = run_coi(*argv, env=uenv, user=USER)
    assert res.returncode == 0, res.stderr
    (name,) = coi_names(client, ws)

    def sh(script: str, uid: int = 1000) -> str:
        req = ExecRequest(["sh", "-c", script], env={"HOME": "/home/code"}, user=uid, group=uid)
        r = client.exec.capture(name, req)
        assert r.exit_code == 0, r.stderr
        return r.stdout.decode()

    try:
        given = client.files.read(name, "/home/code/.claude/CLAUDE.md").decode()
        assert _own(given) == big and MARK in given  # the user's, then the sandbox context
        info = client.files.stat(name, "/home/code/.claude/CLAUDE.md")
        assert info is not None and (info.uid, info.mode) == (1000, 0o600)
        # The background launch saved the state coi gave the sandbox.
        (saved,) = (Path(uenv["COI_HOME"]) / "sessions-claude").iterdir()
        settings = client.files.read(name, "/home/code/.claude/settings.json")
        assert (saved / ".claude" / "settings.json").read_bytes() == settings
        assert _own((saved / ".claude" / "CLAUDE.md").read_text()) == big

        # The agent's own settings, a link to a root-only file, a link to a file of its own.
        sh(
            'cd && echo \'{"model": "mine", "permissions": {"allow": ["Bash"]}}\''
            " > .claude/settings.json && echo victim > /tmp/victim"
            " && ln -sf /tmp/victim .claude/CLAUDE.md && ln -sf /root/secret.json .claude.json"
        )
        sh("echo '{\"root\": true}' > /root/secret.json && chmod 600 /root/secret.json", 0)
        sh("tmux kill-server")  # so the next session starts tmux, with the files' command
        (claude_dir / "CLAUDE.md").write_text("small notes\n")
        res = run_coi(*argv, env=uenv, user=USER)
        assert res.returncode == 0, res.stderr
        assert coi_names(client, ws) == [name]  # the same container, reused
        merged = json.loads(sh("cat ~/.claude/settings.json"))
        assert merged["model"] == "mine"
        assert merged["permissions"] == {"allow": ["Bash"], "defaultMode": "bypassPermissions"}
        assert "/home/code/.claude.json cannot be read as code; left as it is" in res.stderr
        assert sh("cat /root/secret.json", 0) == '{"root": true}\n'
        # The link was replaced by the file, not written through.
        assert sh("cat /tmp/victim") == "victim\n"
        out = sh("cd && stat -c '%F %u %a' .claude/CLAUDE.md; cat .claude/CLAUDE.md")
        assert _own(out) == "regular file 1000 600\nsmall notes\n"
        # The contents travelled in the command's environment: tmux did not keep them.
        assert "COI_FILE" not in sh("tmux show-environment -g")

        # tmux runs: the session goes to it, the files written by a command of their own.
        sh('cd && echo \'{"model": "again"}\' > .claude/settings.json')
        res = run_coi(*argv, env=uenv, user=USER)
        assert res.returncode == 0 and "Sent command to existing tmux session" in res.stderr
        merged = json.loads(sh("cat ~/.claude/settings.json"))
        assert merged["model"] == "again" and merged["effortLevel"] == "medium"
    finally:
        remove_containers(client, ws)


def test_a_link_the_agent_left_in_its_saved_state_does_not_take_a_write_out_to_the_host(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """The agent replaces a file coi gives it (the host's CLAUDE.md) with a link to a host
    path; the session's state is saved when it ends, without the link (what comes out is
    data). A background resume then saves the state coi gave its new sandbox over that saved
    tree, and the host file the link named stays as it was."""
    ws = user_dir(base / "ws", user)
    claude_dir = user_dir(Path(uenv["HOME"]) / ".claude", user)
    (claude_dir / "CLAUDE.md").write_text("notes\n")
    victim = base / "victim"
    victim.write_text("precious\n")
    os.chown(victim, user.pw_uid, user.pw_gid)
    argv = coi_argv(
        "shell", "--tool", "claude", "--debug", "--image", "coi-tiny", "-w", str(ws), user=USER
    )  # fmt: skip
    child = pexpect.spawn(argv[0], argv[1:], env=uenv, encoding="utf-8", timeout=60)
    try:
        child.expect("Mode: Interactive")
        time.sleep(1)  # let tmux draw its shell before we type
        child.sendline(f"ln -sf {victim} ~/.claude/CLAUDE.md; exit")
        child.expect("Session data saved successfully")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
    (saved,) = (Path(uenv["COI_HOME"]) / "sessions-claude").iterdir()
    # The agent's link is not saved (what comes out of a sandbox is data).
    assert not (saved / ".claude" / "CLAUDE.md").is_symlink()
    assert not (saved / ".claude" / "CLAUDE.md").exists()
    wait_gone(client, ws)
    try:
        res = run_coi(
            "shell", "--tool", "claude", "--debug", "--background", "--resume", "--image",
            "coi-tiny", "-w", str(ws), env=uenv, user=USER,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "Session data saved successfully" in res.stderr
    finally:
        remove_containers(client, ws)
    assert victim.read_text() == "precious\n"
    kept = saved / ".claude" / "CLAUDE.md"
    assert not kept.is_symlink() and _own(kept.read_text()) == "notes\n"
    assert (kept.stat().st_mode & 0o777) == 0o600
