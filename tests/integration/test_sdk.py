"""The Python SDK against the daemon: the examples of docs/sdk.md run as they are written, and
what a program using it leaves behind when it ends badly."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.integration.conftest import USER, coi_names, user_dir, wait_for
from tests.sdkdocs import examples

from coi.backend import IncusClient

pytestmark = pytest.mark.incus


def _python(code: str, *, user: str = USER) -> list[str]:
    return [
        "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
        sys.executable, "-c", code,
    ]  # fmt: skip


def _env(uenv: dict[str, str]) -> dict[str, str]:
    # The examples use the user's default image; the test daemon has the tiny one.
    return {**uenv, "COI_IMAGE": "coi-tiny"}


@pytest.mark.parametrize("index", range(len(examples())), ids=lambda i: f"example-{i + 1}")
def test_the_docs_examples_run_as_written(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd, index: int
) -> None:
    ws = user_dir(base / "ws", user)
    res = subprocess.run(
        _python(examples()[index]),
        env=_env(uenv),
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # Every example closes what it made (the persistent one removes it itself).
    wait_for(lambda: not coi_names(client, ws), "the example's sandboxes to go", 30)


def test_bad_arguments_fail_before_anything_is_made(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    code = textwrap.dedent(
        """
        import coi
        with coi.connect() as client:
            for kwargs in ({"limits": {"cpus": "2"}}, {"network": "wide"}, {"env": {"1X": "y"}}):
                try:
                    client.sandbox(".", **kwargs)
                except coi.CoiError as err:
                    print(type(err).__name__, err.message, "|", err.resolution)
                else:
                    raise SystemExit(f"accepted {kwargs}")
            try:
                client.sandbox("/no/such/folder")
            except coi.UsageError as err:
                print("UsageError", err.message)
        """
    )
    res = subprocess.run(
        _python(code), env=_env(uenv), cwd=ws, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("UsageError unknown limit 'cpus'") and "memory" in lines[0]
    assert "network.mode" in lines[1] or "wide" in lines[1]
    assert "invalid environment variable" in lines[2]
    assert "is not a directory" in lines[3]
    assert coi_names(client, ws) == []


def test_a_program_killed_with_its_sandbox_open_leaves_nothing_running(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """SIGKILL of the program (no `finally` runs): coi's keeper removes the sandbox."""
    ws = user_dir(base / "ws", user)
    code = textwrap.dedent(
        """
        import sys, time, coi
        client = coi.connect()
        sb = client.sandbox(".")
        print(sb.name, flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        _python(code), env=_env(uenv), cwd=ws, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name and client.instances.get(name).running
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    wait_for(lambda: not coi_names(client, ws), "the killed program's sandbox to go", 30)


def test_closing_the_client_closes_its_sandboxes_and_a_closed_one_refuses_work(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    code = textwrap.dedent(
        """
        import coi
        client = coi.connect()
        a, b = client.sandbox("."), client.sandbox(".")
        assert a.name != b.name  # two slots of one workspace
        client.close()
        try:
            a.run(["true"])
        except coi.UsageError as err:
            print(err.message)
        a.close()  # twice is fine
        """
    )
    res = subprocess.run(
        _python(code), env=_env(uenv), cwd=ws, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "is closed" in res.stdout
    wait_for(lambda: not coi_names(client, ws), "both sandboxes to go", 30)


def test_a_sandbox_publishes_ports_and_takes_a_name(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """`client.sandbox(ports=..., name=...)` as `coi run --port --name`: the agent's server
    answers on the host's loopback at the published port, and the alias is on the container."""
    import socket

    ws = user_dir(base / "ws", user)
    with socket.socket() as s:  # a free port on the host's loopback (the test's own)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = textwrap.dedent(
        f"""
        import socket, time, coi
        client = coi.connect()
        with client, client.sandbox(".", ports=["{port}:8000"], name="sdk-web") as sb:
            print(sb.ports)
            sb.run(["sh", "-c", "mkdir -p /tmp/w && echo hello > /tmp/w/index.html && "
                    "busybox httpd -p 127.0.0.1:8000 -h /tmp/w"])
            for _ in range(50):
                try:
                    with socket.create_connection(("127.0.0.1", {port}), timeout=2) as c:
                        c.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                        # The whole answer (headers and body may come in two reads).
                        data = b""
                        while chunk := c.recv(4096):
                            data += chunk
                        print(data.decode().splitlines()[-1])
                        break
                except OSError:
                    time.sleep(0.1)
            print([c.alias for c in client.list() if c.name == sb.name])
        """
    )
    res = subprocess.run(
        _python(code), env=_env(uenv), cwd=ws, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"[('127.0.0.1', {port}, 8000)]"
    assert lines[1] == "hello"
    assert lines[2] == "['sdk-web']"
    wait_for(lambda: not coi_names(client, ws), "the sandbox to go", 30)
