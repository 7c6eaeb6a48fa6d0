"""What a session gets: the mode in force for its tool, and the broker started for it
(`session_broker`, the one entry point the session code calls)."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coi.config.paths import coi_home
from coi.credentials.providers import PROVIDERS, Provider
from coi.credentials.sources import Credential, find_credential, sources_described
from coi.errors import ConfigError
from coi.units import parse_duration

if TYPE_CHECKING:
    from coi.backend import IncusClient
    from coi.config.loader import Config
    from coi.credentials.broker import Limits, Route
    from coi.tools.base import Broker, Tool

# Where the broker listens inside the sandbox (its loopback; the proxy device's listener).
BROKER_PORT = 41240
DEVICE = "coi-broker"
# A unix socket's path must fit in sun_path (108 bytes with its NUL).
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Brokered:
    """One provider the session's broker serves."""

    broker: Broker
    provider: Provider
    credential: Credential


@dataclass(frozen=True)
class Plan:
    """What the session does with the tool's credentials (`plan`)."""

    mode: str  # in force: "broker", "copy" or "none"
    brokered: tuple[Brokered, ...] = ()
    # Of the tool's credential_files, those not to copy; host variables never to forward.
    withhold_files: tuple[str, ...] = ()
    withhold_env: tuple[str, ...] = ()
    # For the user at session start (stderr); a fallback to copying is said here.
    notices: tuple[str, ...] = ()
    # Why this mode, in a few words (copy: why not brokered).
    why: str = ""

    @property
    def summary(self) -> str:
        """One line for `coi info` and `coi health`: "broker (anthropic from $KEY)",
        "copy (why)", "none (why)"."""
        if self.mode == "broker":
            via = ", ".join(f"{b.provider.name} from {b.credential.source}" for b in self.brokered)
            return f"broker ({via})"
        return f"{self.mode} ({self.why})" if self.why else self.mode


@dataclass(frozen=True)
class BrokerHandle:
    """What the session code needs from the broker while the session runs."""

    mode: str  # "broker", "copy" or "none"
    # Set in the agent's environment, over everything else (base URLs and placeholders).
    env: dict[str, str] = field(default_factory=dict)
    # JSON laid over the tool's settings files, like Tool.sandbox_settings (merged after it).
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The proxy device (already on the container with attach=True); None: no broker.
    device: dict[str, str] | None = None
    device_name: str = DEVICE
    providers: tuple[str, ...] = ()
    withhold_files: tuple[str, ...] = ()
    withhold_env: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()
    socket: Path | None = None
    _attached: Callable[[float], None] | None = field(default=None, repr=False, compare=False)

    def wait_attached(self, timeout: float = 60.0) -> None:
        """With `background=True`: wait until the device is on the container (start the
        agent only after this).

        :raises BackendError: the device could not be added.
        """
        if self._attached is not None:
            self._attached(timeout)

    def credential_files(self, tool: Tool) -> tuple[str, ...]:
        """The tool's credential files to copy from the host home (the rest stay out)."""
        return tuple(f for f in tool.credential_files if f not in self.withhold_files)

    def forward_env(self, names: list[str]) -> list[str]:
        """Of the host variables the user asked to forward, those that may go in."""
        return [n for n in names if n not in self.withhold_env]


def _secret_env(tool: Tool) -> tuple[str, ...]:
    names: list[str] = []
    for b in tool.brokers:
        p = PROVIDERS.get(b.provider)
        if p is not None:
            names += [n for n in (*p.key_env, *p.oauth_env) if n not in names]
    return tuple(names)


