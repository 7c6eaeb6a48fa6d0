"""Sessions on the real daemon, run as an unprivileged host user whose uid is not 1000."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pexpect
import pytest
from tests.conftest import ROOT, coi_argv, run_coi

from coi.backend import IncusClient
from coi.sessions.naming import workspace_hash

USER = os.environ.get("COI_TEST_USER", "coitest")
STANDIN = ROOT / "tests" / "standin"


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"test user {USER} missing: scripts/test.sh creates it", pytrace=False)


@pytest.fixture
def base(user: pwd.struct_passwd) -> Iterator[Path]:
    """A world-traversable scratch dir owned by the test user (pytest's tmp is root-only)."""
    d = Path(f"/tmp/coi-it-{secrets.token_hex(4)}")
    d.mkdir(mode=0o755)
    os.chown(d, user.pw_uid, user.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _mkdir(path: Path, user: pwd.struct_passwd) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


@pytest.fixture
def uenv(test_project: str, base: Path, user: pwd.struct_passwd) -> dict[str, str]:
    home = _mkdir(base / "home", user)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "COI_HOME": str(home / ".coi"),
        "COI_PROJECT": test_project,
        "PYTHONPATH": f"{ROOT / 'src'}:{STANDIN / 'plugin'}",
        "TERM": "xterm",
        "SECRET_TOKEN": "s3cr3t-on-the-host",
    }


def _coi_names(client: IncusClient, ws: Path) -> list[str]:
    h = workspace_hash(str(ws))
    return [n for n in client.instances.names() if h in n]


def test_run_as_user_ownership_exit_code_and_no_leftover(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = _mkdir(base / "ws", user)
    res = run_coi(
        "run",
        "--image",
        "coi-tiny",
        "--workspace",
        str(ws),
        "-e",
        "FOO=bar",
        "--",
        "sh",
        "-c",
        'id -u; echo "FOO=$FOO SECRET=$SECRET_TOKEN"; touch /workspace/x; exit 7',
        env=uenv,
        user=USER,
    )
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines() == ["1000", "FOO=bar SECRET="]
    assert (ws / "x").stat().st_uid == user.pw_uid
    assert (ws / "x").stat().st_gid == user.pw_gid
    assert _coi_names(client, ws) == []


def test_run_capture_json_keeps_exit_code(
    base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = _mkdir(base / "ws", user)
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
    ws = _mkdir(base / "ws", user)

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
    assert _coi_names(client, ws) == []


def test_sigterm_mid_run_removes_container(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = _mkdir(base / "ws", user)
    proc = subprocess.Popen(
        coi_argv("run", "--image", "coi-tiny", "-w", str(ws), "--", "sleep", "60", user=USER),
        env=uenv,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not _coi_names(client, ws) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert _coi_names(client, ws) == []


def _spawn_shell(uenv: dict[str, str], ws: Path, *extra: str) -> pexpect.spawn:
    argv = coi_argv(
        "shell",
        "--tool",
        "standin",
        "--image",
        "coi-tiny",
        "-w",
        str(ws),
        "--mount",
        f"{STANDIN}:/opt/standin",
        *extra,
        user=USER,
    )
    return pexpect.spawn(
        argv[0], argv[1:], env=uenv, encoding="utf-8", timeout=60, dimensions=(40, 120)
    )


def _converse(child: pexpect.spawn, line: str) -> None:
    child.expect("standin> ")
    child.sendline(line)
    child.expect(f"echo: {line}")


def _leave(child: pexpect.spawn) -> None:
    child.expect("standin> ")
    child.sendline("/exit")
    child.expect("bye")
    child.sendline("exit")  # the pane's fallback shell; tmux ends with it
    child.expect(pexpect.EOF, timeout=60)
    child.close()


def test_shell_saves_conversation_and_resumes_only_in_its_workspace(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = _mkdir(base / "ws", user)
    other = _mkdir(base / "other", user)
    child = _spawn_shell(uenv, ws)
    _converse(child, "hello from turn one")
    _leave(child)
    sessions = list((Path(uenv["COI_HOME"]) / "sessions-standin").iterdir())
    assert len(sessions) == 1
    log = sessions[0] / ".standin" / "conversation.log"
    assert log.read_text() == "hello from turn one\n"
    assert json.loads((sessions[0] / "metadata.json").read_text())["workspace"] == str(ws)
    assert _coi_names(client, ws) == []

    child = _spawn_shell(uenv, ws, "--resume")
    child.expect("earlier: hello from turn one")
    _converse(child, "turn two")
    _leave(child)
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
    assert _coi_names(client, other) == []


def test_persistent_container_keeps_installed_files(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = _mkdir(base / "ws", user)
    child = _spawn_shell(uenv, ws, "--persistent", "--debug")
    child.expect("Mode: Interactive")
    time.sleep(1)  # let tmux draw its shell before we type
    child.sendline("echo installed > /home/code/tool.txt; exit")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    names = _coi_names(client, ws)
    assert len(names) == 1
    try:
        child = _spawn_shell(uenv, ws, "--persistent", "--debug", "--slot", "1")
        child.expect("Mode: Interactive")
        time.sleep(1)
        child.sendline("cat /home/code/tool.txt; exit")
        child.expect("installed")
        child.expect(pexpect.EOF, timeout=60)
        child.close()
    finally:
        for n in _coi_names(client, ws):
            client.instances.delete(n, force=True)
