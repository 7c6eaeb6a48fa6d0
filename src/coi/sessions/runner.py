"""Running sessions: `coi run` (one command) and `coi shell` (an agent in tmux)."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from coi import checkpoint
from coi.backend.client import IncusClient
from coi.backend.models import ExecResult, Instance
from coi.config.loader import Config
from coi.config.paths import coi_home
from coi.errors import BackendError, CoiError, DaemonLost, SessionError
from coi.limits.spec import check_server
from coi.network.manager import allowlist_refresh
from coi.network.policy import Policy
from coi.protection.guard import Guard, settle_when_gone, watching
from coi.sessions import home, naming, reap
from coi.sessions.keeper import dismiss as dismiss_keeper
from coi.sessions.keeper import spawn as spawn_keeper
from coi.sessions.placement import check_target
from coi.sessions.remote import adapt as adapt_to_remote
from coi.sessions.remote import bring_back
from coi.sessions.sandbox import Log, Sandbox, SandboxSpec, stderr_log
from coi.sessions.store import Metadata, SessionStore, new_session_id, now_rfc3339
from coi.tools.base import Tool
from coi.tools.settings import deep_merge, merge_settings_text

if TYPE_CHECKING:
    from coi.credentials import BrokerHandle, Plan
    from coi.monitor.monitor import Monitor, Settings


@contextmanager
def monitoring(
    client: IncusClient,
    name: str,
    settings: Settings | None,
    alert: Log,
) -> Iterator[Monitor | None]:
    """The security monitor around a block; its code is loaded only when it is enabled."""
    if settings is None or not settings.enabled:
        yield None
        return
    from coi.monitor.monitor import monitoring as run_monitor

    with run_monitor(client, name, settings, alert) as mon:
        yield mon


class Terminated(BaseException):
    """coi got SIGTERM or SIGHUP: unwind so cleanup runs, then exit 128+signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception so `finally` blocks (cleanup) still run."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def terminal_alert(text: str) -> None:
    """An alert box on the user's terminal (which may be in raw mode under tmux)."""
    sys.stderr.write("\r\n" + text.replace("\n", "\r\n") + "\r\n")
    sys.stderr.flush()


@contextmanager
def guarded(
    client: IncusClient,
    name: str,
    *,
    policy: Policy | None = None,
    guard: Guard | None = None,
    verify_interval: float = 0,
    monitor: Settings | None = None,
    log: Log,
    protect_log: Log | None = None,
    alert: Log = terminal_alert,
    service: bool = False,
    remote: str | None = None,
) -> Iterator[Monitor | None]:
    """What watches a live sandbox while coi is with it: the allowlist's refresh, the checks
    of the protected paths and the security monitor (each only where configured). The one
    composition `coi run`, `coi shell`, `coi attach` and the SDK all use.

    `service`: the sandbox outlives this coi (a shell): a detached monitor service stands by
    and watches whenever this coi does not (see `coi.monitor.service`).
    """
    if service and monitor is not None and monitor.enabled:
        with _handover(client, name, monitor, remote), guarded(
            client, name, policy=policy, guard=guard, verify_interval=verify_interval,
            monitor=monitor, log=log, protect_log=protect_log, alert=alert,
        ) as mon:  # fmt: skip
            yield mon
        return
    with allowlist_refresh(
        client, policy, cache_dir=coi_home() / "network-cache",
        lock_dir=coi_home() / "locks", log=log,
    ), watching(guard, verify_interval, protect_log or log), monitoring(
        client, name, monitor, alert
    ) as mon:  # fmt: skip
        yield mon


@contextmanager
def _handover(
    client: IncusClient, name: str, settings: Settings, remote: str | None
) -> Iterator[None]:
    """The container's monitor service on standby, and its lock held while this coi's own
    monitor runs."""
    from coi.monitor import service

    service.spawn(settings, name, project=client.project, remote=remote)
    with service.watching_here(name):
        yield


def guarded_box(
    box: Sandbox, *, protect_log: Log | None = None, service: bool = False
) -> AbstractContextManager[Monitor | None]:
    """`guarded` for a sandbox this process made or reused."""
    return guarded(
        box.client,
        box.name,
        policy=box.spec.policy,
        guard=box.guard,
        verify_interval=box.spec.verify_interval,
        monitor=box.monitor,
        log=box.log,
        protect_log=protect_log,
        service=service,
        remote=box.spec.remote,
    )


@dataclass
class Live:
    """A sandbox that is up, with its watchers running (see `open_sandbox`)."""

    box: Sandbox
    monitor: Monitor | None

    @property
    def killed(self) -> bool:
        """The security monitor killed the container."""
        return self.monitor is not None and self.monitor.responder.killed


