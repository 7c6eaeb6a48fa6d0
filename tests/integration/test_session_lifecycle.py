"""Sessions through their life: list, tmux, attach, persist, freeze/resume, kill, clean.

Run as the unprivileged test user, with real PTYs where a person would type.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import (
    USER,
    coi_names,
    converse,
    keepers,
    remove_containers,
    spawn_shell,
    user_dir,
    wait_for,
    wait_gone,
)

from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.network.resources import managed_config


def _coi(uenv: dict[str, str], *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    r = run_coi(*args, env=uenv, user=USER, input=stdin)
    return r.returncode, r.stdout, r.stderr


def _detach(child: pexpect.spawn) -> None:
    """Ctrl-b d: leave tmux, the session stays. Sent again if a key got lost in a redraw."""
    for _ in range(3):
        child.sendcontrol("b")
        time.sleep(0.3)
        child.send("d")
        if child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=5) == 0:
            child.close()
            return
    pytest.fail("tmux did not detach")


@pytest.fixture
def background(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> Iterator[tuple[Path, str]]:
    """A `coi shell --background --debug` session: (workspace, container name)."""
    ws = user_dir(base / "ws", user)
    code, _, err = _coi(
        uenv, "shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(ws)
    )
    assert code == 0, err
    assert "Created background tmux session: coi-" in err
    (name,) = coi_names(client, ws)
    try:
        yield ws, name
    finally:
        remove_containers(client, ws)


def test_list_tmux_as_the_agent_persist_freeze_resume_kill(
    client: IncusClient, uenv: dict[str, str], background: tuple[Path, str], user: pwd.struct_passwd
) -> None:
    ws, name = background
    code, out, _ = _coi(uenv, "list", "--format", "json")
    (entry,) = json.loads(out)["active_containers"]
    assert entry["name"] == name and entry["status"] == "Running"
    assert entry["workspace"] == str(ws) and entry["persistent"] is False
    assert entry["kind"] == "shell" and entry["ipv4"]
    # Read from the NIC's reservation, not the daemon's runtime state: the same address.
    assert entry["ipv4"] == client.instances.state(name).ipv4()
    code, out, _ = _coi(uenv, "list")
    assert f"  {name} (ephemeral)" in out and f"Workspace: {ws}" in out
    code, _, err = _coi(uenv, "list", "--format", "yaml")
    assert code == 2 and "invalid format 'yaml': must be 'text' or 'json'" in err

    # The session coi saved when `coi shell --background` returned.
    code, out, _ = _coi(uenv, "list", "--all", "--format", "json")
    (saved,) = json.loads(out)["saved_sessions"]
    assert saved["container"] == name and saved["workspace"] == str(ws)
    code, out, _ = _coi(uenv, "info")
    assert code == 0 and f"Session ID:     {saved['id']}" in out
    assert "Session Data:   ✓ Present (.claude directory)" in out
    assert f"Resume:         coi shell --resume={saved['id']}" in out
    code, _, err = _coi(uenv, "info", "no-such-session")
    assert code == 1 and "session not found: no-such-session" in err

    # tmux talks to the agent's own tmux server (upstream's ran as root and saw nothing).
    code, out, _ = _coi(uenv, "tmux", "list")
    assert code == 0 and f"  - {name} (tmux session: coi-{name})" in out
    code, out, _ = _coi(uenv, "tmux", "send", name, "id -u > /workspace/who")
    assert code == 0 and f"Sent command to session coi-{name}" in out
    wait_for(lambda: (ws / "who").exists() and (ws / "who").read_text() == "1000\n", "tmux send")
    assert (ws / "who").stat().st_uid == user.pw_uid
    code, out, _ = _coi(uenv, "tmux", "capture", name)
    assert code == 0 and "id -u > /workspace/who" in out
    code, _, err = _coi(uenv, "tmux", "send", "coi-00000000-1", "x")
    assert code == 1 and "container coi-00000000-1 is not running" in err

    code, out, _ = _coi(uenv, "persist", name)
    assert code == 0 and f"  ✓ Persisted {name}" in out and "Persisted 1 container(s)" in out
    code, out, _ = _coi(uenv, "list", "--format", "json")
    assert json.loads(out)["active_containers"][0]["persistent"] is True
    sessions = list((Path(uenv["COI_HOME"]) / "sessions-claude").iterdir())
    assert json.loads((sessions[0] / "metadata.json").read_text())["persistent"] is True

    # What the monitor does on a HIGH alert, then `coi resume` after review.
    client.instances.freeze(name)
    code, _, err = _coi(uenv, "resume", name)
    assert code == 0 and f"Resumed container: {name}" in err
    assert client.instances.get(name).status == "Running"
    code, _, err = _coi(uenv, "resume", name)
    assert code == 2 and f"container {name} is not frozen (status: RUNNING)" in err
    code, _, err = _coi(uenv, "resume")
    assert code == 0 and "No frozen COI containers found" in err

    code, out, err = _coi(uenv, "kill", name, "no-such-box", "--force")
    assert code == 0, err
    assert f"  ✓ Killed {name}" in out and "Warning: Container no-such-box does not exist" in err
    wait_gone(client, ws)
    code, out, _ = _coi(uenv, "kill", "--all")
    assert code == 0 and "No containers to kill" in out
    code, _, err = _coi(uenv, "kill")
    assert code == 2 and "no container names provided" in err
    code, _, err = _coi(uenv, "kill", "coi-00000000-1")
    assert code == 1 and "failed to kill specified containers" in err
    code, _, err = _coi(uenv, "persist", "coi-00000000-1")
    assert code == 1 and "Warning: Container coi-00000000-1 does not exist" in err


def test_attach_by_name_default_and_slot_through_a_pty(
    uenv: dict[str, str], background: tuple[Path, str]
) -> None:
    ws, name = background
    for args, banner in (
        ([name], None),
        ([], f"Attaching to {name}..."),
        (["--slot", "1", "-w", str(ws)], f"Attaching to {name} (slot 1)..."),
    ):
        argv = coi_argv("attach", *args, user=USER)
        child = pexpect.spawn(argv[0], argv[1:], env=uenv, encoding="utf-8", timeout=30)
        if banner:
            child.expect_exact(banner)
        time.sleep(0.5)  # let tmux draw before typing
        child.sendline("echo attached-$((20+22))")
        child.expect("attached-42")
        _detach(child)
        assert child.exitstatus == 0
    code, _, err = _coi(uenv, "attach", "--slot", "7", "-w", str(ws))
    assert code == 1 and "not found or not running" in err


def test_shutdown_and_clean_leave_nothing_coi_made(
    client: IncusClient, uenv: dict[str, str], background: tuple[Path, str], unique: str
) -> None:
    ws, name = background
    # What the network issue's policies create: a coi-marked ACL and bridge nothing uses.
    acl = f"coi-{unique}"
    client.networks.create_acl(acl, config=managed_config())
    bridge_cfg = {"ipv4.address": "none", "ipv6.address": "none", **managed_config()}
    client.networks.create(f"coi-{unique[:6]}", config=bridge_cfg)
    foreign = f"x{unique}"
    client.networks.create_acl(foreign)  # not coi's: must survive
    try:
        code, out, _ = _coi(uenv, "shutdown", name, "--timeout", "1")
        assert code == 0 and f"  ✓ Shutdown {name}" in out
        wait_gone(client, ws)

        code, out, _ = _coi(uenv, "clean", "--dry-run")
        assert code == 0 and "[Dry run] No changes made." in out
        assert f"network ACL {acl}" in out and f"network coi-{unique[:6]}" in out
        assert client.networks.acl(acl) is not None
        code, out, _ = _coi(uenv, "clean", stdin="n\n")
        assert "Cancelled." in out and client.networks.acl(acl) is not None
        code, out, _ = _coi(uenv, "clean", "--force")
        assert code == 0 and "✓ Cleaned" in out
        assert client.networks.acl(acl) is None
        assert client.networks.get(f"coi-{unique[:6]}") is None
        assert client.networks.acl(foreign) is not None
        code, out, _ = _coi(uenv, "list", "--format", "json")
        assert json.loads(out) == {"active_containers": [], "pending_reviews": []}
        code, out, _ = _coi(uenv, "clean", "--force")
        assert "Nothing to clean." in out
    finally:
        for name_ in (acl, foreign):
            if client.networks.acl(name_):
                client.networks.delete_acl(name_)
        if client.networks.get(f"coi-{unique[:6]}"):
            client.networks.delete(f"coi-{unique[:6]}")


def test_kill_9_mid_run_leaves_the_workspace_and_clean_removes_the_rest(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    (ws / "precious.txt").write_text("keep me\n")
    proc = subprocess.Popen(
        coi_argv(
            "run", "--image", "coi-tiny", "-w", str(ws), "--",
            "sh", "-c", "echo written > /workspace/during; sleep 60",
            user=USER,
        ),
        env=uenv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: (ws / "during").exists(), "the command to start")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (ws / "precious.txt").read_text() == "keep me\n"
    assert (ws / "during").read_text() == "written\n"
    (name,) = coi_names(client, ws)  # nobody removed it: coi died
    code, out, _ = _coi(uenv, "clean", "--dry-run")
    assert "abandoned sandbox" in out and name in out and coi_names(client, ws) == [name]
    code, out, _ = _coi(uenv, "clean", "--force")
    assert code == 0 and f"Deleting container {name}..." in out
    wait_gone(client, ws)
    # The keeper coi left notes the owner's death in the audit log under `base`: it ends
    # before the fixture removes that folder, or it writes the folder back afterwards.
    wait_for(lambda: not keepers(ws), "the keeper to end", 60)
    assert (ws / "precious.txt").read_text() == "keep me\n"


def test_session_saved_when_the_agent_powers_off_or_coi_gets_sighup(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    sessions = Path(uenv["COI_HOME"]) / "sessions-standin"

    child = spawn_shell(uenv, ws)
    converse(child, "said before poweroff")
    (name,) = coi_names(client, ws)
    # The agent (root inside via sudo in the real image) powers the container off.
    client.exec.quiet(name, ExecRequest(["poweroff"]))
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    (saved,) = sessions.iterdir()
    assert (saved / ".standin" / "conversation.log").read_text() == "said before poweroff\n"
    wait_gone(client, ws)

    child = spawn_shell(uenv, ws, "--resume")
    child.expect("earlier: said before poweroff")
    converse(child, "said before hangup")
    os.kill(child.pid, signal.SIGHUP)
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    log = saved / ".standin" / "conversation.log"
    assert log.read_text() == "said before poweroff\nsaid before hangup\n"
    # The agent still runs in its tmux session: the container stays for `coi attach`.
    (name,) = coi_names(client, ws)
    assert client.instances.get(name).running
    client.instances.delete(name, force=True)


def test_completion_scripts_load_and_complete_a_running_container(
    client: IncusClient, coi_env: dict[str, str], unique: str
) -> None:
    name = f"coi-{unique[1:]}-1"
    res = run_coi("container", "launch", "coi-tiny", name, env=coi_env)
    assert res.returncode == 0, res.stderr
    venv_bin = str(Path(sys.executable).parent)
    env = {**coi_env, "PATH": f"{venv_bin}:{coi_env['PATH']}"}
    try:
        bash = subprocess.run(
            ["bash", "-c", "source <(coi completion bash); COMP_WORDS=(coi attach coi-"
             f"{unique[1:5]}); COMP_CWORD=2; _coi_completion coi; "
             'echo "${COMPREPLY[@]}"'],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert bash.stdout.split() == [name]
        fish = subprocess.run(
            ["fish", "-c",
             f"coi completion fish | source; complete -C 'coi kill coi-{unique[1:5]}'"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert fish.stdout.split() == [name]
        zsh = subprocess.run(
            ["zsh", "-c", "autoload -U compinit; compinit -u; source <(coi completion zsh); "
             "print -r -- $_comps[coi]"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert zsh.stdout.strip() == "_coi_completion"
        # What the zsh function asks coi for when the user presses Tab.
        zsh_reply = subprocess.run(
            ["coi"],
            env={**env, "COMP_WORDS": f"coi attach coi-{unique[1:5]}", "COMP_CWORD": "2",
                 "_COI_COMPLETE": "zsh_complete"},
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert zsh_reply.stdout.split("\n")[:2] == ["plain", name]
        # PowerShell (as upstream ships it): its completer asks coi the same way.
        pwsh_reply = subprocess.run(
            ["coi"],
            env={**env, "COMP_WORDS": f"coi attach coi-{unique[1:5]}",
                 "COMP_CWORD": f"coi-{unique[1:5]}", "_COI_COMPLETE": "powershell_complete"},
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert pwsh_reply.stdout.split() == [name]
        res = run_coi("completion", "tcsh", env=coi_env)
        assert res.returncode == 2 and "tcsh" in res.stderr
    finally:
        client.instances.delete(name, force=True)


def test_list_shows_the_address_dhcp_gave_containers_coi_reserved_none_for(
    client: IncusClient, coi_env: dict[str, str], unique: str
) -> None:
    """`coi list` reads a sandbox's address from its NIC's reservation (no runtime state);
    coi-named containers made without one (`coi container launch`) get the address their
    own DHCP client obtained: asked of the daemon for that container alone when one lacks
    it, with one listing of every state when several do."""

    def listed() -> dict[str, str]:
        out = json.loads(run_coi("list", "--format", "json", env=coi_env).stdout)
        return {c["name"]: c["ipv4"] for c in out["active_containers"]}

    names = [f"coi-{unique}-a", f"coi-{unique}-b"]
    try:
        for name in names:
            res = run_coi("container", "launch", "coi-tiny", name, env=coi_env)
            assert res.returncode == 0, res.stderr
            assert "ipv4.address" not in client.instances.get(name).expanded_devices["eth0"]
            wait_for(lambda n=name: client.instances.state(n).ipv4(), "a DHCP lease", 30)
            if name == names[0]:
                assert listed()[name] == client.instances.state(name).ipv4()
        got = listed()
        assert [got[n] for n in names] == [client.instances.state(n).ipv4() for n in names]
    finally:
        for name in names:
            client.instances.delete(name, force=True)
