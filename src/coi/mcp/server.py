"""`coi mcp`: coi's sandboxes as MCP tools, over stdio, built on the Python API (coi.sdk).

Every sandbox is made by `coi.Client.sandbox`, so it has what `coi run` gives one: the
user's config, the network policy, protected paths, limits and a keeper process. On top, the
server judges what a client asks (coi.mcp.policy): workspaces only inside the root, a
network and limits no looser than the config. Sandboxes live as long as the connection:
when the client goes (stdin ends) or the server gets SIGTERM, SIGINT or SIGHUP, they are
removed (persistent ones stopped and kept); should the server be killed outright, their
keepers remove them.

The MCP library is imported here only: `coi mcp` pays for it, no other command does.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import gc
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, ContentBlock, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from coi import __version__
from coi.config.loader import load_config
from coi.config.schema import NetworkMode
from coi.errors import CoiError, SessionError, UsageError
from coi.mcp.policy import check_network, inside_root, limit_refusals, limits_overrides
from coi.sdk import Client, Output, Sandbox, connect

T = TypeVar("T")

# What one result carries at most: the tail of a command's output, the head of a file.
MAX_OUTPUT = 1 << 20
MAX_READ = 4 << 20
# Progress notifications: at most this much output in one, and one per this many seconds.
MAX_NOTE = 16 << 10
NOTE_INTERVAL = 0.1

INSTRUCTIONS = """\
coi sandboxes: isolated Incus system containers with a workspace folder mounted at
/workspace. Make one with sandbox_create (workspace: a folder inside the server's root),
run commands in it with sandbox_exec (output streams as progress notifications), read and
write its files with file_read / file_write / file_list (relative paths are in the
workspace), and remove it with sandbox_destroy. Sandboxes obey the user's coi config: the
network is restricted (internet only) unless the config says otherwise, and a client may
not loosen it. Every sandbox this server made is removed when the client disconnects."""


# -- results -----------------------------------------------------------------------------


class SandboxInfo(BaseModel):
    sandbox: str = Field(description="The sandbox's name: pass it to the other tools.")
    workspace: str = Field(description="The host folder mounted in the sandbox.")
    workspace_path: str = Field(description="Where the workspace is inside the sandbox.")
    network: str = Field(description="The network mode in force: restricted, allowlist or open.")
    persistent: bool = Field(description="Stopped and kept (not removed) when closed.")
    messages: list[str] = Field(default_factory=list, description="What coi said making it.")


class ExecResult(BaseModel):
    sandbox: str
    exit_code: int = Field(description="124 when timeout ended it, 127: no such command.")
    stdout: str
    stderr: str
    duration: float = Field(description="Seconds.")
    timed_out: bool
    stdout_truncated: bool = Field(description="Only the output's last 1 MiB is here.")
    stderr_truncated: bool


class FileContent(BaseModel):
    sandbox: str
    path: str
    content: str
    encoding: Literal["utf-8", "base64"] = Field(description="base64 when not valid UTF-8.")
    size: int = Field(description="The file's size in bytes.")
    truncated: bool = Field(description="Only the first max_bytes are in content.")


class FileWritten(BaseModel):
    sandbox: str
    path: str
    size: int


class Entry(BaseModel):
    name: str
    type: str = Field(description="file, directory or symlink")
    mode: str = Field(description="Permission bits, octal.")
    uid: int


class FileListing(BaseModel):
    sandbox: str
    path: str
    entries: list[Entry]


class SnapshotInfo(BaseModel):
    sandbox: str
    snapshot: str


class DiffInfo(BaseModel):
    sandbox: str
    diff: str


class Destroyed(BaseModel):
    sandbox: str
    removed: bool = Field(description="False for a persistent sandbox: stopped and kept.")


class Listed(BaseModel):
    sandbox: str
    status: str = Field(description="Running, Stopped, Frozen, or Gone.")
    workspace: str
    network: str | None = None
    persistent: bool
    managed: bool = Field(description="Made by this server (the other tools accept it).")


class SandboxList(BaseModel):
    sandboxes: list[Listed]


# -- state -------------------------------------------------------------------------------


class Sandboxes:
    """The server's sandboxes and its connection to the daemon (made on first use, so the
    server starts and answers even while the daemon is down). Blocking: called in threads."""

    def __init__(self, root: Path, environ: Mapping[str, str]) -> None:
        self.root = root
        self.environ = environ
        self._client: Client | None = None
        self._boxes: dict[str, Sandbox] = {}
        self._lock = threading.Lock()
        self.closing = False

    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                self._client = connect(environ=self.environ, cwd=self.root)
            return self._client

    def get(self, name: str) -> Sandbox:
        with self._lock:
            box = self._boxes.get(name)
        if box is None:
            raise UsageError(
                f"unknown sandbox '{name}'",
                resolution="Pass a name sandbox_create returned (sandbox_list shows them).",
            )
        return box

    def create(
        self,
        workspace: str,
        *,
        image: str | None,
        network: NetworkMode | None,
        persistent: bool | None,
        limits: Mapping[str, str | int],
        env: Mapping[str, str],
    ) -> SandboxInfo:
        ws = inside_root(self.root, workspace)
        # The config as this sandbox will have it, before the client's asks: the user's
        # files, the folder's own (untrusted) .coi.toml, COI_* variables.
        config = load_config(cwd=ws, env=self.environ)
        check_network(network, config)
        if limits:
            overrides = limits_overrides(limits)
            asked = load_config(cwd=ws, env=self.environ, cli=overrides)
            if refused := limit_refusals(asked, config, list(overrides)):
                raise UsageError(
                    "refused: limits looser than the user's coi config",
                    details="\n".join(refused),
                    resolution="Ask for lower limits, or leave them out (the config's apply).",
                )
        if self.closing:
            raise SessionError("the server is shutting down")
        messages: list[str] = []

        def say(line: str) -> None:
            messages.append(line)
            print(line, file=sys.stderr, flush=True)

        box = self.client().sandbox(
            ws,
            image=image or None,
            network=network,
            limits=limits,
            persistent=persistent,
            env=env,
            log=say,
        )
        with self._lock:
            late = self.closing
            if not late:
                self._boxes[box.name] = box
        if late:
            box.close()
            raise SessionError("the server is shutting down")
        return SandboxInfo(
            sandbox=box.name,
            workspace=str(box.workspace),
            workspace_path=box.workspace_path,
            network=box.network,
            persistent=box.persistent,
            messages=list(messages),
        )

    def destroy(self, name: str) -> Destroyed:
        box = self.get(name)
        with self._lock:
            self._boxes.pop(name, None)  # closed even if closing fails: no use after
        box.close()
        return Destroyed(sandbox=name, removed=not box.persistent)

    def listing(self, every: bool) -> SandboxList:
        with self._lock:
            mine = dict(self._boxes)
        found = {c.name: c for c in self.client().list()} if (mine or every) else {}
        out = [
            Listed(
                sandbox=name,
                status=found[name].status if name in found else "Gone",
                workspace=str(box.workspace),
                network=box.network,
                persistent=box.persistent,
                managed=True,
            )
            for name, box in sorted(mine.items())
        ]
        if every:
            for name, c in sorted(found.items()):
                if name in mine or not c.workspace or not _under(self.root, c.workspace):
                    continue
                out.append(
                    Listed(
                        sandbox=name,
                        status=c.status,
                        workspace=c.workspace,
                        persistent=c.persistent,
                        managed=False,
                    )
                )
        return SandboxList(sandboxes=out)

    def close_all(self) -> None:
        """Close every sandbox (at once: a client gives a server seconds to go), then the
        connection. New ones are refused from now on."""
        with self._lock:
            self.closing = True
            boxes = list(self._boxes.values())
            self._boxes.clear()
        if boxes:
            with ThreadPoolExecutor(max_workers=min(8, len(boxes))) as pool:
                for done in [pool.submit(box.close) for box in boxes]:
                    try:
                        done.result()
                    except Exception as err:  # one failing must not keep the others
                        print(f"coi mcp: closing a sandbox failed: {err}", file=sys.stderr)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _under(root: Path, path: str) -> bool:
    p = Path(path)
    return p == root or root in p.parents


# -- plumbing ----------------------------------------------------------------------------


def _text(model: BaseModel) -> list[ContentBlock]:
    return [TextContent(type="text", text=model.model_dump_json(indent=1))]


def _error(err: BaseException) -> CallToolResult:
    """A tool error result (isError) with the message, details and what to do."""
    if isinstance(err, CoiError):
        kind, message, details, resolution = (
            type(err).__name__,
            err.message,
            err.details,
            err.resolution,
        )
    else:
        kind, message, details, resolution = type(err).__name__, str(err), None, None
    text = f"Error: {message}"
    if details:
        text += f"\n{details}"
    if resolution:
        text += f"\nTo fix: {resolution}"
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content={
            "error": {
                "type": kind,
                "message": message,
                "details": details,
                "resolution": resolution,
            }
        },
        is_error=True,
    )


async def _call(work: Callable[[], T]) -> T:
    """Run blocking SDK work in a thread. A cancelled call leaves the thread to finish on its
    own (a command keeps running in its sandbox until it ends or the sandbox goes)."""
    return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)


async def _result(work: Callable[[], Awaitable[BaseModel]]) -> CallToolResult:
    """The tool's result, or its error as a result: nothing a client sends crashes the
    server."""
    try:
        model = await work()
    except CoiError as err:
        return _error(err)
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        return _error(err)
    return CallToolResult(content=_text(model), structured_content=model.model_dump(mode="json"))


class _Notes:
    """Output pieces -> progress messages: each channel decoded as a stream (a character
    split between two pieces comes out whole), stderr marked, long runs cut in the middle."""

    def __init__(self) -> None:
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }

    def message(self, pieces: list[Output]) -> str:
        parts: list[str] = []
        for piece in pieces:
            text = self._decoders[piece.channel].decode(piece.data)
            if text:
                parts.append(f"[stderr] {text}" if piece.channel == "stderr" else text)
        text = "".join(parts)
        if len(text) > MAX_NOTE:
            half = MAX_NOTE // 2
            left = len(text) - MAX_NOTE
            text = f"{text[:half]}\n... {left} characters left out ...\n{text[-half:]}"
        return text


async def _pump(
    recv: MemoryObjectReceiveStream[Output], report: Callable[[float, str], Awaitable[None]]
) -> None:
    """Send the output as it comes as progress: whatever is there at once in one message,
    at most one message per NOTE_INTERVAL. `progress` counts the output's bytes so far."""
    done = 0
    notes = _Notes()
    async with recv:
        async for first in recv:
            pieces = [first]
            while True:
                try:
                    pieces.append(recv.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            done += sum(len(p.data) for p in pieces)
            message = notes.message(pieces)
            if not message:
                continue  # half a character: it comes with the next piece
            try:
                await report(done, message)
            except Exception as err:  # the client went: the command's result still counts
                print(f"coi mcp: progress not sent: {err}", file=sys.stderr)
            await anyio.sleep(NOTE_INTERVAL)


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(
            f"mode '{text}' is not octal", resolution="Use e.g. '644' or '755'."
        ) from None
    if not 0 <= mode <= 0o7777:
        raise UsageError(f"mode '{text}' is out of range", resolution="Use e.g. '644' or '755'.")
    return mode


# -- the server --------------------------------------------------------------------------

SandboxName = Annotated[str, Field(description="A name sandbox_create returned.")]
InPath = Annotated[
    str,
    Field(description="A path in the sandbox; relative paths are in the workspace."),
]


def build(state: Sandboxes) -> MCPServer[Any]:
    """The MCP server with coi's tools, acting on `state`."""
    server: MCPServer[Any] = MCPServer(
        "coi",
        title="coi: code on incus",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level="WARNING",
    )
    _sandbox_tools(server, state)
    _exec_tool(server, state)
    _file_tools(server, state)
    return server


READONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False)


