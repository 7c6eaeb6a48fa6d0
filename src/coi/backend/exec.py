"""Run commands in instances: streamed output, stdin, exit codes, and interactive PTYs."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import quote

from coi.backend.connection import tls_context
from coi.backend.models import JSON, ExecResult
from coi.errors import BackendError, IncusTimeout, NotFound, OperationFailed

if TYPE_CHECKING:
    # websockets (about 20 ms to import) is imported where a socket is opened or read:
    # commands that never exec (coi list, coi health, ...) do not pay for it.
    from websockets.sync.client import ClientConnection

    from coi.backend.client import IncusClient

OutputSink = Callable[[bytes], None]
T = TypeVar("T")
_CHUNK = 64 * 1024
_NOT_STARTED = "Failed to retrieve PID of executing child process"
_START_ATTEMPTS = 3


# A command that must never run twice (a user's) starts through this: it claims a token
# first, with mkdir (atomic), so of two starts of one request only one runs the command. $0
# is the token, "$@" the command. One that cannot be found or run exits 127 or 126, which
# the daemon reports as it would without this (see `_START_ERRORS`).
_ONCE = """t=/dev/shm; [ -d $t ] && [ -w $t ] || t=/tmp
if ! mkdir "$t/.coi-once-$0" 2>/dev/null; then
  if [ -e "$t/.coi-once-$0" ]; then
    echo "coi: not started a second time: an earlier start of this command, which the \
daemon lost track of, ran it" >&2
  else
    echo "coi: not started: could not record its start in $t (full, or not writable?)" >&2
  fi
  exit 125
