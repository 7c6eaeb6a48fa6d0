"""Fixtures for tests that run coi as an unprivileged host user whose uid is not 1000."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from tests import clusterkit, netkit
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


def keepers(ws: Path) -> list[str]:
    """The keepers of this workspace's sandboxes (other tests may run at the same time)."""
    out = subprocess.run(["pgrep", "-af", "coi.sessions.keeper"], capture_output=True, text=True)
    mine = f" coi-{workspace_hash(str(ws))}-"
    return [line for line in out.stdout.splitlines() if mine in line]


def user_dir(path: Path, user: pwd.struct_passwd) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


@pytest.fixture
def uenv(test_project: str, base: Path, user: pwd.struct_passwd) -> dict[str, str]:
    home = user_dir(base / "home", user)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "COI_HOME": str(home / ".coi"),
        "COI_PROJECT": test_project,
        "PYTHONPATH": f"{ROOT / 'src'}:{STANDIN / 'plugin'}",
        "TERM": "xterm",
        "SECRET_TOKEN": "s3cr3t-on-the-host",
        # Which daemon the run talks to (scripts/test.sh names it for each part).
        **{k: os.environ[k] for k in ("INCUS_SOCKET", "LXD_SOCKET") if os.environ.get(k)},
    }


def coi_names(client: IncusClient, ws: Path) -> list[str]:
    h = workspace_hash(str(ws))
    return [n for n in client.instances.names() if h in n]


def remove_containers(client: IncusClient, ws: Path) -> None:
    """Force-delete every container of the workspace (a test's cleanup)."""
    for n in coi_names(client, ws):
        client.instances.delete(n, force=True)


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll `cond` (bounded) until it is true; fail the test naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[netkit.Topology]:
    """The test's own network namespace of hosts (tests/netkit.py), for one module."""
    top = netkit.create(tmp_path_factory.mktemp("net"))
    try:
        yield top
    finally:
        netkit.destroy(top)


def proc_state(pid: int) -> str:
    """A process's state letter from /proc (R, S, T stopped, Z zombie...); "" when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def wait_gone(client: IncusClient, ws: Path, timeout: float = 15) -> None:
    """No container of the workspace is left (`coi run` lets the daemon finish removing)."""
    wait_for(lambda: not coi_names(client, ws), f"the containers of {ws} to go", timeout)


def spawn_shell(uenv: dict[str, str], ws: Path, *extra: str) -> pexpect.spawn:
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


def converse(child: pexpect.spawn, line: str) -> None:
    child.expect("standin> ")
    child.sendline(line)
    child.expect(f"echo: {line}")


def leave(child: pexpect.spawn) -> None:
    child.expect("standin> ")
    child.sendline("/exit")
    child.expect("bye")
    child.sendline("exit")  # the pane's fallback shell; tmux ends with it
    child.expect(pexpect.EOF, timeout=60)
    child.close()


@pytest.fixture(scope="session")
def build_env(test_project: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """coi as root against the test project, with a state dir of its own."""
    home = tmp_path_factory.mktemp("build-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
    env.update(COI_PROJECT=test_project, COI_HOME=str(home / ".coi"))
    env["XDG_CONFIG_HOME"] = str(home / "xdg")
    return env


@pytest.fixture(scope="session")
def coi_image(build_env: dict[str, str]) -> Iterator[str]:
    """The full `coi` image, built once per run into the test project; yields build output."""
    res = run_coi("build", env=build_env, timeout=2000)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Image 'coi' built successfully!" in res.stdout, res.stdout
    assert "Base: debootstrap" in res.stderr
    yield res.stdout


@pytest.fixture(scope="module")
def cluster(tiny_tarball: Path, test_project: str) -> Iterator[clusterkit.Cluster]:
    """A three-member cluster for the module's tests (tests/clusterkit.py), with the tiny
    image in its default project (the user's project shares it). `test_project`: the main
    daemon answers (the --target check on it needs that)."""
    try:
        cl = clusterkit.start()
    except RuntimeError as err:
        pytest.fail(f"the cluster did not start: {err}", pytrace=False)
    try:
        with cl.members[0].admin() as c:
            c.images.import_tarball(tiny_tarball, aliases=("coi-tiny",))
        yield cl
    finally:
        clusterkit.stop(cl)
    assert clusterkit.leftovers(cl) == []