def plan(
    tool: Tool,
    cfg: Config,
    *,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    local: bool = True,
    run_command: bool = True,
) -> Plan:
    """Decide the credentials mode for `tool` and find each brokered provider's credential.

    `[credentials] mode = "broker"` brokers every provider of the tool for which a credential
    is found on the host; it falls back to copying, with a notice, for a tool that declares
    no broker, with a remote daemon (the broker's socket is on this machine), or when no
    credential is found. `local`: the daemon runs on this machine. Without `run_command`
    a configured `key_command` is not run (for a summary: it may ask for a passphrase).

    :raises ConfigError: a provider the tool names is unknown, or a configured source of a
        credential is broken.
    """
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home()) if home is None else home
    mode = cfg.get_str("credentials.mode")
    secret_files = tuple(f for f in tool.secret_files if f in tool.credential_files)
    if mode == "none":
        # A tool that does not say which of its files are secret keeps all of them out.
        secret_files = secret_files if tool.secret_files else tool.credential_files
        note = "Credentials: none (mode = none): the tool's logins and keys stay on the host."
        return Plan(
            "none",
            withhold_files=secret_files,
            withhold_env=_secret_env(tool),
            notices=(note,),
            why='mode = "none"',
        )
    copying = (
        "its credential files are copied into the sandbox, where the agent can read them and "
        'send them anywhere it can reach ([credentials] mode = "none" keeps them out)'
    )
    if mode == "copy":
        return Plan("copy", notices=(f"Credentials: copy mode: {copying}.",), why='mode = "copy"')
    if not tool.brokers:
        note = f"Credentials: {tool.name} cannot be brokered: {copying}."
        return Plan("copy", notices=(note,), why=f"{tool.name} cannot be brokered")
    if not local:
        note = f"Credentials: the daemon is remote, so {tool.name} cannot be brokered: {copying}."
        return Plan("copy", notices=(note,), why="the daemon is remote")
    found: list[Brokered] = []
    missing: list[str] = []
    for b in tool.brokers:
        provider = PROVIDERS.get(b.provider)
        if provider is None:
            raise ConfigError(f"tool {tool.name}: unknown broker provider {b.provider!r}")
        cred = find_credential(provider, cfg.values, env, home, run_command=run_command)
        if cred is None:
            missing.append(f"{provider.name} (looked in {sources_described(provider)})")
        else:
            found.append(Brokered(b, provider, cred))
    if not found:
        note = f"Credentials: no credential to broker for {tool.name}: " + "; ".join(missing)
        why = "no credential found for " + ", ".join(b.provider for b in tool.brokers)
        return Plan("copy", notices=(note, f"Credentials: so {copying}."), why=why)
    via = ", ".join(f"{f.provider.name} from {f.credential.source}" for f in found)
    notes = [f"Credentials: brokered ({via}); the sandbox gets a placeholder, never the key."]
    if missing:
        notes.append("Credentials: not brokered, none found: " + "; ".join(missing))
    return Plan(
        "broker",
        brokered=tuple(found),
        withhold_files=secret_files,
        withhold_env=_secret_env(tool),
        notices=tuple(notes),
    )


def _fill(value: Any, url: str, token: str) -> Any:
    if isinstance(value, str):
        return value.replace("{url}", url).replace("{token}", token)
    if isinstance(value, dict):
        return {k: _fill(v, url, token) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, url, token) for v in value]
    return value