def _sandbox_tools(server: MCPServer[Any], state: Sandboxes) -> None:
    @server.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=True))
    async def sandbox_create(
        workspace: Annotated[
            str,
            Field(
                description="Host folder to mount at /workspace: inside the server's root; "
                "relative paths are taken from the root."
            ),
        ] = ".",
        image: Annotated[
            str | None, Field(description="Image alias; default: the config's (coi).")
        ] = None,
        network: Annotated[
            NetworkMode | None,
            Field(
                description="Network mode; default: the config's. A mode looser than the "
                "config's (open, say) is refused unless the user allowed it."
            ),
        ] = None,
        persistent: Annotated[
            bool | None,
            Field(description="Stop and keep the sandbox when closed instead of removing it."),
        ] = None,
        limits: Annotated[
            dict[str, str | int] | None,
            Field(
                description="By short name: cpu, cpu_allowance, cpu_priority, memory, "
                "memory_swap, memory_enforce, disk_read, disk_write, disk_max, disk_priority, "
                'tmpfs, processes, duration. E.g. {"memory": "2GiB", "duration": "30m"}. '
                "Only lower than the config's."
            ),
        ] = None,
        env: Annotated[
            dict[str, str] | None,
            Field(description="Environment variables for every command in the sandbox."),
        ] = None,
    ) -> Annotated[CallToolResult, SandboxInfo]:
        """Make a sandbox (an isolated container) on a workspace folder and start it."""
        return await _result(
            lambda: _call(
                lambda: state.create(
                    workspace,
                    image=image,
                    network=network,
                    persistent=persistent,
                    limits=limits or {},
                    env=env or {},
                )
            )
        )

    @server.tool(annotations=READONLY)
    async def sandbox_diff(sandbox: SandboxName) -> Annotated[CallToolResult, DiffInfo]:
        """What the agent changed in the workspace, for review (needs review mode)."""

        def work() -> DiffInfo:
            return DiffInfo(sandbox=sandbox, diff=state.get(sandbox).diff())

        return await _result(lambda: _call(work))

    @server.tool(annotations=ToolAnnotations(destructive_hint=False))
    async def sandbox_snapshot(
        sandbox: SandboxName,
        name: Annotated[
            str | None, Field(description="Snapshot name; default snap-YYYYMMDD-HHMMSS.")
        ] = None,
    ) -> Annotated[CallToolResult, SnapshotInfo]:
        """Snapshot a sandbox's container."""

        def work() -> SnapshotInfo:
            return SnapshotInfo(sandbox=sandbox, snapshot=state.get(sandbox).snapshot(name))

        return await _result(lambda: _call(work))

    @server.tool(annotations=ToolAnnotations(destructive_hint=True))
    async def sandbox_destroy(sandbox: SandboxName) -> Annotated[CallToolResult, Destroyed]:
        """Remove a sandbox (a persistent one is stopped and kept)."""
        return await _result(lambda: _call(lambda: state.destroy(sandbox)))

    @server.tool(annotations=READONLY)
    async def sandbox_list(
        all: Annotated[
            bool,
            Field(
                description="Also coi containers this server did not make whose workspace is "
                "inside the root (listed only: the other tools refuse them)."
            ),
        ] = False,
    ) -> Annotated[CallToolResult, SandboxList]:
        """The sandboxes this server made, with their state."""
        return await _result(lambda: _call(lambda: state.listing(all)))