fi
case $1 in
  */*) if [ ! -e "$1" ]; then exit 127; elif [ -d "$1" ] || [ ! -x "$1" ]; then exit 126; fi ;;
  *) command -v "$1" >/dev/null 2>&1 || exit 127 ;;
esac
exec "$@"
"""
# Whether the command of a `once` request has started (run as root; $0 is the token).
_ONCE_STARTED = 'test -e "/dev/shm/.coi-once-$0" || test -e "/tmp/.coi-once-$0"'


@dataclass
class ExecRequest:
    """What to run and as whom.

    `once`: the command must never run twice, even when the daemon loses track of a start
    (a user's command: `coi run`, keys typed into tmux, the SDK). Such a start is retried
    only when the command surely did not run; otherwise the error says so.
    """

    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: int | None = None
    group: int | None = None
    once: bool = False
    # The same for every start of this request: what makes a second start see the first.
    token: str = field(default_factory=lambda: secrets.token_hex(8), repr=False)

    def argv(self) -> list[str]:
        """The command as the daemon is asked to start it."""
        if self.once:
            return ["sh", "-c", _ONCE, self.token, *self.command]
        return list(self.command)

    def body(self, *, interactive: bool, width: int = 80, height: int = 24) -> JSON:
        body: JSON = {
            "command": self.argv(),
            "environment": dict(self.env),
            "wait-for-websocket": True,
            "interactive": interactive,
            "record-output": False,
        }
        if interactive:
            body["width"], body["height"] = width, height
        if self.cwd:
            body["cwd"] = self.cwd
        if self.user is not None:
            body["user"] = self.user
            body["group"] = self.user if self.group is None else self.group
        elif self.group is not None:
            body["group"] = self.group
        return body


class ExecSession:
    """A started command: its websockets, and the operation that yields its exit code."""

    def __init__(
        self,
        client: IncusClient,
        op: JSON,
        sockets: dict[str, ClientConnection],
        stack: contextlib.ExitStack,
        command: Sequence[str] = (),
    ):
        self._client = client
        self._op_id = str(op["id"])
        self._command = command
        self.sockets = sockets
        self._stack = stack
        self._control_lock = threading.Lock()
        # The daemon keeps a finished operation for 5 s only: asked after that (a slow
        # consumer of the output, a loaded machine, a hiccup of the daemon's socket), it says
        # "Operation not found" and the exit code is lost. So the wait is asked at once, by a
        # thread that holds it open while the command runs.
        self._outcome: list[JSON | BaseException] = []
        self._waiter = threading.Thread(target=self._wait_op, daemon=True)
        self._waiter.start()

    def _wait_op(self) -> None:
        try:
            self._outcome.append(finished_exec(self._client, self._op_id))
        except BaseException as err:  # handed to the caller of `wait`
            self._outcome.append(err)

    def control(self, command: str, args: Mapping[str, str], **extra: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        ws = self.sockets.get("control")
        if ws is None:
            return
        with self._control_lock, contextlib.suppress(ConnectionClosed):
            ws.send(json.dumps({"command": command, "args": dict(args), **extra}))

    def signal(self, signum: int) -> None:
        """Deliver a signal to the command inside the instance."""
        # The signal number is a top-level field of the control message, not an arg.
        self.control("signal", {}, signal=signum)

    def resize(self, width: int, height: int) -> None:
        self.control("window-resize", {"width": str(width), "height": str(height)})

    def close(self) -> None:
        for ws in self.sockets.values():
            with contextlib.suppress(Exception):
                ws.close()
        with contextlib.suppress(Exception):
            self._stack.close()

    def wait(self, on_stderr: OutputSink | None = None) -> int:
        """Close our side and return the command's exit code.

        A command the daemon could not start (not found, not executable) ends with the
        shell's exit code, and the shell's message goes to `on_stderr`.
        """
        self.close()
        self._waiter.join()
        outcome = self._outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return exit_code(outcome, self._command, on_stderr)


# A wait cut short by the daemon (its socket reset, a 5xx) is asked again this many times.
_WAIT_ATTEMPTS = 4


def finished_exec(client: IncusClient, op_id: str) -> JSON:
    """The exec operation `op_id` once it has ended, failed or not.

    A brief daemon error during the wait is not the command's failure: the wait is asked
    again. If the operation is gone when asked again (it ended meanwhile and the daemon
    dropped it, or the daemon restarted), the error says so, not "Operation not found".

    :raises OperationFailed: the daemon no longer knows the operation.
    """
    err: BackendError | None = None
    for attempt in range(_WAIT_ATTEMPTS):
        try:
            return client.wait_operation(op_id, what="exec", failure_ok=True)
        except NotFound:
            err = None  # it is gone, whatever came before
            break
        except (IncusTimeout, OperationFailed):
            raise
        except BackendError as e:
            # A daemon that is gone for good is told by the caller (coi run: exit 75).
            err = e
            time.sleep(0.2 * (attempt + 1))
    what = (
        f"the daemon lost track of the command (operation {op_id} is gone)"
        if err is None
        else "the daemon did not answer when asked how the command ended"
    )
    raise OperationFailed(
        f"exec: {what}; its exit code is unknown",
        details=str(err) if err is not None else None,
        resolution="Run it again; if the daemon restarted, 'coi health' says whether it is back.",
    )


# What the daemon says when it could not start the command, and what a shell would print
# and exit with instead (coi passes exit codes on, and scripts test for 127).
_START_ERRORS = {
    "command not found": (127, "command not found"),
    "command not executable": (126, "Permission denied"),
}


def exit_code(op: JSON, command: Sequence[str], on_stderr: OutputSink | None = None) -> int:
    """The exit code of a finished exec operation, failed or not.

    :raises OperationFailed: the exec failed without running anything (no exit code).
    """
    meta = op.get("metadata") or {}
    if op.get("status") == "Success":
        return int(meta.get("return", -1))
    err = str(op.get("err") or "")
    known = _START_ERRORS.get(err.strip().lower())
    if known is not None:
        code, text = known
        if on_stderr is not None:
            name = command[0] if command else ""
            on_stderr(f"{name}: {text}\n".encode())
        return int(meta.get("return", code)) if isinstance(meta.get("return"), int) else code
    raise OperationFailed(f"exec: {err or op.get('status') or 'failed'}")


def _pump_out(ws: ClientConnection, sink: OutputSink) -> None:
    from websockets.exceptions import ConnectionClosed

    try:
        for msg in ws:
            if msg == "":
                # An empty text message is the daemon's end-of-stream marker (it keeps the
                # socket open until we close it).
                return
            data = msg.encode() if isinstance(msg, str) else msg
            if data:
                sink(data)
    except ConnectionClosed:
        pass


def _feed_in(ws: ClientConnection, source: bytes | BinaryIO | Iterable[bytes] | None) -> None:
    from websockets.exceptions import ConnectionClosed

    try:
        if isinstance(source, bytes):
            for i in range(0, len(source), _CHUNK):
                ws.send(source[i : i + _CHUNK])
        elif source is not None and hasattr(source, "read"):
            while chunk := source.read(_CHUNK):
                ws.send(chunk)
        elif source is not None:
            for chunk in source:
                ws.send(chunk)
    except (ConnectionClosed, OSError):
        pass
    finally:
        # Closing the stdin websocket is how the daemon learns of EOF.
        with contextlib.suppress(Exception):
            ws.close()


class _Seen:
    """An output sink that remembers whether anything came through it."""

    def __init__(self, sink: OutputSink) -> None:
        self._sink = sink
        self.any = False

    def __call__(self, data: bytes) -> None:
        self.any = True
        self._sink(data)


def _retry_not_started(
    once: Callable[[], T],
    *,
    may_retry: Callable[[], bool],
    started: Callable[[], bool] | None = None,
) -> T:
    """Run `once`, starting it again when the daemon lost track of the child.

    Under load the daemon sometimes fails an exec with "Failed to retrieve PID of executing
    child process": its forkexec helper reports a failed attach, yet the attached child may
    be running the command (seen in CI: `coi run`'s gzip found the file of an earlier start
    of itself). A start is made again only when no output was seen and the input can be
    replayed (`may_retry`), and, for a request that must not run twice, when `started` says
    the first one never ran (its `once` wrapper claims a token first).

    :raises OperationFailed: the command may have run, and is not started again.
    """
    for attempt in range(_START_ATTEMPTS):
        try:
            return once()
        except OperationFailed as err:
            if _NOT_STARTED not in err.message:
                raise
            if attempt == _START_ATTEMPTS - 1 or not may_retry():
                raise _lost(err) from err
            if started is not None and started():
                raise _lost(err) from err
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def _lost(err: OperationFailed) -> OperationFailed:
    return OperationFailed(
        "exec: the daemon lost track of the command as it started it; it may have run, or "
        "still run, without its output reaching coi, and is not started again (that could "
        "repeat what it did)",
        details=err.message,
        resolution="Look at what it was to do, then run it again if that is safe; the "
        "daemon's log says more ('Failed to retrieve PID of executing child process').",
    )


# Seconds a websocket over TLS may take to open (TCP, TLS, the HTTP upgrade): a few round
# trips, milliseconds on a LAN. A stalled open costs this long, plus one second, then the exec
# starts again. Measured against Incus 6.0 over HTTPS (300 execs of `true`, busy 2-core
# host): 4 s cut 10 opens, 8 s cut 4, each exec then succeeded on its next start.
_OPEN_TIMEOUT = 8.0


class _OpenStalled(Exception):
    """A websocket over TLS did not open in time (see `_connect_tls`)."""


def _connect_tls(url: str, ctx: ssl.SSLContext) -> ClientConnection:
    """`websockets.sync.client.connect` over TLS, bounded.

    Seen against Incus 6.0 over HTTPS, about once in 50 execs: the opening handshake gets
    no answer, and websockets, giving up, then waits forever for its reader thread, which
    stays blocked in a TLS read. The connect runs in a thread here; past the deadline the
    TCP connection is shut down under it (through a duplicate of its descriptor), which
    ends that read, and `_OpenStalled` lets the caller start the exec again.
    """
    import socket
    from urllib.parse import urlsplit

    from websockets.sync.client import connect

    parts = urlsplit(url)
    raw = socket.create_connection((parts.hostname or "", parts.port or 443), _OPEN_TIMEOUT)
    spare = raw.dup()  # the same connection: shut down through it if the connect stalls
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["ws"] = connect(
                url, sock=raw, ssl=ctx, max_size=None, compression=None, ping_interval=None,
                open_timeout=_OPEN_TIMEOUT,
            )  # fmt: skip
        except BaseException as err:  # handed to the caller
            box["err"] = err

    worker = threading.Thread(target=run, name="ws-open", daemon=True)
    try:
        worker.start()
        worker.join(_OPEN_TIMEOUT + 1)
        if worker.is_alive():
            with contextlib.suppress(OSError):
                spare.shutdown(socket.SHUT_RDWR)
            worker.join(5)
            raise _OpenStalled(f"the websocket at {parts.netloc} did not open in time")
    finally:
        spare.close()
    if isinstance(box.get("err"), TimeoutError):  # no answer to the upgrade: the same
        raise _OpenStalled(f"the websocket at {parts.netloc} did not open in time")
    if "err" in box:
        raise box["err"]
    ws: ClientConnection = box["ws"]
    return ws


def _closed_before_start(err: BaseException, index: int, count: int) -> bool:
    """May an exec whose websocket number `index` (of `count`, in the order they are
    opened) failed to open with `err` be started again, its command surely not started?

    The daemon starts the command only once every websocket of the exec is connected.
    Seen against Incus 6.0 over HTTPS: the daemon closes a connection while it is being
    opened ("no close frame received or sent"). websockets raises `ConnectionClosed` from
    `connect` only when the connection was closed before its upgrade request was written:
    the daemon never had that socket, so the command cannot have started, whichever socket
    it was. `InvalidMessage` (the connection lost after the request, before a response)
    leaves open whether the daemon took the socket: safe only when a later one was never
    opened. Anything else (a refused upgrade, a certificate other than the pinned one) is
    an answer, not a lost connection: never retried.
    """
    from websockets.exceptions import ConnectionClosed, InvalidMessage

    if isinstance(err, ConnectionClosed):
        return True
    return isinstance(err, InvalidMessage) and index < count - 1


class ExecAPI:
    """`POST /1.0/instances/<name>/exec` in its streaming and interactive forms."""

    def __init__(self, client: IncusClient) -> None:
        self._c = client

    def _started(self, instance: str, req: ExecRequest) -> Callable[[], bool] | None:
        """For a `once` request: whether its command has started (its token is claimed)."""
        if not req.once:
            return None
        probe = ExecRequest(["sh", "-c", _ONCE_STARTED, req.token], user=0, group=0)
        return lambda: self.quiet(instance, probe) == 0

    def _connect_ws(self, op_id: str, secret: str) -> ClientConnection:
        from websockets.sync.client import unix_connect

        path = f"/1.0/operations/{op_id}/websocket?secret={quote(secret)}"
        if self._c.project != "default":
            path += f"&project={quote(self._c.project)}"
        ep = self._c.endpoint
        # max_size=None: output chunks are not bounded; compression off: it only costs CPU here.
        # ping_interval=None: the daemon never reads its output sockets, so it never answers a
        # keepalive ping there; with pings on, any exec longer than ~40 s lost its streams.
        if ep.socket_path:
            return unix_connect(
                ep.socket_path,
                f"ws://incus{path}",
                max_size=None,
                compression=None,
                ping_interval=None,
            )
        ctx = tls_context(ep)
        url = (ep.url or "").replace("https://", "wss://", 1) + path
        return _connect_tls(url, ctx)

    def start(
        self,
        instance: str,
        req: ExecRequest,
        *,
        interactive: bool = False,
        width: int = 80,
        height: int = 24,
        attempt: int = 0,
    ) -> ExecSession:
        """Start a command and connect its websockets (the daemon waits for them)."""
        op = self._c.request(
            "POST",
            f"/1.0/instances/{quote(instance, safe='')}/exec",
            json=req.body(interactive=interactive, width=width, height=height),
            wait=False,
        )
        fds: dict[str, str] = (op.get("metadata") or {}).get("fds") or {}
        if not fds:
            raise BackendError(f"exec in '{instance}': the daemon returned no websockets")
        sockets: dict[str, ClientConnection] = {}
        # Entered as context managers: websockets deprecates connections used outside `with`.
        stack = contextlib.ExitStack()
        # The control socket first: some daemon versions expect it before the data ones.
        order = ("control", *sorted(k for k in fds if k != "control"))
        try:
            for key in order:
                sockets[key] = stack.enter_context(self._connect_ws(str(op["id"]), fds[key]))
        except _OpenStalled as err:
            stack.close()
            if attempt + 1 >= _START_ATTEMPTS:
                raise BackendError(f"exec in '{instance}': {err}") from err
            # The command has not started: the daemon waits for every websocket first. The
            # abandoned operation ends on the daemon's own timeout.
            return self.start(
                instance, req, interactive=interactive, width=width, height=height,
                attempt=attempt + 1,
            )  # fmt: skip
        except Exception as err:
            stack.close()
            # The socket that failed is the one after those connected.
            failed = len(sockets)
            if attempt + 1 < _START_ATTEMPTS and _closed_before_start(err, failed, len(order)):
                # Closed under the open, before the command could start (see there).
                return self.start(
                    instance, req, interactive=interactive, width=width, height=height,
                    attempt=attempt + 1,
                )  # fmt: skip
            raise BackendError(f"exec in '{instance}': websocket connect failed: {err}") from err
        return ExecSession(self._c, op, sockets, stack, req.command)

    def run(
        self,
        instance: str,
        req: ExecRequest,
        *,
        stdin: bytes | BinaryIO | Iterable[bytes] | None = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        on_start: Callable[[ExecSession], None] | None = None,
    ) -> ExecResult:
        """Run a command to completion; stream output to the sinks or capture it.

        Output for which no sink is given is captured into the result.
        """
        out_buf: list[bytes] = []
        err_buf: list[bytes] = []
        seen = _Seen(on_stdout or out_buf.append), _Seen(on_stderr or err_buf.append)
        replayable = stdin is None or isinstance(stdin, bytes)
        code = _retry_not_started(
            lambda: self._run_once(instance, req, stdin, seen[0], seen[1], on_start),
            may_retry=lambda: replayable and not (seen[0].any or seen[1].any),
            started=self._started(instance, req),
        )
        return ExecResult(code, b"".join(out_buf), b"".join(err_buf))

    def _run_once(
        self,
        instance: str,
        req: ExecRequest,
        stdin: bytes | BinaryIO | Iterable[bytes] | None,
        on_stdout: OutputSink,
        on_stderr: OutputSink,
        on_start: Callable[[ExecSession], None] | None,
    ) -> int:
        sess = self.start(instance, req)
        if on_start is not None:
            on_start(sess)
        try:
            threads = [
                threading.Thread(
                    target=_pump_out, args=(sess.sockets["1"], on_stdout), daemon=True
                ),
                threading.Thread(
                    target=_pump_out, args=(sess.sockets["2"], on_stderr), daemon=True
                ),
                threading.Thread(target=_feed_in, args=(sess.sockets["0"], stdin), daemon=True),
            ]
            for t in threads:
                t.start()
            for t in threads[:2]:
                t.join()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): hang up without waiting for the command; the
            # caller is tearing the sandbox down.
            sess.close()
            raise
        return sess.wait(on_stderr)

    def capture(self, instance: str, req: ExecRequest, *, stdin: bytes | None = None) -> ExecResult:
        """Run a command and return its exit code and output."""
        return self.run(instance, req, stdin=stdin)

    def quiet(self, instance: str, req: ExecRequest) -> int:
        """Run a command whose output nobody wants: no websockets, one round trip."""
        body = req.body(interactive=False)
        body["wait-for-websocket"] = False
        op = _retry_not_started(
            lambda: self._post_and_wait(instance, body),
            may_retry=lambda: True,
            started=self._started(instance, req),
        )
        return exit_code(op, req.command)

    def _post_and_wait(self, instance: str, body: JSON) -> JSON:
        """Start a command with no websockets and wait for it; a failed start is returned."""
        url = f"/1.0/instances/{quote(instance, safe='')}/exec"
        op = self._c.request("POST", url, json=body, wait=False)
        done = finished_exec(self._c, str(op.get("id")))
        # A failure that is no exit code raises here, inside the retry: a lost child is
        # started again.
        exit_code(done, body.get("command") or ())
        return done

    def recorded(
        self,
        instance: str,
        req: ExecRequest,
        *,
        read_output: Callable[[int], bool] = lambda code: code != 0,
        tidy: bool = True,
    ) -> ExecResult:
        """Run a command with no websockets: the daemon writes its output to log files, which
        are read only when `read_output(exit code)` says so (by default: when it failed).

        Two requests instead of a websocket per stream and three threads, and no websockets
        import: for the short commands a session starts with. `tidy` removes the log files;
        without it they stay with the instance (fine for one that is about to go away).
        """
        body = req.body(interactive=False)
        body["wait-for-websocket"] = False
        body["record-output"] = True
        op = _retry_not_started(
            lambda: self._post_and_wait(instance, body),
            may_retry=lambda: True,
            started=self._started(instance, req),
        )
        meta = op.get("metadata") or {}
        shell_err: list[bytes] = []
        code = exit_code(op, req.command, shell_err.append)
        logs: dict[str, str] = meta.get("output") or {}
        out: dict[str, bytes] = {}
        try:
            if read_output(code):
                out = {fd: self._c.raw_request("GET", path).content for fd, path in logs.items()}
        finally:
            if tidy:
                for path in logs.values():
                    self._c.instances.delete_log(path)
        return ExecResult(code, out.get("1", b""), out.get("2", b"") + b"".join(shell_err))

    def interactive(
        self,
        instance: str,
        req: ExecRequest,
        *,
        stdin_fd: int | None = None,
        stdout: BinaryIO | None = None,
    ) -> int:
        """Run a command on a PTY wired to this terminal; forward resizes; return its code.

        The local terminal is put in raw mode, so Ctrl-C and friends reach the command.
        """
        fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
        out = stdout or sys.stdout.buffer

        def write_out(data: bytes) -> None:
            out.write(data)
            out.flush()

        seen = _Seen(write_out)
        return _retry_not_started(
            lambda: self._interactive_once(instance, req, fd, seen),
            may_retry=lambda: not seen.any,
            started=self._started(instance, req),
        )

    def _interactive_once(
        self, instance: str, req: ExecRequest, stdin_fd: int, sink: OutputSink
    ) -> int:
        size = shutil.get_terminal_size((80, 24))
        sess = self.start(instance, req, interactive=True, width=size.columns, height=size.lines)
        pty_ws = sess.sockets["0"]
        reader = threading.Thread(target=_pump_out, args=(pty_ws, sink), daemon=True)
        reader.start()
        with _raw_terminal(stdin_fd), _forward_winch(sess, stdin_fd):
            _pump_stdin(stdin_fd, pty_ws, reader)
        reader.join(timeout=2)
        return sess.wait(sink)


def _pump_stdin(fd: int, ws: ClientConnection, reader: threading.Thread) -> None:
    from websockets.exceptions import ConnectionClosed

    eof = False
    while reader.is_alive():
        if eof:
            reader.join(0.1)
            continue
        try:
            ready, _, _ = select.select([fd], [], [], 0.1)
        except (OSError, ValueError):
            eof = True
            continue
        if not ready:
            continue
        try:
            data = os.read(fd, _CHUNK)
        except OSError:
            data = b""
        if not data:
            eof = True
            continue
        try:
            ws.send(data)
        except ConnectionClosed:
            return


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Any:
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # keep what the user typed ahead
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _forward_winch(sess: ExecSession, fd: int) -> Any:
    if not os.isatty(fd) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_winch(_sig: int, _frame: object) -> None:
        cols, rows = os.get_terminal_size(fd)
        sess.resize(cols, rows)

    previous = signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
