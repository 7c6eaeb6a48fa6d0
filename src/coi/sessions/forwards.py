"""Published ports and forwarded host sockets: what a session asks for, per slot, as the
daemon's proxy devices, and the host-side checks made before the sandbox starts.

A published port is a listener on the host (`bind = "host"`: the daemon's forkproxy listens
in the host's network namespace and connects to the port on the container's own loopback),
so the agent's server answers at `127.0.0.1:HOST` and nowhere else unless the user's own
config says `bind = "0.0.0.0"`. A forwarded socket is the reverse: a listener inside the
container (owned by the agent user, mode 0600) whose connections reach a host unix socket
as the user who ran coi (the forkproxy drops to that uid and gid), so a socket that user
cannot open stays closed to the agent too.

Slots: config ports (`ports.pool`, `ports.map`) are the same for every session of a
workspace, so slot N publishes each host port shifted by (N-1) x W, W being the width of the
configured host ports (highest - lowest + 1): the blocks of two slots never overlap.
`--port HOST:CONTAINER` is this session's own word and is published exactly as given.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import socket
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coi.config.loader import Config
from coi.errors import ConfigError, SessionError, UsageError

# One device publishes every port of a session: each proxy device costs the daemon about a
# second at start (it polls the forkproxy's log once a second), whatever it listens on.
PORTS_DEVICE = "coi-ports"
SOCKET_PREFIX = "coi-sock-"
SSH_AGENT_DEVICE = "coi-ssh-agent"
# Where the forwarded SSH agent listens inside; SSH_AUTH_SOCK points there.
SSH_AGENT_PATH = "/tmp/coi-ssh-agent.sock"
LOOPBACK = "127.0.0.1"
MAX_PORT = 65535
GRACE = 3.0  # seconds a port still held is asked again (see `check_free`)
# Daemon API extensions each kind of forward needs (checked, never the daemon's name).
PORT_EXTENSIONS = ("proxy", "proxy_tcp_udp_multi_port_handling")
SOCKET_EXTENSIONS = ("proxy", "proxy_unix", "proxy_unix_dac_properties")


@dataclass(frozen=True, order=True)
class Published:
    """`count` consecutive host ports from `host` on `bind`, to the container's loopback
    ports from `container`."""

    host: int
    container: int
    count: int = 1
    bind: str = LOOPBACK

    @property
    def host_end(self) -> int:
        return self.host + self.count - 1

    @property
    def container_end(self) -> int:
        return self.container + self.count - 1

    @property
    def host_span(self) -> str:
        return _span(self.host, self.host_end)

    @property
    def container_span(self) -> str:
        return _span(self.container, self.container_end)

    def text(self) -> str:
        """`127.0.0.1:3100->3000/tcp`, or with ranges `127.0.0.1:3100-3199->3000-3099/tcp`."""
        return f"{self.bind}:{self.host_span}->{self.container_span}/tcp"

    def as_json(self) -> dict[str, Any]:
        return {
            "bind": self.bind,
            "host": self.host,
            "container": self.container,
            "count": self.count,
        }

    def shifted(self, by: int) -> Published:
        return Published(self.host + by, self.container, self.count, self.bind)


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def ports_device(published: Iterable[Published]) -> dict[str, str]:
    """The one proxy device publishing all of `published` (one bind address): the daemon
    maps the n-th listen port to the n-th connect port."""
    items = sorted(published)
    return {
        "type": "proxy",
        "listen": f"tcp:{items[0].bind}:" + ",".join(p.host_span for p in items),
        "connect": f"tcp:{LOOPBACK}:" + ",".join(p.container_span for p in items),
        "bind": "host",
    }


_ENDPOINT = re.compile(r"tcp:([0-9.]+):([0-9,-]+)")


def _ports(spans: str) -> list[int]:
    out: list[int] = []
    for part in spans.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def published_of(devices: Mapping[str, Mapping[str, str]]) -> tuple[Published, ...]:
    """The ports a container publishes, read back from coi's proxy device, in host-port
    order and in runs of consecutive ports: what `coi list` and `coi info` show."""
    dev = devices.get(PORTS_DEVICE) or {}
    listen = _ENDPOINT.fullmatch(dev.get("listen", ""))
    connect = _ENDPOINT.fullmatch(dev.get("connect", ""))
    if dev.get("type") != "proxy" or not listen or not connect:
        return ()
    hosts, inside = _ports(listen.group(2)), _ports(connect.group(2))
    if len(inside) == 1:
        inside *= len(hosts)
    out: list[Published] = []
    for h, c in sorted(zip(hosts, inside, strict=False)):
        last = out[-1] if out else None
        if last and h == last.host_end + 1 and c == last.container_end + 1:
            out[-1] = Published(last.host, last.container, last.count + 1, last.bind)
        else:
            out.append(Published(h, c, 1, listen.group(1)))
    return tuple(out)


# -- what the config and flags ask for --------------------------------------------------


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be a port number, got {value!r}")
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_PORT:
        raise ValueError(f"{what} must be a port number from 1 to {MAX_PORT}, got {value!r}")
    return int(text)


def parse_pool(text: str) -> Published | None:
    """`3000-3099` (or `3000`): ports published as themselves. None for ''.

    :raises ValueError: not a port or a range of ports.
    """
    text = text.strip()
    if not text:
        return None
    lo_text, sep, hi_text = text.partition("-")
    lo = _port(lo_text, "the first port")
    hi = _port(hi_text, "the last port") if sep else lo
    if hi < lo:
        raise ValueError(f"the range runs backwards: {text}")
    return Published(lo, lo, hi - lo + 1)


def parse_flag(text: str) -> Published:
    """`--port HOST:CONTAINER` (or `--port PORT`, the same on both sides).

    :raises UsageError: malformed.
    """
    host_text, sep, container_text = text.partition(":")
    try:
        host = _port(host_text, "the host port")
        container = _port(container_text, "the container port") if sep else host
    except ValueError as err:
        raise UsageError(
            f"--port {text}: {err}", resolution="Give --port HOST:CONTAINER, e.g. --port 8080:80."
        ) from err
    return Published(host, container)


@dataclass(frozen=True)
class PortRequest:
    """The ports a session asks for, before its slot is known."""

    configured: tuple[Published, ...] = ()  # shifted per slot
    exact: tuple[Published, ...] = ()  # --port: as given

    def __bool__(self) -> bool:
        return bool(self.configured or self.exact)

    @property
    def width(self) -> int:
        """How far one slot's configured host ports are from the next slot's."""
        if not self.configured:
            return 0
        return max(p.host_end for p in self.configured) - min(p.host for p in self.configured) + 1

    def for_slot(self, slot: int) -> tuple[Published, ...]:
        """What slot `slot` publishes (slot 1 as configured).

        :raises SessionError: a shifted port would be past 65535, or two overlap.
        """
        shift = (max(slot, 1) - 1) * self.width
        out = [p.shifted(shift) for p in self.configured]
        if out and max(p.host_end for p in out) > MAX_PORT:
            top = max(p.host_end for p in out)
            raise SessionError(
                f"slot {slot} would publish host port {top}, past {MAX_PORT}",
                details=f"slot N publishes the configured ports shifted by (N-1) x {self.width}",
                resolution="Use a lower slot, or a smaller [ports] pool.",
            )
        out += self.exact
        _no_overlap(out, lambda a, b: SessionError(f"--port {b.text()} overlaps {a.text()}"))
        return tuple(sorted(out))


def _no_overlap(items: Iterable[Published], error: Any) -> None:
    seen = sorted(items, key=lambda p: p.host)
    for a, b in itertools.pairwise(seen):
        if b.host <= a.host_end:
            raise error(a, b)


def port_request(cfg: Config, flags: Iterable[str] = ()) -> PortRequest:
    """The ports `[ports]` and `--port` ask for.

    :raises ConfigError: a malformed pool or map entry (naming where it was set).
    :raises UsageError: a malformed --port.
    """
    bind = cfg.get_str("ports.bind")
    configured: list[Published] = []
    try:
        pool = parse_pool(cfg.get_str("ports.pool"))
    except ValueError as err:
        raise ConfigError(
            f"ports.pool: {err}",
            details=f"set in {cfg.origins.get('ports.pool')}",
            resolution='Give a port or a range, e.g. pool = "3000-3099".',
        ) from err
    if pool is not None:
        configured.append(Published(pool.host, pool.container, pool.count, bind))
    for entry in cfg.get("ports.map"):
        try:
            host = _port(entry.get("host"), "host")
            container = _port(entry.get("container"), "container")
        except ValueError as err:
            raise ConfigError(
                f"[[ports.map]] {entry}: {err}",
                details=f"set in {cfg.origins.get('ports.map')}",
                resolution="Each entry is host = PORT, container = PORT, e.g. host = 8080, "
                "container = 80.",
            ) from err
        configured.append(Published(host, container, 1, bind))
    _no_overlap(
        configured,
        lambda a, b: ConfigError(
            f"[ports] publishes host port {b.host} twice ({a.text()} and {b.text()})",
            resolution="Give each host port once across ports.pool and [[ports.map]].",
        ),
    )
    exact = [replace_bind(parse_flag(f), bind) for f in flags]
    _no_overlap(exact, lambda a, b: UsageError(f"--port {b.text()} overlaps --port {a.text()}"))
    return PortRequest(tuple(configured), tuple(exact))


def replace_bind(p: Published, bind: str) -> Published:
    return Published(p.host, p.container, p.count, bind)


def check_free(published: Iterable[Published], *, skip: Iterable[Published] = ()) -> None:
    """Every host port asked for can be listened on now: refused before the sandbox starts
    (the daemon would otherwise fail its start with an address in use). `skip`: ports a
    reused sandbox publishes already (its own listeners hold them).

    :raises SessionError: a port is taken, or below 1024 for a user who may not bind it.
    """
    held = {(q.bind, port) for q in skip for port in range(q.host, q.host_end + 1)}
    # The daemon's listener for a sandbox removed a moment ago (`coi shutdown`, then a new
    # session on its ports) may outlive the removal: the daemon itself holds the socket
    # until it closes it (seen held by incusd for well over a second after the delete
    # returned, most often gone at once). A port still held is asked again for a while.
    deadline = time.monotonic() + GRACE
    for p in published:
        for port in range(p.host, p.host_end + 1):
            if (p.bind, port) in held:
                continue
            problem = _bind_problem(p.bind, port)
            while problem == errno.EADDRINUSE and time.monotonic() < deadline:
                time.sleep(0.05)
                problem = _bind_problem(p.bind, port)
            if problem == errno.EADDRINUSE:
                raise SessionError(
                    f"port {port} is already in use on the host ({p.bind}:{port}), so it cannot "
                    f"be published ({p.text()})",
                    details="nothing was started",
                    resolution=f"Stop what listens there ('ss -ltnp sport = :{port}' shows it; "
                    "'coi list' shows the ports of coi's sandboxes), or publish another port: "
                    "--slot N shifts [ports] by slot, --port HOST:CONTAINER chooses one. A "
                    "sandbox removed a moment ago may hold it a little longer (the daemon "
                    "closes its listener late): then try again shortly.",
                )
            if problem == errno.EACCES:
                raise SessionError(
                    f"port {port} is below 1024: only root may listen on it on the host",
                    resolution="Publish a port from 1024 up, e.g. --port 8080:80.",
                )


def _bind_problem(addr: str, port: int) -> int:
    """The errno a listener on addr:port would meet now (0: none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As a server restarting would: a port in TIME_WAIT is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as err:
            return err.errno or errno.EADDRINUSE
    return 0


# -- sockets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SocketForward:
    """A host unix socket, reachable inside at `container` (owned by the agent user)."""

    host: str
    container: str
    device_name: str

    def device(self, agent_uid: int, host_uid: int, host_gid: int) -> dict[str, str]:
        return {
            "type": "proxy",
            "listen": f"unix:{self.container}",
            "connect": f"unix:{self.host}",
            "bind": "container",
            # The listener inside: the agent's, and only the agent's.
            "uid": str(agent_uid),
            "gid": str(agent_uid),
            "mode": "0600",
            # The connection on the host: made as the user who ran coi, never as the
            # daemon's root, so no socket that user could not open is reachable.
            "security.uid": str(host_uid),
            "security.gid": str(host_gid),
        }


def sockets_of(devices: Mapping[str, Mapping[str, str]]) -> tuple[tuple[str, str], ...]:
    """(host, container) paths of the sockets a container has forwarded (coi's devices)."""
    out = []
    for name, dev in sorted(devices.items()):
        if name.startswith(SOCKET_PREFIX) or name == SSH_AGENT_DEVICE:
            out.append((dev.get("connect", "").removeprefix("unix:"),
                        dev.get("listen", "").removeprefix("unix:")))  # fmt: skip
    return tuple(out)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def socket_forwards(
    cfg: Config, environ: Mapping[str, str]
) -> tuple[tuple[SocketForward, ...], tuple[str, ...]]:
    """The sockets `[[sockets]]` and `[ssh] forward_agent` forward, and notes for the user.

    :raises ConfigError: an entry is malformed or its host socket is not there.
    """
    out: list[SocketForward] = []
    notes: list[str] = []
    where = f"set in {cfg.origins.get('sockets')}"
    for i, entry in enumerate(cfg.get("sockets")):
        host, container = entry.get("host"), entry.get("container")
        if not isinstance(host, str) or not isinstance(container, str):
            raise ConfigError(f"[[sockets]] {entry}: host and container must be paths",
                              details=where)  # fmt: skip
        host = os.path.expanduser(host)
        if not os.path.isabs(host) or not container.startswith("/"):
            raise ConfigError(
                f"[[sockets]] {entry}: host and container must be absolute paths", details=where
            )
        if not _is_socket(host):
            raise ConfigError(
                f"[[sockets]] host socket {host} is not there (or not a unix socket)",
                details=where,
                resolution="Start the service that makes it, or remove the entry.",
            )
        out.append(SocketForward(host, container, f"{SOCKET_PREFIX}{i}"))
    if cfg.get_bool("ssh.forward_agent"):
        agent = environ.get("SSH_AUTH_SOCK", "")
        if agent and _is_socket(agent):
            out.append(SocketForward(agent, SSH_AGENT_PATH, SSH_AGENT_DEVICE))
            notes.append(
                "SSH agent forwarded: the sandbox can ask it to sign (not read the keys) "
                "while the session lives"
            )
        else:
            notes.append(
                "ssh.forward_agent is on but SSH_AUTH_SOCK names no socket: no agent forwarded"
            )
    paths = [s.container for s in out]
    if len(set(paths)) != len(paths):
        raise ConfigError("[[sockets]] two entries use the same container path", details=where)
    return tuple(out), tuple(notes)


def ssh_env(forwards: Iterable[SocketForward]) -> dict[str, str]:
    """SSH_AUTH_SOCK for the agent when the SSH agent is forwarded."""
    if any(f.device_name == SSH_AGENT_DEVICE for f in forwards):
        return {"SSH_AUTH_SOCK": SSH_AGENT_PATH}
    return {}


# -- on the daemon --------------------------------------------------------------------------


def forward_devices(
    ports: Iterable[Published],
    sockets: Iterable[SocketForward],
    *,
    agent_uid: int,
) -> dict[str, dict[str, str]]:
    """The proxy devices of a session's ports and sockets, by device name."""
    ports = tuple(ports)
    devices = {PORTS_DEVICE: ports_device(ports)} if ports else {}
    for s in sockets:
        devices[s.device_name] = s.device(agent_uid, os.getuid(), os.getgid())
    return devices


def is_forward(device: str) -> bool:
    """One of coi's port or socket devices."""
    return device in (PORTS_DEVICE, SSH_AGENT_DEVICE) or device.startswith(SOCKET_PREFIX)


def missing_extensions(has: Any, *, ports: bool, sockets: bool) -> list[str]:
    """The API extensions the daemon lacks for what is asked (`has`: extension -> bool)."""
    wanted = (PORT_EXTENSIONS if ports else ()) + (SOCKET_EXTENSIONS if sockets else ())
    return sorted({e for e in wanted if not has(e)})
