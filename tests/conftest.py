"""Shared fixtures: a real daemon in a throw-away project, and helpers to run the coi CLI."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coi.backend import IncusClient
from coi.errors import CoiError

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under integration/ talks to the real daemon; it runs after the unit tests.
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.incus)
    items.sort(key=lambda item: 1 if item.get_closest_marker("incus") else 0)


def pytest_report_header() -> str:
    """Which daemon this run talks to, at the top of its output."""
    try:
        with IncusClient.connect() as client:
            return f"daemon: {client.server.display_name} at {client.endpoint.describe()}"
    except CoiError as err:
        return f"daemon: none ({err})"


def _daemon_or_skip() -> IncusClient:
    try:
        client = IncusClient.connect()
        client.server  # noqa: B018 - touch the daemon now
    except CoiError as err:
        if IN_CI:
            pytest.fail(f"CI=true and the daemon does not answer: {err}", pytrace=False)
        pytest.skip(f"no Incus/LXD daemon: {err}")
    return client


@pytest.fixture(scope="session")
def tiny_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coi.images.tiny import build_tarball

    return build_tarball(tmp_path_factory.mktemp("img") / "tiny.tar")


def _owner_pid(client: IncusClient, project: str) -> int | None:
    """The pid of the pytest process that made this test project (from its description)."""
    desc = str(client.get(f"/1.0/projects/{project}").get("description") or "")
    pid = desc.rsplit("pid ", 1)[-1]
    return int(pid) if pid.isdigit() else None


def _owner_alive(client: IncusClient, project: str, pid: int | None = None) -> bool:
    """Is the pytest process that made this test project still running?"""
    pid = _owner_pid(client, project) if pid is None else pid
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def test_project(tiny_tarball: Path) -> Iterator[str]:
    """A project of our own, purged before and after the run, holding the tiny image."""
    root = _daemon_or_skip()
    name = f"coi-test-{secrets.token_hex(3)}"
    # Leftovers of earlier, killed runs go first; a run still going keeps its project.
    for old in root.projects.names():
        if old.startswith("coi-test-") and not _owner_alive(root, old):
            root.projects.purge(old)
    root.projects.create(
        name,
        config={"features.images": "true", "features.profiles": "true"},
        description=f"coi test run, pid {os.getpid()}",
    )
    try:
        with root.with_project(name) as client:
            client.images.import_tarball(
                tiny_tarball, aliases=("coi-tiny",), properties={"description": "coi tiny image"}
            )
        yield name
    finally:
        root.projects.purge(name)
        remove_unused_coi_networks(root)
        root.close()
        # The daemon keeps a log folder per deleted instance; drop the ones this run made.
        for log_root in (Path("/var/log/lxd"), Path("/var/log/incus")):
            for d in log_root.glob(f"{name}_*"):
                shutil.rmtree(d, ignore_errors=True)


def _other_run_alive(client: IncusClient) -> bool:
    """Is another test run (another live pytest with its own project) going on?"""
    for name in client.projects.names():
        if not name.startswith("coi-test-"):
            continue
        pid = _owner_pid(client, name)
        if pid != os.getpid() and _owner_alive(client, name, pid):
            return True
    return False


def remove_unused_coi_networks(client: IncusClient) -> None:
    """Policy bridges and ACLs live in the default project; sessions of the run made some.

    Left alone while another test run goes on: a bridge that run has just made is unused
    until its sandbox exists, and deleting it then left the bridge's dnsmasq running with
    no network (seen with two runs at once: every later restricted session failed).
    """
    from coi.network import resources

    if _other_run_alive(client):
        return

    for n in resources.unused_networks(client):
        client.networks.delete(n.name)
    for a in resources.coi_acls(client):
        if not a.used_by:
            client.networks.delete_acl(a.name)


@pytest.fixture
def client(test_project: str) -> Iterator[IncusClient]:
    with IncusClient.connect(project=test_project) as c:
        yield c


@pytest.fixture
def pool() -> str:
    return os.environ.get("COI_POOL", "coi")


@pytest.fixture
def bridge() -> str:
    return os.environ.get("COI_NETWORK", "coibr0")


@pytest.fixture
def unique() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture
def coi_env(test_project: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running the coi CLI against the test project with its own state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
    env.update(
        COI_PROJECT=test_project,
        COI_HOME=str(tmp_path / "coi-home"),
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
    )
    return env


def coi_argv(*args: str, user: str | None = None) -> list[str]:
    """The command line that runs the real `coi` CLI, optionally as another host user."""
    cmd = [sys.executable, "-m", "coi", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *cmd]
    return cmd


def run_coi(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
    timeout: float = 120,
    user: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `coi` CLI in a subprocess (optionally as another host user)."""
    return subprocess.run(
        coi_argv(*args, user=user),
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
