"""Saved sessions across machines: a conversation saved from a sandbox on the local daemon is
resumed in one on a remote (tests/remotekit.py: a second Incus over HTTPS only), and back.

The stand-in agent (tests/standin) keeps its conversation in ~/.standin; coi saves that
folder to ~/.coi/sessions-standin/ID when a session ends and pushes it into the next
sandbox on `--resume`, whichever daemon that sandbox is on. The agent's script travels in
the workspace (a remote cannot mount /opt/standin): tool.binary names it there."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

import pexpect
from tests import remotekit
from tests.conftest import coi_argv
from tests.integration.conftest import STANDIN, USER, coi_names, converse, leave, wait_gone
from tests.integration.test_remote import remote  # noqa: F401  (the second daemon)
from tests.integration.test_remote_review import _names, uenv  # noqa: F401

from coi.backend import IncusClient


def _shell(env: dict[str, str], ws: Path, *extra: str) -> pexpect.spawn:
    argv = coi_argv("shell", "--tool", "standin", "-w", str(ws), "--network", "open", *extra,
                    user=USER)  # fmt: skip
    return pexpect.spawn(
        argv[0], argv[1:], env=env, encoding="utf-8", timeout=120, dimensions=(40, 120)
    )


def test_a_conversation_saved_locally_resumes_on_a_remote_and_back(
    remote: remotekit.RemoteDaemon,  # noqa: F811
    uenv: dict[str, str],  # noqa: F811
    client: IncusClient,
    test_project: str,
    base: Path,
    user: pwd.struct_passwd,
) -> None:
    ws = base / "ws"
    ws.mkdir()
    agent = ws / ".agent.sh"
    shutil.copy(STANDIN / "agent.sh", agent)
    agent.chmod(0o755)
    for p in (ws, agent):
        os.chown(p, user.pw_uid, user.pw_gid)
    config = base / "coi.toml"
    config.write_text('[tool]\nbinary = "/workspace/.agent.sh"\n')
    env = {
        **uenv,
        "PYTHONPATH": f"{uenv['PYTHONPATH']}:{STANDIN / 'plugin'}",
        "COI_CONFIG": str(config),
    }
    local = ("--remote", "local", "--project", test_project)
    saved = Path(env["COI_HOME"]) / "sessions-standin"

    # 1. On this machine's daemon: the first turn, saved when the session ends.
    child = _shell(env, ws, *local)
    child.expect("standin agent ready")
    converse(child, "turn one, local")
    leave(child)
    (session,) = saved.iterdir()
    log = session / ".standin" / "conversation.log"
    assert log.read_text() == "turn one, local\n"
    wait_gone(client, ws)

    # 2. Resumed on the remote: the conversation is pushed into its sandbox over HTTPS,
    # and the session's new turn saved back into the same session.
    child = _shell(env, ws, "--remote", "r1", "--resume")
    child.expect(f"Auto-detected session: {session.name}")
    child.expect("the workspace is copied into the sandbox")  # on the remote
    child.expect("Restoring session data from")
    child.expect("earlier: turn one, local")
    converse(child, "turn two, remote")
    leave(child)
    assert [p.name for p in saved.iterdir()] == [session.name]
    assert log.read_text() == "turn one, local\nturn two, remote\n"
    assert _names(remote) == []  # removed at the session's end, as locally

    # 3. And back to the local daemon, by id: both turns are there.
    child = _shell(env, ws, *local, f"--resume={session.name}")
    child.expect("earlier: turn one, local")
    child.expect("earlier: turn two, remote")
    converse(child, "turn three, local")
    leave(child)
    assert log.read_text() == "turn one, local\nturn two, remote\nturn three, local\n"
    wait_gone(client, ws)
    assert coi_names(client, ws) == []