def _exec_tool(server: MCPServer[Any], state: Sandboxes) -> None:
    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=True))
    async def sandbox_exec(
        sandbox: SandboxName,
        command: Annotated[
            str | list[str],
            Field(description="A string runs with sh -c; a list runs as it is."),
        ],
        ctx: Context[Any, Any],
        cwd: Annotated[
            str | None, Field(description="Working folder in the sandbox; default: workspace.")
        ] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra variables.")] = None,
        timeout: Annotated[
            float | None,
            Field(description="Seconds; ends the command and its children (exit code 124)."),
        ] = None,
        stdin: Annotated[str | None, Field(description="Text given to its standard input.")] = None,
        root: Annotated[
            bool, Field(description="Run as root in the sandbox instead of the agent user.")
        ] = False,
    ) -> Annotated[CallToolResult, ExecResult]:
        """Run a command in a sandbox to its end. Its output is sent as progress
        notifications while it runs (when the call carries a progress token)."""

        async def work() -> ExecResult:
            box = state.get(sandbox)
            send, recv = anyio.create_memory_object_stream[Output](math.inf)
            token = anyio.lowlevel.current_token()

            def on_output(piece: Output) -> None:
                try:
                    anyio.from_thread.run_sync(send.send_nowait, piece, token=token)
                except Exception:
                    pass  # the loop or the stream is gone: the piece is in the result anyway

            async def report(progress: float, message: str) -> None:
                await ctx.report_progress(progress, None, message)

            def run() -> ExecResult:
                try:
                    res = box.run(
                        command,
                        env=env,
                        cwd=cwd,
                        stdin=stdin,
                        timeout=timeout,
                        root=root,
                        on_output=on_output,
                        max_output=MAX_OUTPUT,
                    )
                finally:
                    try:
                        anyio.from_thread.run_sync(send.close, token=token)
                    except Exception:
                        pass
                return ExecResult(
                    sandbox=sandbox,
                    exit_code=res.exit_code,
                    stdout=res.stdout,
                    stderr=res.stderr,
                    duration=round(res.duration, 3),
                    timed_out=res.timed_out,
                    stdout_truncated=res.stdout_truncated,
                    stderr_truncated=res.stderr_truncated,
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(_pump, recv, report)
                try:
                    result = await _call(run)
                finally:
                    send.close()
            return result  # after the pump sent the last output

        return await _result(work)


def _file_tools(server: MCPServer[Any], state: Sandboxes) -> None:
    @server.tool(annotations=READONLY)
    async def file_read(
        sandbox: SandboxName,
        path: InPath,
        max_bytes: Annotated[
            int, Field(ge=0, le=MAX_READ, description="Return at most this many bytes.")
        ] = 1 << 20,
    ) -> Annotated[CallToolResult, FileContent]:
        """Read a file in a sandbox (UTF-8 text, or base64 when it is not)."""

        def work() -> FileContent:
            data = state.get(sandbox).read_file(path)
            head = data[:max_bytes]
            try:
                content, encoding = head.decode(), "utf-8"
            except UnicodeDecodeError:
                content, encoding = base64.b64encode(head).decode(), "base64"
            return FileContent(
                sandbox=sandbox,
                path=path,
                content=content,
                encoding="utf-8" if encoding == "utf-8" else "base64",
                size=len(data),
                truncated=len(head) < len(data),
            )

        return await _result(lambda: _call(work))

    @server.tool(annotations=ToolAnnotations(destructive_hint=True))
    async def file_write(
        sandbox: SandboxName,
        path: InPath,
        content: Annotated[str, Field(description="The file's new content.")],
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="How content is given.")
        ] = "utf-8",
        mode: Annotated[str, Field(description="Permission bits, octal.")] = "644",
    ) -> Annotated[CallToolResult, FileWritten]:
        """Write a file in a sandbox as the agent user (missing folders are made); a file
        in the workspace lands in the host folder."""

        def work() -> FileWritten:
            if encoding == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except (binascii.Error, ValueError) as err:
                    raise UsageError(f"content is not valid base64: {err}") from None
            else:
                data = content.encode()
            state.get(sandbox).write_file(path, data, mode=_mode(mode))
            return FileWritten(sandbox=sandbox, path=path, size=len(data))

        return await _result(lambda: _call(work))

    @server.tool(annotations=READONLY)
    async def file_list(
        sandbox: SandboxName,
        path: Annotated[
            str, Field(description="A folder in the sandbox; default: the workspace.")
        ] = ".",
    ) -> Annotated[CallToolResult, FileListing]:
        """List a folder in a sandbox (not recursive)."""

        def work() -> FileListing:
            entries = state.get(sandbox).list_files(path)
            return FileListing(
                sandbox=sandbox,
                path=path,
                entries=[
                    Entry(name=e.name, type=e.type, mode=f"{e.mode & 0o7777:o}", uid=e.uid)
                    for e in entries
                ],
            )

        return await _result(lambda: _call(work))