@contextmanager
def open_sandbox(
    client: IncusClient, spec: SandboxSpec, *, slot: int | None = None, log: Log
) -> Iterator[Live]:
    """A sandbox for as long as the block runs: made (or this slot's persistent one reused),
    watched, then removed, or stopped and kept when persistent. A keeper process stops and
    removes it should this process die first (`coi.sessions.keeper`)."""
    check_server(spec.limits, client.server.kind)
    spec = adapt_to_remote(client, spec, log)
    check_target(client, spec.target)
    reap.after_restart(client, remote=spec.remote)
    box = Sandbox(client, spec, log=log)
    box.check_owner()
    keeper = None
    try:
        box.begin()
        box.ensure_image()
        box.choose_slot(slot)
        checkpoint.step("slot-claimed")
        # Before the sandbox exists: a coi killed from here on leaves nothing running.
        keeper = spawn_keeper(
            box.name, project=spec.project, remote=spec.remote, claim=box.claim_path
        )
        checkpoint.step("keeper-started")
        log(f"Launching container {box.name} from image {spec.image}...")
        box.create_or_reuse()
        checkpoint.step("container-made")
        with guarded_box(box) as mon:
            box.up()
            yield Live(box, mon)
    finally:
        checkpoint.step("cleaning-up")
        try:
            finish_run(box, log)
        except BackendError as err:
            # The daemon cannot be asked to remove it: the keeper, left running, ends the
            # sandbox as soon as the daemon answers again.
            raise lost_daemon(client, err, box.name) from err
        if box.monitor is not None and box.monitor.enabled:
            # The monitor's network table was kept until the sandbox went (Monitor.stop).
            from coi.monitor.netguard import tidy

            tidy(wait=2.0)
        dismiss_keeper(keeper)


def lost_daemon(client: IncusClient, err: BackendError, name: str) -> BackendError:
    """`err` as it should be told: DaemonLost when the daemon no longer answers, or is
    another process than the one the session started with (it restarted)."""
    if isinstance(err, DaemonLost):
        return err
    now = client.now_serving()
    if now is not None and now.pid == client.server.pid:
        return err  # the same daemon, answering: the error is what it said
    what = "stopped answering" if now is None else "restarted"
    return DaemonLost(
        f"the container daemon {what} during the session ({err.message})",
        details=f"sandbox: {name or '(not made yet)'}",
        resolution="Once the daemon answers again ('coi setup' starts it; 'coi health'), "
        "coi's keeper stops and removes a 'coi run' sandbox; 'coi list' shows what is left.",
    )


# -- coi run ------------------------------------------------------------------------------


@dataclass
class RunRequest:
    """`coi run -- CMD`."""

    command: list[str]
    slot: int | None = None
    capture: str | None = None  # None, "json" or "raw"


def run_command(client: IncusClient, spec: SandboxSpec, req: RunRequest) -> int:
    """Run one command in a fresh sandbox; stream its output; return its exit code."""
    log = stderr_log("")
    code = 1
    if not req.capture:
        # The streamed exec's websockets library (15-20 ms to import) loads while this thread
        # waits on the daemon to make and start the sandbox, not after.
        preload("websockets.sync.client")
    with cleanup_on_signals():
        try:
            with open_sandbox(client, spec, slot=req.slot, log=log) as live:
                log("Executing: " + " ".join(req.command))
                try:
                    code = _execute(client, live.box, req, log)
                except BackendError as err:
                    # The monitor's kill can end the command's exec with a daemon error
                    # instead of an exit code (seen: "Failed to retrieve PID of executing
                    # child process"): the monitor's verdict stands all the same.
                    if not live.killed:
                        raise lost_daemon(client, err, live.box.name) from err
            if live.killed:
                log("\nThe security monitor killed the container (see the alert above)")
                code = 137
            live.box.record("exit", f"command exited with code {code}", code=code)
        except KeyboardInterrupt:
            log("\nReceived interrupt signal, cleaning up...")
            code = 130
        except Terminated as t:
            log("\nReceived termination signal, cleaning up...")
            code = 128 + t.signum
    return code


def preload(module: str) -> None:
    """Import `module` in a background thread, started just before the main thread waits on
    the daemon (a blocked socket read releases the GIL, so the import runs in that wait). A
    later import of the same module waits for this one to finish (the import lock); it is
    never done twice."""

    def load() -> None:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # imported again where it is needed, which says why it fails

    threading.Thread(target=load, name=f"preload {module}", daemon=True).start()