def _merge(into: dict[str, Any], overlay: Mapping[str, Any]) -> None:
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def tool_settings(
    brokered: tuple[Brokered, ...], tokens: Mapping[str, str], port: int
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The environment and settings overlays that point the tool at the broker."""
    env: dict[str, str] = {}
    settings: dict[str, dict[str, Any]] = {}
    for b in brokered:
        url = f"http://127.0.0.1:{port}/{b.provider.name}"
        token = tokens[b.provider.name]
        env.update(_fill(b.broker.env, url, token))
        for rel, overlay in b.broker.settings.items():
            _merge(settings.setdefault(rel, {}), _fill(overlay, url, token))
    return env, settings


def proxy_device(socket_path: Path, port: int = BROKER_PORT) -> dict[str, str]:
    """The Incus proxy device that gives the container (and only it) the broker: a listener
    on its own loopback, bound inside the container, connecting to the host socket. The
    forkproxy process drops to coi's uid and gid, so it reaches the 0600 socket as its owner."""
    return {
        "type": "proxy",
        "listen": f"tcp:127.0.0.1:{port}",
        "connect": f"unix:{socket_path}",
        "bind": "container",
        "security.uid": str(os.getuid()),
        "security.gid": str(os.getgid()),
    }


def _limit_values(cfg: Config) -> tuple[int, int, float]:
    """max_requests, max_request_bytes and max_duration (seconds) of `[credentials]`.

    :raises ConfigError: max_duration is not a duration.
    """
    text = cfg.get_str("credentials.max_duration").strip()
    try:
        duration = parse_duration(text) if text else 0.0
    except ValueError as err:
        raise ConfigError(
            f"[credentials] max_duration: not a duration: {text!r}",
            resolution="Use a duration such as 2h or 30m, or '' for none.",
        ) from err
    requests = max(0, cfg.get_int("credentials.max_requests"))
    return requests, max(0, cfg.get_int("credentials.max_request_bytes")), duration


def limits_from(cfg: Config) -> Any:
    """The per-session limits of `[credentials]`.

    :raises ConfigError: max_duration is not a duration.
    """
    from coi.credentials.broker import Limits

    requests, request_bytes, duration = _limit_values(cfg)
    return Limits(max_requests=requests, max_request_bytes=request_bytes, max_duration=duration)


@contextlib.contextmanager
def session_broker(
    client: IncusClient,
    container: str,
    tool: Tool,
    cfg: Config,
    *,
    attach: bool = True,
    background: bool = False,
    port: int = BROKER_PORT,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    service: bool = False,
    planned: Plan | None = None,
) -> Iterator[BrokerHandle]:
    """Start the credential broker of one session, for as long as the `with` block runs.

    In broker mode: finds the real credentials on the host, starts the broker (a thread of
    this process, serving a 0600 unix socket in coi's state dir), and with `attach` adds the
    proxy device to `container` (which must exist; running or not). Yields what the agent
    gets: the environment (base URLs, placeholders), settings overlays, the files not to
    copy. On exit the broker stops (requests in flight are cut, later ones fail) and the
    device is removed if the container is still there. Adding a proxy device takes the
    daemon about a second (it polls its forkproxy's log once a second): with `background`
    the device is added by a thread while the session sets up the rest, and
    `handle.wait_attached()` waits for it. In copy and none mode nothing starts;
    the handle says what to withhold. Nothing of a real credential is in the handle, the
    device or the container's config.

    `service`: the broker runs in a detached host process instead (`coi.credentials.service`,
    handed the routes over a pipe), for a session whose container outlives this process
    (`coi shell`: `--background`, detached, coi killed). On exit it is stopped, and the device
    removed, unless the agent was started (`wait_attached` returned) and the container still
    runs: then it serves on until the container is gone or stopped, or a later session
    replaces its device. `planned`: the `plan` already made for this tool (not made again:
    a `key_command` runs once).

    :raises ConfigError: a configured credential source is broken.
    :raises SessionError: the broker could not start.
    :raises BackendError: the device could not be added.
    """
    from coi.errors import BackendError, SessionError

    env = os.environ if env is None else env
    p = planned or plan(tool, cfg, env=env, home=home, local=client.endpoint.is_local)
    if p.mode != "broker":
        yield BrokerHandle(
            mode=p.mode,
            withhold_files=p.withhold_files,
            withhold_env=p.withhold_env,
            notices=p.notices,
        )
        return
    from coi.credentials import sockets

    limit_values = _limit_values(cfg)  # a bad one is said before anything is made
    # What killed brokers left (kill -9 cannot remove a socket): gone before a new one binds.
    sockets.remove_stale(coi_home(env))
    path = sockets.folder(coi_home(env)) / f"{container}-{secrets.token_hex(3)}.sock"
    if len(str(path)) > MAX_SOCKET_PATH:
        raise SessionError(
            f"the broker's socket path is too long for a unix socket: {path}",
            resolution="Set COI_HOME to a shorter folder.",
        )
    device = proxy_device(path, port)
    adder = _Attach(client, container, device) if attach else None
    runner: _Runner | None = None
    started = False

    def attached(timeout: float) -> None:
        nonlocal started
        assert runner is not None
        runner.ready(timeout)
        if adder is not None:
            adder.wait(timeout)
        started = True

    try:
        # The device first: the daemon takes a second to add it (its poll), and everything
        # below (importing the broker, spawning its process) is done within that second
        # instead of before it. The forkproxy dials the socket per connection, so it may
        # come up before the broker listens; the agent starts after `wait_attached`.
        if adder is not None:
            adder.start(background)
        from coi.credentials.broker import Limits, Route

        upstreams = dict(cfg.get_table("credentials.upstream"))
        token_urls = dict(cfg.get_table("credentials.token_url"))
        tokens = {b.provider.name: secrets.token_urlsafe(32) for b in p.brokered}
        routes = {
            b.provider.name: Route(
                provider=b.provider,
                token=tokens[b.provider.name],
                credential=b.credential,
                upstream=(upstreams.get(b.provider.name) or b.provider.upstream).rstrip("/"),
                token_url=token_urls.get(b.provider.name)
                or (b.provider.oauth_file.token_url if b.provider.oauth_file else ""),
            )
            for b in p.brokered
        }
        requests, request_bytes, duration = limit_values
        limits = Limits(
            max_requests=requests, max_request_bytes=request_bytes, max_duration=duration
        )
        ca_bundle = cfg.get_str("credentials.ca_bundle")
        runner = (
            _ServiceRunner(client, container, routes, limits, path, coi_home(env), ca_bundle)
            if service
            else _ThreadRunner(container, routes, limits, path, coi_home(env), ca_bundle)
        )
        env_out, settings = tool_settings(p.brokered, tokens, port)
        yield BrokerHandle(
            mode="broker",
            env=env_out,
            settings=settings,
            device=device,
            providers=tuple(routes),
            withhold_files=p.withhold_files,
            withhold_env=p.withhold_env,
            notices=p.notices,
            socket=path,
            _attached=attached,
        )
    finally:
        if adder is not None:
            with contextlib.suppress(Exception):
                adder.wait(60.0)  # not added behind the removal's back
        if not (service and started and _runs(client, container)):
            if runner is not None:
                runner.stop()
            with contextlib.suppress(BackendError):  # not a later session's
                client.instances.remove_device(container, DEVICE, expect=device)


def _runs(client: IncusClient, container: str) -> bool:
    """The container runs (or the daemon cannot say: the service decides for itself)."""
    from coi.errors import BackendError, NotFound

    try:
        return client.instances.get(container).active
    except NotFound:
        return False
    except BackendError:
        return True


class _Runner:
    """Where the broker runs: a thread of this process, or a detached service."""

    def ready(self, timeout: float) -> None:
        """Wait until it serves. :raises SessionError: it did not start."""

    def stop(self) -> None:
        """Stop it; its socket is gone afterwards."""


class _ThreadRunner(_Runner):
    def __init__(
        self,
        container: str,
        routes: dict[str, Route],
        limits: Limits,
        path: Path,
        home: Path,
        ca_bundle: str,
    ) -> None:
        from coi.audit.log import AuditLog
        from coi.credentials.broker import Broker
        from coi.credentials.server import BrokerServer

        broker = Broker(container, routes, limits=limits, audit=AuditLog(container, home))
        self.server = BrokerServer(broker, path, ca_bundle=ca_bundle)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class _ServiceRunner(_Runner):
    def __init__(
        self,
        client: IncusClient,
        container: str,
        routes: dict[str, Route],
        limits: Limits,
        path: Path,
        home: Path,
        ca_bundle: str,
    ) -> None:
        from coi.credentials import service
        from coi.errors import SessionError

        if len(str(path)) > MAX_SOCKET_PATH:  # said here, not by a service that ends at once
            raise SessionError(
                f"the broker's socket path is too long for a unix socket: {path}",
                resolution="Set COI_HOME to a shorter folder.",
            )
        data = service.payload(routes, limits, socket=path, home=home, ca_bundle=ca_bundle)
        socket_path = client.endpoint.socket_path
        assert socket_path is not None  # only a local daemon gets a broker (`plan`)
        self.service = service.spawn(
            container, data, daemon_socket=socket_path, project=client.project
        )

    def ready(self, timeout: float) -> None:
        self.service.ready(timeout)

    def stop(self) -> None:
        self.service.stop()


class _Attach:
    """Adds the proxy device, now or in a thread of its own."""

    def __init__(self, client: IncusClient, container: str, device: dict[str, str]) -> None:
        self.client, self.container, self.device = client, container, device
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _add(self) -> None:
        try:
            self.client.instances.add_device(self.container, DEVICE, self.device)
        except BaseException as err:  # handed to wait()
            self.error = err

    def start(self, background: bool) -> None:
        if not background:
            self.client.instances.add_device(self.container, DEVICE, self.device)
            return
        self.thread = threading.Thread(target=self._add, name="coi-broker-attach", daemon=True)
        self.thread.start()

    def wait(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                from coi.errors import BackendError

                raise BackendError(f"adding the broker's device to {self.container} took too long")
        if self.error is not None:
            raise self.error