# -- running -----------------------------------------------------------------------------

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _finish(state: Sandboxes, code: int) -> NoReturn:
    """Close every sandbox made, then end the process: at once, since a thread may still
    wait on stdin and nothing else would end it. Signals are ignored meanwhile, so the
    cleanup finishes (a SIGKILL leaves it to the sandboxes' keepers)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    try:
        state.close_all()
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        code = code or 1
    finally:
        sys.stderr.flush()
        os._exit(code)


async def _main(server: MCPServer[Any], state: Sandboxes) -> None:
    async def watch() -> None:
        with anyio.open_signal_receiver(*SIGNALS) as signals:
            async for signum in signals:
                # Not a cancellation: the stdin reader would hold it until a line comes.
                _finish(state, 128 + signum)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await server.run_stdio_async()  # until stdin ends
        tg.cancel_scope.cancel()


def serve(root: Path, *, environ: Mapping[str, str] | None = None) -> NoReturn:
    """Serve MCP on stdin/stdout until the client goes (stdin ends) or a signal comes,
    then close every sandbox made and end the process."""
    state = Sandboxes(root, os.environ if environ is None else environ)
    server = build(state)
    # The command line runs without the garbage collector (short commands gain); a server
    # that runs for hours needs it. What is loaded by now stays out of its way.
    gc.freeze()
    gc.enable()
    code = 0
    try:
        anyio.run(_main, server, state)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        code = 1
    _finish(state, code)