def _execute(client: IncusClient, box: Sandbox, req: RunRequest, log: Log) -> int:
    exec_req = box.request(req.command, {}, once=True)
    if req.capture:
        res = client.exec.capture(box.name, exec_req)
        code = _time_limited(box, res.exit_code, log)
        print_capture(req.capture, res.stdout, res.stderr, code)
    else:
        res = client.exec.run(
            box.name,
            exec_req,
            on_stdout=stream_writer(sys.stdout),
            on_stderr=stream_writer(sys.stderr),
            on_start=lambda _session: checkpoint.step("command-running"),
        )
        code = _time_limited(box, res.exit_code, log)
        log(
            "\nCommand completed successfully"
            if code == 0
            else f"\nCommand exited with code {code}"
        )
    return code


def _time_limited(box: Sandbox, code: int, log: Log) -> int:
    """124 (as timeout(1) does) when the command ended because max_duration stopped it."""
    if box.out_of_time():
        log(f"\n[limits] Stopped: max_duration {box.spec.limits.duration_text} reached")
        return 124
    return code


def finish_run(box: Sandbox, log: Log) -> None:
    """Remove a run's sandbox (or stop and keep it, when persistent); release its slot."""
    spec = box.spec
    with no_interrupts():
        if box.name:
            end = "stopped and kept" if spec.persistent else "removed"
            if spec.persistent:
                log(f"Stopping persistent container {box.name}...")
                box.stop()
                box.settle_protection(removed=False)
            elif not bring_back(box.client, box.name, spec, log):
                end = "kept: the agent's work could not be fetched"
                log(
                    f"Kept container {box.name} (the agent's work is in it): "
                    f"'coi review fetch {spec.review}', then 'coi shutdown {box.name}'"
                )
            else:
                log(f"Cleaning up container {box.name}...")
                # The daemon removes the sandbox without coi waiting for it; the last check
                # of the protected paths runs once nothing inside is alive any more.
                op = box.discard()
                if op and box.guard is not None:
                    settle_when_gone(box.name, op, project=spec.project, remote=spec.remote)
                else:
                    box.settle_protection(removed=True)
            box.record("end", end)
        box.replenish()
        box.release()
    review_hint(spec, log)


def review_hint(spec: SandboxSpec, log: Log) -> None:
    """In review mode, what to do with the agent's copy now."""
    if spec.review:
        log(
            f"Review {spec.review}: 'coi diff {spec.review}' shows the changes, "
            f"'coi apply {spec.review}' brings them in, 'coi discard {spec.review}' drops them"
        )


