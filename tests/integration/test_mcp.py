"""`coi mcp` driven by the MCP SDK's own client over stdio, against the real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult
from tests.integration.conftest import coi_names, remove_containers, wait_for

from coi.backend import IncusClient

pytestmark = pytest.mark.incus

COI = Path(sys.executable).parent / "coi"  # the venv's `coi`
TOOLS = {
    "sandbox_create",
    "sandbox_exec",
    "file_read",
    "file_write",
    "file_list",
    "sandbox_diff",
    "sandbox_snapshot",
    "sandbox_destroy",
    "sandbox_list",
}
GONE_WITHIN = 20  # seconds: the daemon removes an ephemeral container as it stops


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The server's root, with a workspace `ws` in it."""
    r = tmp_path / "root"
    (r / "ws").mkdir(parents=True)
    return r


@pytest.fixture
def ws(root: Path, client: IncusClient) -> Iterator[Path]:
    """The workspace; whatever container it has is removed after the test."""
    path = (root / "ws").resolve()
    yield path
    remove_containers(client, path)


def _params(root: Path, env: dict[str, str]) -> StdioServerParameters:
    return StdioServerParameters(
        command=str(COI), args=["mcp", "--root", str(root)], env=env, cwd=str(root)
    )


@asynccontextmanager
async def _session(root: Path, env: dict[str, str], log: Path) -> AsyncIterator[ClientSession]:
    """`coi mcp --root ROOT` spawned by the SDK's stdio client, initialized; its stderr in
    `log`. Leaving closes its stdin (and the SDK stops it if it lingers)."""
    with log.open("a") as errlog:
        async with (
            stdio_client(_params(root, env), errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


def _drive(
    root: Path, env: dict[str, str], log: Path, body: Callable[[ClientSession], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with _session(root, env, log) as session:
            await body(session)

    try:
        anyio.run(main)
    except BaseException:
        sys.stderr.write(f"--- coi mcp's stderr:\n{log.read_text() if log.exists() else ''}")
        raise


def _ok(res: CallToolResult) -> dict[str, Any]:
    assert not res.is_error, res.content
    assert res.structured_content is not None
    return res.structured_content


def _err(res: CallToolResult) -> str:
    assert res.is_error, res.structured_content
    text = res.content[0].text if res.content and res.content[0].type == "text" else ""
    return text


async def _create(session: ClientSession, **args: Any) -> str:
    got = _ok(await session.call_tool("sandbox_create", {"image": "coi-tiny", **args}))
    assert got["network"] == "restricted" and got["workspace_path"] == "/workspace"
    name = got["sandbox"]
    assert isinstance(name, str)
    return name


def _running(client: IncusClient, ws: Path) -> list[str]:
    return [n for n in coi_names(client, ws) if client.instances.get(n).running]


# -- tools and a sandbox's life -------------------------------------------------------------


def test_the_tools_are_listed_with_their_schemas(
    root: Path, coi_env: dict[str, str], tmp_path: Path
) -> None:
    async def body(session: ClientSession) -> None:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.input_schema["type"] == "object", tool.name
            assert tool.output_schema is not None, tool.name
            assert tool.description, tool.name
        exec_props = tools["sandbox_exec"].input_schema["properties"]
        assert {"sandbox", "command", "cwd", "env", "timeout", "stdin"} <= set(exec_props)
        assert set(tools["sandbox_exec"].input_schema["required"]) == {"sandbox", "command"}
        create_props = tools["sandbox_create"].input_schema["properties"]
        assert {"workspace", "image", "network", "persistent", "limits"} <= set(create_props)

    _drive(root, coi_env, tmp_path / "server.log", body)


def test_a_sandbox_from_create_to_destroy(
    root: Path, ws: Path, client: IncusClient, coi_env: dict[str, str], tmp_path: Path
) -> None:
    (ws / ".git" / "hooks").mkdir(parents=True)  # a protected path

    async def body(session: ClientSession) -> None:
        name = await _create(session, workspace="ws")
        assert _running(client, ws) == [name]

        res = _ok(await session.call_tool("sandbox_exec", {"sandbox": name, "command": "pwd"}))
        assert res["exit_code"] == 0 and res["stdout"] == "/workspace\n", res
        res = _ok(
            await session.call_tool(
                "sandbox_exec",
                {"sandbox": name, "command": "echo out; echo err >&2; exit 3"},
            )
        )
        assert (res["exit_code"], res["stdout"], res["stderr"]) == (3, "out\n", "err\n")
        assert res["timed_out"] is False and res["duration"] > 0
        res = _ok(
            await session.call_tool(
                "sandbox_exec",
                {
                    "sandbox": name,
                    "command": ["sh", "-c", 'cat; echo "$X"'],
                    "stdin": "in\n",
                    "env": {"X": "ex"},
                    "cwd": "/tmp",
                },
            )
        )
        assert (res["exit_code"], res["stdout"]) == (0, "in\nex\n")
        res = _ok(
            await session.call_tool(
                "sandbox_exec", {"sandbox": name, "command": "sleep 30", "timeout": 1}
            )
        )
        assert res["exit_code"] == 124 and res["timed_out"] is True

        wrote = _ok(
            await session.call_tool(
                "file_write", {"sandbox": name, "path": "sub/note.txt", "content": "héllo\n"}
            )
        )
        assert wrote["size"] == len("héllo\n".encode())
        got = _ok(await session.call_tool("file_read", {"sandbox": name, "path": "sub/note.txt"}))
        assert (got["content"], got["encoding"]) == ("héllo\n", "utf-8")
        assert (ws / "sub" / "note.txt").read_text() == "héllo\n"  # the workspace is the host's
        listing = _ok(await session.call_tool("file_list", {"sandbox": name, "path": "sub"}))
        assert [(e["name"], e["type"]) for e in listing["entries"]] == [("note.txt", "file")]
        # Protected paths hold for the file tools too (they go through the daemon, inside).
        res = await session.call_tool(
            "file_write", {"sandbox": name, "path": ".git/hooks/pre-commit", "content": "x"}
        )
        assert "read-only file system" in _err(res).lower()
        assert not (ws / ".git" / "hooks" / "pre-commit").exists()
        binary = _ok(
            await session.call_tool(
                "file_write",
                {"sandbox": name, "path": "/tmp/b", "content": "AP8=", "encoding": "base64"},
            )
        )
        assert binary["size"] == 2
        got = _ok(await session.call_tool("file_read", {"sandbox": name, "path": "/tmp/b"}))
        assert (got["content"], got["encoding"]) == ("AP8=", "base64")

        snap = _ok(await session.call_tool("sandbox_snapshot", {"sandbox": name, "name": "s1"}))
        assert snap["snapshot"] == "s1"
        assert "review mode" in _err(await session.call_tool("sandbox_diff", {"sandbox": name}))
        listed = _ok(await session.call_tool("sandbox_list", {}))["sandboxes"]
        assert [(s["sandbox"], s["status"], s["managed"]) for s in listed] == [
            (name, "Running", True)
        ]

        gone = _ok(await session.call_tool("sandbox_destroy", {"sandbox": name}))
        assert gone == {"sandbox": name, "removed": True}
        wait_for(lambda: not coi_names(client, ws), "the destroyed sandbox to go", GONE_WITHIN)
        assert "unknown sandbox" in _err(
            await session.call_tool("sandbox_exec", {"sandbox": name, "command": "true"})
        )
        assert _ok(await session.call_tool("sandbox_list", {}))["sandboxes"] == []

    _drive(root, coi_env, tmp_path / "server.log", body)


def test_bad_arguments_are_error_results_and_the_session_goes_on(
    root: Path, ws: Path, client: IncusClient, coi_env: dict[str, str], tmp_path: Path
) -> None:
    (root / "etc-link").symlink_to("/etc")
    (tmp_path / "beside").mkdir()

    async def body(session: ClientSession) -> None:
        text = _err(
            await session.call_tool("sandbox_exec", {"sandbox": "coi-x-1", "command": "id"})
        )
        assert "unknown sandbox 'coi-x-1'" in text and "To fix:" in text
        res = await session.call_tool("sandbox_exec", {"command": "id"})  # no sandbox
        assert "sandbox" in _err(res) and "required" in _err(res).lower()
        res = await session.call_tool("sandbox_exec", {"sandbox": "x", "command": 5})
        assert res.is_error
        assert res.is_error and (await session.call_tool("no_such_tool", {})).is_error
        for outside in ("/etc", "..", str(tmp_path / "beside"), "etc-link", str(Path.home())):
            res = await session.call_tool(
                "sandbox_create", {"workspace": outside, "image": "coi-tiny"}
            )
            assert "outside the server's root" in _err(res), outside
            assert res.structured_content is not None
            assert res.structured_content["error"]["resolution"]
        res = await session.call_tool(
            "sandbox_create", {"workspace": "ws", "image": "coi-tiny", "network": "open"}
        )
        assert "looser than 'restricted'" in _err(res)
        assert "allow_open_network" in _err(res)
        res = await session.call_tool(
            "sandbox_create", {"workspace": "ws", "image": "coi-tiny", "limits": {"ram": "1G"}}
        )
        assert "unknown limit 'ram'" in _err(res)
        res = await session.call_tool("sandbox_create", {"workspace": "ws", "image": "no-such"})
        assert res.is_error
        # Still serving, and nothing was made.
        assert len((await session.list_tools()).tools) == len(TOOLS)
        assert _ok(await session.call_tool("sandbox_list", {}))["sandboxes"] == []
        assert coi_names(client, ws) == []

    _drive(root, coi_env, tmp_path / "server.log", body)


def test_output_comes_as_progress_while_a_command_runs(
    root: Path, ws: Path, coi_env: dict[str, str], tmp_path: Path
) -> None:
    async def body(session: ClientSession) -> None:
        name = await _create(session, workspace="ws")
        notes: list[tuple[float, float, str | None]] = []

        async def progress(done: float, total: float | None, message: str | None) -> None:
            notes.append((time.monotonic(), done, message))

        started = time.monotonic()
        res = await session.call_tool(
            "sandbox_exec",
            {
                "sandbox": name,
                "command": "for i in 1 2 3 4 5; do echo line $i; sleep 0.25; done; echo end >&2",
            },
            progress_callback=progress,
        )
        ended = time.monotonic()
        out = _ok(res)
        assert out["stdout"] == "".join(f"line {i}\n" for i in range(1, 6))
        assert len(notes) >= 3, notes
        text = "".join(m or "" for _, _, m in notes)
        assert text == out["stdout"] + "[stderr] end\n"
        assert [d for _, d, _ in notes] == sorted({d for _, d, _ in notes})  # increasing
        # The first line came while the command still ran, not with the result.
        assert notes[0][0] - started < ended - started - 0.7, (notes, ended - started)

    _drive(root, coi_env, tmp_path / "server.log", body)


# -- lifetime -------------------------------------------------------------------------------


def test_leaving_removes_sandboxes_and_keeps_a_persistent_one_stopped(
    root: Path, ws: Path, client: IncusClient, coi_env: dict[str, str], tmp_path: Path
) -> None:
    made: dict[str, str] = {}

    async def body(session: ClientSession) -> None:
        made["ephemeral"] = await _create(session, workspace="ws")
        made["persistent"] = await _create(session, workspace="ws", persistent=True)
        assert sorted(_running(client, ws)) == sorted(made.values())

    _drive(root, coi_env, tmp_path / "server.log", body)
    wait_for(
        lambda: coi_names(client, ws) == [made["persistent"]],
        "the ephemeral sandbox to go",
        GONE_WITHIN,
    )
    # Stopped gracefully by the server, or (a client gives a server 4 s before SIGKILL, a
    # graceful stop may take 10) forced by its keeper: stopped and kept either way.
    wait_for(
        lambda: client.instances.get(made["persistent"]).status == "Stopped",
        "the persistent sandbox to be stopped",
        GONE_WITHIN,
    )
    assert coi_names(client, ws) == [made["persistent"]]


CLIENT = textwrap.dedent(
    """
    import os, sys, anyio
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def main():
        coi, root, log = sys.argv[1:4]
        params = StdioServerParameters(
            command=coi, args=["mcp", "--root", root], env=dict(os.environ), cwd=root
        )
        with open(log, "a") as errlog:
            async with stdio_client(params, errlog=errlog) as (r, w), ClientSession(r, w) as s:
                await s.initialize()
                res = await s.call_tool("sandbox_create", {"workspace": "ws", "image": "coi-tiny"})
                print(res.structured_content["sandbox"], flush=True)
                # A command under way when the end comes.
                await s.call_tool("sandbox_exec", {"sandbox": res.structured_content["sandbox"],
                                                   "command": "sleep 600"})

    anyio.run(main)
    """
)


def _server_pids(root: Path) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"coi mcp --root {root}$"], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize("killed", ["client", "server", "server-term"])
def test_nothing_is_left_when_the_client_or_the_server_is_killed(
    killed: str,
    root: Path,
    ws: Path,
    client: IncusClient,
    coi_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """SIGKILL to the client: the server reads the end of its stdin and removes its sandbox.
    SIGKILL to the server: the sandbox's keeper removes it. SIGTERM to the server: it
    removes it itself."""
    log = tmp_path / "server.log"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(COI), str(root), str(log)],
        env=coi_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name, (proc.stderr.read() if proc.stderr else "") + log.read_text()
        assert _running(client, ws) == [name]
        [server] = _server_pids(root)
        time.sleep(0.5)  # the command is under way
        if killed == "client":
            proc.kill()
        else:
            os.kill(server, signal.SIGKILL if killed == "server" else signal.SIGTERM)
        at = time.monotonic()
        wait_for(lambda: not coi_names(client, ws), f"the sandbox to go ({killed})", GONE_WITHIN)
        took = time.monotonic() - at
        wait_for(lambda: not _server_pids(root), "the server to end", 10)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    print(f"{killed} killed: sandbox gone after {took:.1f} s")
    if killed != "server":
        assert "Cleaning up container" in log.read_text()


def test_initialize_answers_quickly(root: Path, coi_env: dict[str, str]) -> None:
    """Startup cost: the time from spawning `coi mcp` to its answer to `initialize`."""
    request = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"},
        },
    }
    took = []
    for _ in range(3):
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(COI), "mcp", "--root", str(root)],
            env=coi_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        proc.stdin.flush()
        answer = json.loads(proc.stdout.readline())
        took.append(time.monotonic() - started)
        proc.stdin.close()
        assert proc.wait(timeout=20) == 0
        proc.stdout.close()
        assert answer["result"]["serverInfo"]["name"] == "coi"
    print("initialize answered after", ", ".join(f"{t:.2f} s" for t in took))
    assert min(took) < 5
