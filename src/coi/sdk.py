"""The Python API: sandboxes from code, with everything the command line's safety gives.

    import coi

    with coi.connect() as client, client.sandbox("~/project") as sb:
        result = sb.run(["make", "test"])
        print(result.exit_code, result.stdout)

A sandbox is made the way `coi run` makes one (the same function makes both): the user's
config and the workspace's untrusted `.coi.toml` rules, the network policy (restricted by
default), protected paths, limits, the monitor when configured, and a keeper process that
removes the sandbox should the calling program die.
"""

from __future__ import annotations

import logging
import os
import posixpath
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

from coi.backend.client import IncusClient
from coi.backend.exec import ExecRequest
from coi.config.loader import Config, load_config
from coi.config.schema import NetworkMode
from coi.errors import Conflict, NotFound, SessionError, UsageError
from coi.sessions.inventory import ContainerInfo, containers
from coi.sessions.prepare import Prepared, SessionOptions, prepare
from coi.sessions.runner import Live, open_sandbox
from coi.sessions.sandbox import Sandbox as _Box

logger = logging.getLogger("coi")

Channel = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class Output:
    """A piece of a command's output, as it came."""

    channel: Channel
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


@dataclass(frozen=True)
class Result:
    """How a command ended: its exit code, its whole output, how long it took.

    `exit_code` is 124 when `timeout` ended it (as `timeout(1)` says), 127 when the command
    does not exist, 126 when it cannot be run.
    """

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    timed_out: bool = False
    # With `max_output`: only the stream's last bytes were kept.
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")


@dataclass(frozen=True)
class FileEntry:
    """One entry of a folder in the sandbox."""

    name: str
    type: str  # file, directory, symlink
    mode: int
    uid: int