@contextmanager
def no_interrupts() -> Iterator[None]:
    """Ctrl-C is ignored while the block runs (cleanup: a second one cannot leave a
    container behind). Only in the main thread, where signals are handled at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def stream_writer(stream: TextIO) -> Callable[[bytes], None]:
    """A sink that writes raw output to `stream` as it comes."""
    buf = stream.buffer

    def write(data: bytes) -> None:
        buf.write(data)
        buf.flush()

    return write


def print_capture(fmt: str, out: bytes, err: bytes, code: int) -> None:
    """`--capture` output: one JSON object, or stdout and stderr verbatim (raw)."""
    if fmt == "json":
        sys.stdout.write(
            json.dumps(
                {
                    "stdout": out.decode(errors="replace"),
                    "stderr": err.decode(errors="replace"),
                    "exit_code": code,
                }
            )
            + "\n"
        )
    else:
        sys.stdout.buffer.write(out)
        sys.stderr.buffer.write(err)
    sys.stdout.flush()


# -- coi shell ----------------------------------------------------------------------------


@dataclass
class ShellRequest:
    """`coi shell`."""

    tool: Tool
    slot: int | None = None
    resume: str | None = None
    container: str | None = None
    background: bool = False
    tmux: bool = True
    debug: bool = False
    bypass: bool = True
    binary: str | None = None
    persistent_explicit: bool = False


class ShellSession:
    """One `coi shell`: set up, run the tool in tmux, save the conversation, clean up."""

    def __init__(
        self, client: IncusClient, cfg: Config, spec: SandboxSpec, req: ShellRequest
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.spec = spec
        self.req = req
        self.log = stderr_log("[setup] ")
        self.store = SessionStore(coi_home(), req.tool.name)
        self.box = Sandbox(client, spec, log=self.log)
        self.session_id = new_session_id()
        self.resumed: Metadata | None = None
        self._left_running = False  # a background session's tmux was started by this coi
        self._given: dict[str, home.HomeFile] = {}  # what coi wrote into the agent's home
        self._host_files: dict[str, home.HomeFile] = {}
        self._overlays: dict[str, dict[str, Any]] = {}
        # The credentials: what mode applies, and the broker once the container runs; the
        # broker's `with` is left after the cleanup (`_leave`).
        self._credentials_plan: Plan | None = None
        self.broker: BrokerHandle | None = None
        self._leave = ExitStack()
        self._agent_runs = False  # a reused container's tmux session runs the agent already
        # Ends the sandbox should this coi die while nothing in it is meant to outlive coi:
        # while it is made (before tmux runs) and while it is saved and removed.
        self._keeper: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        ws = str(self.spec.workspace)
        if self.req.resume:
            self.resumed = self.store.resolve_resume(self.req.resume, ws)
            self.session_id = self.resumed.session_id
            word = "Auto-detected" if self.req.resume == "auto" else "Resuming"
            sys.stderr.write(f"{word} session: {self.session_id}\n")
            floor = self.cfg.floors.get("defaults.persistent")
            if not self.req.persistent_explicit and self.resumed.persistent and floor:
                # A built-in profile (hardened) keeps the sandbox ephemeral: not inherited.
                sys.stderr.write(f"Not inheriting persistent mode: the {floor[1]} keeps it off\n")
            elif not self.req.persistent_explicit and self.resumed.persistent:
                self.spec = replace(self.spec, persistent=True)
                self.box = Sandbox(self.client, self.spec, log=self.log)
                sys.stderr.write("Inherited persistent mode from session\n")
        sys.stderr.write(f"Setting up session {self.session_id}...\n")
        check_server(self.spec.limits, self.client.server.kind)
        remote_spec = adapt_to_remote(self.client, self.spec, self.log)
        if remote_spec is not self.spec:
            self.spec = remote_spec
            self.box = Sandbox(self.client, self.spec, log=self.log)
        check_target(self.client, self.spec.target)
        reap.after_restart(self.client, remote=self.spec.remote)
        self._plan_credentials()
        with cleanup_on_signals():
            try:
                self._setup()
                self._banner()
                with guarded_box(self.box, protect_log=stderr_log("[protect] "), service=True):
                    return self._run_tool()
            except KeyboardInterrupt:
                sys.stderr.write("\nReceived interrupt signal, cleaning up...\n")
                return 0
            except Terminated:
                sys.stderr.write("\nReceived termination signal, cleaning up...\n")
                return 0
            finally:
                try:
                    self._cleanup()
                finally:
                    with no_interrupts():
                        self._leave.close()  # the broker: stopped, or left serving

    # -- setup ----------------------------------------------------------------------------

    def _setup(self) -> None:
        if self.req.container:
            self.box.use_container(self.req.container)
            if not self.box.running():
                self.client.instances.start(self.box.name)
            self._start_broker()
        else:
            self.box.begin()
            self.box.ensure_image()
            self.box.choose_slot(self.req.slot)
            self.log(f"Container name: {self.box.name}")
            if not self.spec.persistent:
                # A persistent sandbox may be one a session runs in already: never ended.
                self._keeper = self._spawn_keeper()
            self.box.create_or_reuse(then=self._start_broker)
        checkpoint.step("shell-made")
        self._save_metadata()
        tool = self.req.tool
        if tool.state_dir and self.resumed:
            saved = self.store.state_path(self.session_id, tool.state_dir)
            if saved.is_dir() and self.box.created:
                self.log(f"Restoring session data from {self.session_id}")
                self._push_dir(saved, f"{self.spec.home}/{tool.state_dir}")
        self._plan_home()
        self.log("Container setup complete!")

    def _push_dir(self, local: Path, remote: str) -> None:
        uid = self.spec.code_uid
        parent = os.path.dirname(remote)
        if parent != self.spec.home:
            self.client.files.mkdir(self.box.name, parent, uid=uid, gid=uid, parents=True)
        self.client.files.push_tree(self.box.name, local, remote, uid=uid, gid=uid)

    # -- credentials ----------------------------------------------------------------------

    def _plan_credentials(self) -> None:
        """Which credentials mode applies (said now, before anything is made; a broken
        configured source is an error here), and the host variables it keeps out of the
        sandbox: a key in `tool.forward_env` is not forwarded when the broker holds it."""
        from coi.credentials import plan

        p = plan(self.req.tool, self.cfg, local=self.client.endpoint.is_local)
        self._credentials_plan = p
        for line in p.notices:
            self.log(line)
        kept = [n for n in self.spec.host_env if n in p.withhold_env]
        if kept:
            self.log(f"Credentials: not forwarded, kept on the host: {', '.join(kept)}")
            env = {k: v for k, v in self.spec.env.items() if k not in kept}
            host_env = tuple(n for n in self.spec.host_env if n not in kept)
            self.spec = replace(self.spec, env=env, host_env=host_env)
            self.box = Sandbox(self.client, self.spec, log=self.log)
        for name in (n for n in p.withhold_env if n in self.spec.env):
            self.log(
                f"Warning: {name} is given to the sandbox explicitly (-e or [defaults] "
                "environment): the agent can read it and send it anywhere it can reach"
            )

    def _start_broker(self) -> None:
        """The session's credential broker, started as soon as the container runs: its
        device takes the daemon a second, added while the rest is set up. It runs in a host
        process of its own that serves the container as long as it runs (the session
        outlives coi: `--background`, detached, coi killed). None when the agent of a reused
        container runs already: it keeps the broker it was started with."""
        from coi.credentials import BrokerHandle, session_broker

        p = self._credentials_plan
        assert p is not None
        self._agent_runs = (
            self.req.tmux
            and not self.box.created
            and self._tmux(["has-session", "-t", naming.tmux_session(self.box.name)]).exit_code == 0
        )
        if self._agent_runs:
            self.log(
                "Credentials: the agent in this container runs already (its tmux session): "
                "it keeps the credentials it was started with"
            )
            self.broker = BrokerHandle(
                mode=p.mode, withhold_files=p.withhold_files, withhold_env=p.withhold_env
            )
            return
        self.broker = self._leave.enter_context(
            session_broker(
                self.client,
                self.box.name,
                self.req.tool,
                self.cfg,
                background=True,
                service=True,
                planned=p,
            )
        )

    def _broker_ready(self) -> None:
        """Just before the agent starts: the broker serves and its device is on."""
        if self.broker is not None:
            self.broker.wait_attached()

    def _plan_home(self) -> None:
        """What goes into the agent's home: the tool's own config files from the host home
        (never the environment; its secret ones not when the broker holds the credential),
        and coi's settings, to be laid over the tool's settings files (merged, never
        overwritten), the broker's (its base URLs) last. Written with the command that
        starts tmux."""
        tool = self.req.tool
        broker = self.broker
        files = broker.credential_files(tool) if broker is not None else tool.credential_files
        if self._agent_runs and broker is not None and broker.mode == "broker":
            # The running agent's settings files point at its own broker: merged in place,
            # not replaced by the host's copy.
            theirs = {rel for b in tool.brokers for rel in b.settings}
            files = tuple(f for f in files if f not in theirs)
        self._host_files = {}
        for rel in files:
            src = Path.home() / rel
            if src.is_file():
                self._host_files[rel] = home.HomeFile(rel, src.read_bytes())
        if self.cfg.get_bool("tool.sandbox_context"):
            self._give_context()
        prefix = f"tool.{tool.name}."
        options = {k[len(prefix) :]: v for k, v in self.cfg.values.items() if k.startswith(prefix)}
        self._overlays = tool.sandbox_settings(bypass=self.req.bypass, options=options)
        for rel, overlay in (broker.settings if broker is not None else {}).items():
            self._overlays[rel] = deep_merge(self._overlays.get(rel, {}), overlay)

    def _give_context(self) -> None:
        """The sandbox context: ~/SANDBOX_CONTEXT.md, and after the user's own instructions
        in the tool's instructions file (coi.sessions.context)."""
        from coi.sessions.context import FILE, sandbox_context, with_context

        tool = self.req.tool
        mode = self.broker.mode if self.broker is not None else "none"
        published = [(p.host, p.container, p.count) for p in self.box.published]
        text = sandbox_context(self.spec, credentials=mode, published=published)
        self._host_files[FILE] = home.HomeFile(FILE, text.encode())
        if tool.context_file:
            own = self._host_files.get(tool.context_file)
            data = with_context(own.data if own else None, text)
            self._host_files[tool.context_file] = home.HomeFile(tool.context_file, data)

    @property
    def _theirs(self) -> list[str]:
        """Settings files with no copy from the host: the merge goes over the container's own."""
        return [rel for rel in self._overlays if rel not in self._host_files]

    def _home_files(
        self, inside: Mapping[str, bytes | home.Unreadable | None], warnings: list[str]
    ) -> dict[str, home.HomeFile]:
        """The files for the agent's home, given the container's own settings files; what is
        left as it is, and why, goes to `warnings`."""
        files = dict(self._host_files)
        for rel, overlay in self._overlays.items():
            dest = f"{self.spec.home}/{rel}"
            existing = files[rel].data if rel in files else inside.get(rel)
            if isinstance(existing, home.Unreadable):
                warnings.append(f"{dest} cannot be read as {self.spec.code_user}; left as it is")
                continue
            merged = merge_settings_text(rel, existing, overlay)
            if merged is None:
                kind = "a TOML document coi can edit" if rel.endswith(".toml") else "a JSON object"
                warnings.append(f"{dest} is not {kind}; left as it is")
                continue
            files[rel] = home.HomeFile(rel, merged)
        return files

    def _lay_home(self) -> None:
        """Read the container's own settings files, merge, write: one command each way."""
        warnings: list[str] = []
        self._given = self._home_files(home.read(self.client, self.box, self._theirs), warnings)
        home.write(self.client, self.box, list(self._given.values()))
        self._warn(warnings)

    def _warn(self, warnings: list[str]) -> None:
        for w in warnings:
            self.log(f"Warning: {w}")

    def _save_metadata(self) -> None:
        self.store.write_metadata(
            Metadata(
                session_id=self.session_id,
                container_name=self.box.name,
                persistent=self.spec.persistent,
                workspace=str(self.spec.workspace),
                saved_at=now_rfc3339(),
                tool=self.req.tool.name,
            )
        )

    def _on_exit(self) -> str:
        """What leaving the session does to the container (the banner and the fallback
        shell say it)."""
        if self.spec.persistent or self.req.container:
            return "the container is kept (persistent): 'coi shell' again, or 'coi shutdown'"
        detach = "; detach (Ctrl-b d) to keep it running" if self.req.tmux else ""
        return (
            "the container is removed (ephemeral; the conversation is saved for "
            f"'coi shell --resume'){detach}"
        )

    def _fallback_note(self) -> str:
        return (
            f"\n[coi] {self.req.tool.name} exited. This shell is still in the sandbox; "
            f"'exit' ends the session: {self._on_exit()}."
        )

    def _banner(self) -> None:
        mode = (
            "Direct (no tmux)"
            if not self.req.tmux
            else "Background (tmux)"
            if self.req.background
            else "Interactive (tmux)"
        )
        lines = [
            "",
            "Starting session...",
            f"Session ID: {self.session_id}",
            f"Container: {self.box.name}",
            f"Workspace: {self.spec.workspace}",
            f"Mode: {mode}",
            f"On exit: {self._on_exit()}",
        ]
        if self.resumed:
            lines.append(
                "Resume mode: Persistent session"
                if self.spec.persistent and not self.box.created
                else "Resume mode: Restored conversation"
            )
        sys.stderr.write("\n".join(lines) + "\n\n")
        sys.stderr.flush()

    # -- the tool -------------------------------------------------------------------------

    def tool_command(self) -> list[str]:
        if self.req.debug:
            return ["bash"]
        tool = self.req.tool
        resume_id = None
        if self.resumed and tool.state_dir:
            resume_id = tool.discover_resume_id(
                self.store.state_path(self.session_id, tool.state_dir)
            )
        return tool.command(
            session_id=self.session_id,
            resume=self.resumed is not None,
            bypass=self.req.bypass,
            binary=self.req.binary,
            resume_id=resume_id,
        )

    def _env(self) -> dict[str, str]:
        """The tool's environment; the broker's (base URLs, placeholders) over it."""
        target = self.spec.workspace_target
        # A tool's paths under /workspace follow the workspace where it is mounted elsewhere
        # ([workspace] mount_path = "same").
        tool_env = {
            k: target + v.removeprefix("/workspace") if v.split("/")[:2] == ["", "workspace"] else v
            for k, v in self.req.tool.env.items()
        }
        return {**tool_env, **(self.broker.env if self.broker is not None else {})}

    def _run_tool(self) -> int:
        name = self.box.name
        cmd = self.tool_command()
        if not self.req.tmux:
            self._lay_home()
            self._broker_ready()
            self.box.up()
            return self.client.exec.interactive(name, self.box.request(cmd, self._env(), once=True))
        session = naming.tmux_session(name)
        # Asked when the container came up (`_start_broker`); one made just now runs no tmux.
        if not self._agent_runs:
            # Exported in the pane too: a tmux server that already runs (a reused persistent
            # container) would otherwise hand the tool its own, older environment.
            pane_env = {**self.spec.env, **self._env()}
            exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in pane_env.items())
            # When the tool exits, the pane falls back to a shell (upstream's behaviour),
            # which says what its `exit` will do; with --debug the shell *is* the command, so
            # one `exit` ends the session.
            note = shlex.quote(self._fallback_note())
            fallback = "" if self.req.debug else f"; printf '%s\\n' {note}; exec bash"
            script = f"trap : INT; {exports}{shlex.join(cmd)}{fallback}"
            self._broker_ready()
            self._new_tmux_session(session, script)
            # tmux runs: the session is meant to outlive this coi from here on.
            dismiss_keeper(self._keeper)
            self._keeper = None
        else:
            self._lay_home()
            if self.req.background:
                self._tmux(["send-keys", "-t", session, shlex.join(cmd), "Enter"], once=True)
                sys.stderr.write(f"Sent command to existing tmux session: {session}\n")
        if self.req.background:
            self._left_running = True
            if self.box.monitor is not None and self.box.monitor.enabled:
                sys.stderr.write(
                    "The security monitor keeps watching this session from the host "
                    "(its audit log: 'coi monitor " + name + "')\n"
                )
            if self.broker is not None and self.broker.mode == "broker" and not self._agent_runs:
                sys.stderr.write(
                    "The credential broker keeps serving this session from the host until "
                    "its container stops\n"
                )
            sys.stderr.write(
                f"Created background tmux session: {session}\n"
                f"Use 'coi tmux capture {name}' to view output\n"
                f"Use 'coi tmux send {name} \"<command>\"' to send commands\n"
            )
            return 0
        self.box.up()
        self.client.exec.interactive(
            name, self.box.request(["tmux", "attach", "-t", session], self._env())
        )
        return 0

    def _tmux(self, args: list[str], *, once: bool = False) -> ExecResult:
        """tmux in the sandbox (no websockets); its output is read only when it failed, and
        not for `has-session`, whose failure is an answer (no such session)."""
        return self._recorded(["tmux", *args], {}, quiet=args[0] == "has-session", once=once)

    def _recorded(
        self, argv: list[str], env: Mapping[str, str], *, quiet: bool = False, once: bool = False
    ) -> ExecResult:
        return self.client.exec.recorded(
            self.box.name,
            self.box.request(argv, {**self._env(), **env}, once=once),
            read_output=lambda code: code != 0 and not quiet,
            tidy=self.box.lasting,
        )

    def _new_tmux_session(self, session: str, script: str) -> None:
        """Start tmux, the files for the agent's home written by the same command.

        That command assumes the container has none of the settings files coi merges into
        (true of a fresh sandbox from any image coi builds) and stops before writing if one
        is there; then they are read and merged first (`_lay_home`) and tmux started alone.
        """
        size = ["-x", "200", "-y", "50"]
        target = self.spec.workspace_target
        args = ["new-session", "-d", "-s", session, "-c", target, *size, "bash", "-c", script]
        warnings: list[str] = []
        files = list(self._home_files({}, warnings).values())
        res: ExecResult | None = None
        if home.inlinable(files):
            argv, env = home.command(self.box, files, absent=self._theirs, then=["tmux", *args])
            res = self._recorded(argv, env)
            if res.exit_code == home.WRITE_FAILED:
                raise home.failed(self.box, files, res.stderr)
            if res.exit_code == home.PRESENT:
                res = None
            else:
                self._given = {f.rel: f for f in files}
                self._warn(warnings)
        if res is None:
            self._lay_home()
            res = self._tmux(args)
        # Under load LXD can lose an exec whose command ran and ended at once, as `tmux
        # new-session -d` does, and the backend starts it again: in a container made a
        # moment ago, the session that is already there is the one the first start made.
        duplicate = self.box.created and b"duplicate session" in res.stderr
        if res.exit_code != 0 and not duplicate:
            raise SessionError(
                "could not start tmux in the container: "
                + res.stderr.decode(errors="replace").strip()
            )

    # -- cleanup --------------------------------------------------------------------------

    def _cleanup(self) -> None:
        with no_interrupts():
            sys.stderr.write("\nCleaning up session...\n")
            log = self.box.teed(stderr_log("[cleanup] "))
            if self.box.name:
                if self.box.out_of_time():
                    log(f"Session stopped: max_duration {self.spec.limits.duration_text} reached")
                # Looked up once: the state, the container's fate and the last check of the
                # protected paths all go by it.
                inst = self.box.instance()
                ending = self._ending(inst, log)
                if ending and inst is not None and inst.running:
                    # Killed from here on, this coi leaves the keeper to save and remove.
                    dismiss_keeper(self._keeper)
                    self._keeper = self._spawn_keeper(save=True)
                checkpoint.step("shell-cleaning")
                if inst is not None:
                    self._save_state(log)
                self._save_metadata()
                if ending and inst is not None:
                    # A remote review: the agent's work comes back before the sandbox goes.
                    ending = bring_back(self.client, self.box.name, self.spec, log)
                gone = self._finish_container(inst, log, remove=ending)
                self.box.settle_protection(removed=gone)
            self.box.replenish()
            self.box.release()
            dismiss_keeper(self._keeper)
            self._keeper = None
            review_hint(self.spec, log)

    def _spawn_keeper(self, *, save: bool = False) -> subprocess.Popen[bytes]:
        tool = self.req.tool
        what = None
        if save and tool.state_dir:
            what = (
                f"{self.spec.home}/{tool.state_dir}",
                self.store.dir(self.session_id) / tool.state_dir,
            )
        return spawn_keeper(
            self.box.name,
            project=self.spec.project,
            remote=self.spec.remote,
            claim=self.box.claim_path,
            save=what,
        )

    def _save_state(self, log: Log) -> None:
        tool = self.req.tool
        if not tool.state_dir:
            return
        remote = f"{self.spec.home}/{tool.state_dir}"
        target_parent = self.store.dir(self.session_id)
        target_parent.mkdir(parents=True, exist_ok=True)
        # Made beside the destination (same filesystem) so the final swap is a rename.
        tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=target_parent))
        try:
            if not self._given_state(tmp / "state"):
                if self.client.files.stat(self.box.name, remote) is None:
                    return
                for line in self.client.files.pull_tree(
                    self.box.name, remote, tmp / "state"
                ).warnings():
                    log(f"Warning: {line}")
            log(f"Saving session data to {target_parent}")
            checkpoint.step("shell-saving")  # pulled, not yet swapped in
            for line in self.store.replace_state(self.session_id, tool.state_dir, tmp / "state"):
                log(f"Warning: {line}")
            log("Session data saved successfully")
        except (CoiError, OSError) as err:
            log(f"Warning: could not save session data: {err}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _given_state(self, dest: Path) -> bool:
        """A background session in a sandbox made just now: its state is what coi gave it a
        moment ago (the restored conversation, credentials and settings): made in `dest`
        from that instead of read back, and True; False for any other session. Reading it
        back would be the session's only use of the daemon's file API, whose first request
        on a container costs the daemon a helper process (see `coi.sessions.home`)."""
        tool = self.req.tool
        given = home.under(self._given, tool.state_dir)
        if not (self._left_running and self.box.created and given):
            return False
        if self.resumed:
            saved = self.store.state_path(self.session_id, tool.state_dir)
            if saved.is_dir():
                shutil.copytree(saved, dest, symlinks=True)
        for rel, data in given.items():
            _write_within(dest, rel, data)
        return True

    def _ending(self, inst: Instance | None, log: Log) -> bool:
        """Is the session over, its container to be removed (not kept, no tmux in it)?"""
        name = self.box.name
        if inst is None or self.spec.persistent or self.req.container:
            return False
        try:
            # Started in the background a moment ago: its tmux runs (the pane falls back to a
            # shell when the tool exits), no exec needed to know.
            tmux_alive = inst.running and (
                self._left_running
                or self._tmux(["has-session", "-t", naming.tmux_session(name)]).exit_code == 0
            )
        except BackendError as err:
            # No exec possible (e.g. its process limit is exhausted): the session is over.
            log(f"Container does not answer ({err}); removing it")
            tmux_alive = False
        return not tmux_alive

    def _finish_container(self, inst: Instance | None, log: Log, *, remove: bool) -> bool:
        """Keep or remove the container; whether it is gone."""
        if inst is None:
            log("Container was already removed")
            self.box.record("end", "the container was gone")
            return True
        if not remove:
            if inst.running:
                sys.stderr.write(_KEPT_HINT)
                self.box.record("detach", "coi left; the container runs on")
            else:
                log("Container was stopped but kept for reuse")
                self.box.record("end", "stopped and kept")
            return False
        log("Container was stopped, removing..." if not inst.running else "Removing container...")
        self.box.remove()
        log("Container removed (session data saved for --resume)")
        self.box.record("end", "removed")
        return True


def _write_within(root: Path, rel: str, data: bytes) -> None:
    """Write `root/rel` (mode 0600) in a tree that came out of a sandbox: a symbolic link the
    agent left in it, at that path or above it, is replaced, never followed, so the write
    stays inside `root` (coi may run as root on the host)."""
    root.mkdir(mode=0o700, exist_ok=True)
    path = root
    for part in Path(rel).parent.parts:
        path = path / part
        if path.is_symlink():
            path.unlink()
        path.mkdir(mode=0o700, exist_ok=True)
    path = root / rel
    tmp = path.with_name(path.name + ".coi-part")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)  # a link standing at `path` is replaced, not written through


_KEPT_HINT = (
    "Container kept running - use 'coi attach' to reconnect, 'coi shutdown' to stop, "
    "or 'coi kill' to force stop\n"
)