def connect(
    *,
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> Client:
    """A client for the daemon the user's config names (`incus.remote`, `incus.project`).

    :raises DaemonUnreachable: no daemon answers (run `coi setup`).
    """
    environ = os.environ if environ is None else environ
    cfg = load_config(cwd=Path(cwd) if cwd else None, env=environ, profile=profile)
    backend = IncusClient.connect(
        env=environ,
        remote=cfg.get_str("incus.remote") or None,
        project=cfg.get_str("incus.project"),
        timeout=float(cfg.get_int("incus.timeout")),
    )
    return Client(backend, cfg, environ=environ, profile=profile)


class Client:
    """Makes and lists sandboxes. Close it (or use it in `with`) when done; sandboxes made
    through it and still open are closed with it."""

    def __init__(
        self,
        backend: IncusClient,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        profile: str | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self._environ = os.environ if environ is None else environ
        self._profile = profile
        self._open: list[Sandbox] = []

    @property
    def daemon(self) -> str:
        """The daemon this client talks to: "incus" or "lxd"."""
        return self.backend.server.kind

    def sandbox(
        self,
        workspace: str | Path = ".",
        *,
        image: str | None = None,
        network: NetworkMode | None = None,
        limits: Mapping[str, str | int] | None = None,
        persistent: bool | None = None,
        monitor: bool | None = None,
        env: Mapping[str, str] | None = None,
        mounts: Sequence[str] = (),
        slot: int | None = None,
        ports: Sequence[str] = (),
        name: str | None = None,
        log: Callable[[str], None] | None = None,
        target: str | None = None,
    ) -> Sandbox:
        """Make a sandbox on `workspace` (mounted at /workspace) and start it.

        What is not given comes from the user's config, read as `coi run` in that folder
        reads it (the folder's own `.coi.toml` can only tighten it unless trusted).
        `limits` by short name: {"memory": "2GiB", "cpu": "2", "duration": "30m",
        "processes": 500, ...} (the `--limit-*` flags' names). A persistent sandbox is
        stopped and kept when closed, and reused by the next one on its slot. `ports`:
        published as `--port` publishes them ("HOST:CONTAINER", on 127.0.0.1 unless the
        config says otherwise; `Sandbox.ports` says what was published); `name`: an alias
        (`--name`), unique on the daemon. `target`: on an Incus cluster, the member to
        make it on (`--target`; by default the cluster's scheduler chooses).

        :raises UsageError, ConfigError: bad arguments (nothing is made).
        :raises SessionError: the image is missing, or the sandbox could not be made.
        """
        options = SessionOptions(
            workspace=Path(workspace).expanduser(),
            image=image,
            persistent=persistent,
            network=network,
            monitor=monitor,
            limits=dict(limits or {}),
            mounts=tuple(mounts),
            env=dict(env or {}),
            profile=self._profile,
            kind="run",
            ports=tuple(ports),
            alias=name,
            target=target,
        )
        if not Path(options.workspace or ".").is_dir():
            raise UsageError(
                f"workspace '{workspace}' is not a directory",
                resolution="Pass an existing folder.",
            )
        prepared = prepare(options, cwd=Path(str(options.workspace)), environ=self._environ)
        say = log or logger.info
        for line in prepared.messages:
            say(line)
        box = Sandbox._open(self, prepared, slot=slot, log=say)
        self._open.append(box)
        return box

    def list(self) -> list[ContainerInfo]:
        """coi's containers on this daemon, by name."""
        return containers(self.backend, with_state=True)

    def close(self) -> None:
        """Close every sandbox still open, then the connection."""
        try:
            while self._open:
                self._open[-1].close()
        finally:
            self.backend.close()

    def _closed(self, box: Sandbox) -> None:
        if box in self._open:
            self._open.remove(box)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Sandbox:
    """A running sandbox. Commands run as the agent user in the workspace, with nothing of
    the host's environment; `close()` removes it (or stops and keeps a persistent one)."""

    def __init__(self, client: Client, stack: ExitStack, live: Live) -> None:
        self._client = client
        self._stack = stack
        self._live = live
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def _open(
        cls, client: Client, prepared: Prepared, *, slot: int | None, log: Callable[[str], None]
    ) -> Sandbox:
        stack = ExitStack()
        try:
            live = stack.enter_context(
                open_sandbox(client.backend, prepared.spec, slot=slot, log=log)
            )
        except BaseException:
            stack.close()
            raise
        return cls(client, stack, live)

    # -- facts ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The container's name (`coi-<workspace hash>-<slot>`)."""
        return self._box.name

    @property
    def workspace(self) -> Path:
        """The host folder mounted in the sandbox."""
        return self._box.spec.workspace

    @property
    def workspace_path(self) -> str:
        """Where the workspace is inside (default /workspace)."""
        return self._box.spec.workspace_target

    @property
    def network(self) -> str:
        """The network mode in force: restricted, allowlist or open."""
        policy = self._box.spec.policy
        return policy.mode if policy is not None else "open"

    @property
    def persistent(self) -> bool:
        return self._box.spec.persistent

    @property
    def ports(self) -> list[tuple[str, int, int]]:
        """The published ports: (host address, host port, port inside), one per port."""
        return [
            (p.bind, p.host + i, p.container + i)
            for p in self._box.published
            for i in range(p.count)
        ]

    @property
    def killed(self) -> bool:
        """The security monitor killed this sandbox."""
        return self._live.killed

    @property
    def _box(self) -> _Box:
        return self._live.box

    # -- commands -------------------------------------------------------------------------

    def _request(
        self,
        command: str | Sequence[str],
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        root: bool,
    ) -> ExecRequest:
        self._check_open()
        argv = ["sh", "-c", command] if isinstance(command, str) else [str(a) for a in command]
        if not argv:
            raise UsageError("no command given", resolution="Pass a list such as ['make'].")
        if timeout is not None:
            if timeout <= 0:
                raise UsageError(f"timeout must be more than 0 seconds, got {timeout}")
            # In the sandbox, so the whole process group goes (a command's children too).
            argv = ["timeout", "-k", "5", f"{timeout:g}", *argv]
        req = self._box.request(argv, dict(env or {}), cwd=cwd, once=True)
        if root:
            req = ExecRequest(argv, req.env, req.cwd, 0, 0, once=True)
        return req

    def run(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        root: bool = False,
        on_output: Callable[[Output], None] | None = None,
        max_output: int | None = None,
    ) -> Result:
        """Run a command to its end. A string runs with `sh -c`; a list runs as it is.

        `on_output` sees the output as it comes (it is in the result all the same).
        `timeout` (seconds) ends the command and its children: exit code 124.
        `root` runs it as root inside the sandbox instead of the agent user.
        `max_output` (bytes): keep only each stream's last this many (memory stays bounded
        whatever the command prints); the result says which streams were cut.
        """
        req = self._request(command, env, cwd, timeout, root)
        if max_output is not None and max_output < 0:
            raise UsageError(f"max_output must be 0 or more, got {max_output}")
        out, err = _Tail(max_output), _Tail(max_output)

        def sink(channel: Channel, buf: _Tail) -> Callable[[bytes], None]:
            def write(data: bytes) -> None:
                buf.add(data)
                if on_output is not None:
                    on_output(Output(channel, data))

            return write

        data = stdin.encode() if isinstance(stdin, str) else stdin
        started = time.monotonic()
        res = self._client.backend.exec.run(
            self.name,
            req,
            stdin=data,
            on_stdout=sink("stdout", out),
            on_stderr=sink("stderr", err),
        )
        duration = time.monotonic() - started
        # coreutils says 124, busybox 143 (TERM), both 137 after the -k grace.
        timed_out = timeout is not None and res.exit_code in (124, 137, 143) and duration >= timeout
        return Result(
            124 if timed_out else res.exit_code,
            out.data(),
            err.data(),
            duration,
            timed_out,
            out.cut,
            err.cut,
        )

    def stream(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        root: bool = False,
    ) -> Stream:
        """Run a command, its output given as it comes: iterate the stream for `Output`
        pieces; its `result` is there once the iteration ended."""
        self._request(command, env, cwd, timeout, root)  # bad arguments raise here, not later
        return Stream(
            lambda sink: self.run(
                command, env=env, cwd=cwd, timeout=timeout, root=root, on_output=sink
            )
        )

    # -- files ----------------------------------------------------------------------------

    def _path(self, path: str) -> str:
        """An absolute path inside; a relative one is taken from the workspace."""
        if not path:
            raise UsageError("empty path")
        return posixpath.normpath(posixpath.join(self.workspace_path, path))

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write a file (as the agent user; missing folders are made). Relative paths are in
        the workspace."""
        self._check_open()
        target = self._path(path)
        uid = self._box.spec.code_uid
        files = self._client.backend.files
        parent = posixpath.dirname(target)
        if parent != "/" and files.stat(self.name, parent) is None:
            files.mkdir(self.name, parent, uid=uid, gid=uid, parents=True)
        payload = data.encode() if isinstance(data, str) else data
        files.push_bytes(self.name, target, payload, uid=uid, gid=uid, mode=mode)

    def read_file(self, path: str) -> bytes:
        """A file's content. Relative paths are in the workspace.

        :raises NotFound: no such file.
        :raises UsageError: the path is a folder.
        """
        self._check_open()
        target = self._path(path)
        info = self._client.backend.files.stat(self.name, target)
        if info is None:
            raise NotFound(f"no such file in {self.name}: {target}")
        if info.type == "directory":
            raise UsageError(f"{target} is a folder", resolution="Use list_files() for a folder.")
        return self._client.backend.files.read(self.name, target)

    def list_files(self, path: str = ".") -> list[FileEntry]:
        """A folder's entries (not recursive), by name."""
        self._check_open()
        target = self._path(path)
        files = self._client.backend.files
        info = files.stat(self.name, target)
        if info is None:
            raise NotFound(f"no such folder in {self.name}: {target}")
        if info.type != "directory":
            raise UsageError(f"{target} is not a folder")
        out = []
        for name in sorted(files.listdir(self.name, target)):
            st = files.stat(self.name, posixpath.join(target, name))
            if st is not None:
                out.append(FileEntry(name, st.type, st.mode, st.uid))
        return out

    def push(self, local: str | Path, path: str) -> None:
        """Copy a host file or folder into the sandbox (owned by the agent user)."""
        self._check_open()
        src = Path(local).expanduser()
        if not src.exists():
            raise NotFound(f"source does not exist: {src}")
        target = self._path(path)
        uid = self._box.spec.code_uid
        files = self._client.backend.files
        parent = posixpath.dirname(target)
        if parent != "/" and files.stat(self.name, parent) is None:
            files.mkdir(self.name, parent, uid=uid, gid=uid, parents=True)
        if src.is_dir():
            files.push_tree(self.name, src, target, uid=uid, gid=uid)
        else:
            files.push_file(self.name, src, target, uid=uid, gid=uid)

    def pull(self, path: str, local: str | Path) -> list[str]:
        """Copy a file or folder out of the sandbox; what it brings out is data only (links,
        devices, FIFOs and set-id bits are dropped). Returns what was left out, and why."""
        self._check_open()
        target = self._path(path)
        files = self._client.backend.files
        info = files.stat(self.name, target)
        if info is None:
            raise NotFound(f"no such path in {self.name}: {target}")
        dest = Path(local).expanduser()
        if info.type == "directory":
            report = files.pull_tree(self.name, target, dest)
        else:
            report = files.pull_file(self.name, target, dest)
        return list(report.warnings())

    # -- checkpoints ----------------------------------------------------------------------

    def snapshot(self, name: str | None = None) -> str:
        """Snapshot the container (default name snap-YYYYMMDD-HHMMSS); the name."""
        self._check_open()
        name = name or datetime.now().strftime("snap-%Y%m%d-%H%M%S")
        instances = self._client.backend.instances
        if any(s.name == name for s in instances.snapshots(self.name)):
            raise Conflict(f"snapshot '{name}' already exists for container '{self.name}'")
        instances.create_snapshot(self.name, name)
        return name

    def diff(self) -> str:
        """What the agent changed, for review. Needs review mode (not built yet)."""
        raise SessionError(
            "diff needs review mode, which this version of coi does not have",
            resolution="Compare the workspace with git (git -C WORKSPACE diff) meanwhile.",
        )

    # -- the end --------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the sandbox (a persistent one is stopped and kept). Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._stack.close()
        finally:
            self._client._closed(self)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"sandbox {self.name} is closed")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<coi.Sandbox {self.name} workspace={str(self.workspace)!r}>"


class _Tail:
    """A stream's output, or only its last `keep` bytes (None: all of it)."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self.buf = bytearray()
        self.cut = False

    def add(self, data: bytes) -> None:
        self.buf += data
        # Trimmed once it holds twice the limit: each byte is moved about once.
        if self.keep is not None and len(self.buf) > 2 * self.keep + 65536:
            del self.buf[: len(self.buf) - self.keep]
            self.cut = True

    def data(self) -> bytes:
        if self.keep is not None and len(self.buf) > self.keep:
            del self.buf[: len(self.buf) - self.keep]
            self.cut = True
        return bytes(self.buf)


_END = object()


class Stream:
    """A command's output as it comes (iterate it); `result` once it has ended."""

    def __init__(self, run: Callable[[Callable[[Output], None]], Result]) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._result: Result | None = None
        self._error: BaseException | None = None

        def work() -> None:
            try:
                self._result = run(self._queue.put)
            except BaseException as err:
                self._error = err
            finally:
                self._queue.put(_END)

        self._thread = threading.Thread(target=work, name="coi-stream", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Output]:
        while True:
            item = self._queue.get()
            if item is _END:
                self._thread.join()
                if self._error is not None:
                    raise self._error
                return
            assert isinstance(item, Output)
            yield item

    def wait(self) -> Result:
        """Read to the end; the result."""
        for _ in self:
            pass
        return self.result

    @property
    def result(self) -> Result:
        """How the command ended (read the stream to its end first)."""
        if self._result is None:
            raise UsageError("the command has not ended yet: read the stream to its end")
        return self._result
