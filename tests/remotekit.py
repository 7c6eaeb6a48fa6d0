"""A second Incus daemon for the remote tests, reachable only over HTTPS.

The daemon runs on this host, but in a network namespace and a mount namespace of its own,
so that it shares nothing with the main daemon that other people's tests use:

- its own directory (INCUS_DIR under /tmp), unix socket, storage pool (dir driver in that
  directory) and database;
- its own /run/incus (a private tmpfs: the main daemon keeps its seccomp socket and the
  instances' runtime folders there, at a fixed path);
- its own network stack: bridges, dnsmasq and nftables tables live in the namespace (the
  main daemon's `inet incus` table and coibr0 are never seen), so the second daemon's bridge
  may be called coibr0 too and coi's defaults work on it unchanged;
- a veth pair whose host side has an address of a /30 the test checks is free, taken from
  198.18.0.0/15 (benchmarking addresses: no real host has one, so a packet that strays after
  the namespace is gone reaches no one), and nothing else: no default route in the
  namespace, so its containers reach no one but the daemon's host.

coi on the host reaches it only at https://ADDRESS:8443. The namespace is made before the
daemon starts and removed (with every file) at the end; each wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from coi.backend import IncusClient
from coi.backend.connection import Endpoint, pem_fingerprint
from coi.network.hostnet import host_networks

INCUSD = "/usr/libexec/incus/incusd"
PORT = 8443
# Benchmarking addresses (RFC 2544, never a real host): the veth to the daemon's namespace.
SPACE = ipaddress.ip_network("198.18.0.0/15")
# The second daemon's bridge, inside its namespace (never on the host).
BRIDGE_SUBNET = "10.199.53.1/24"
PROJECT_CONFIG = {"features.images": "true", "features.profiles": "true"}

# Started inside the new mount namespace (and the daemon's network namespace): /sys is
# mounted afresh so that it shows the namespace's interfaces (Incus reads bridges there),
# with the host's cgroup tree bound back under it; /run/incus becomes a private tmpfs.
_LAUNCH = r"""
set -e
d="$1"
mount --make-rprivate /
mkdir -p "$d/cgroup"
mount --rbind /sys/fs/cgroup "$d/cgroup"
mount -t sysfs sysfs /sys
mount --rbind "$d/cgroup" /sys/fs/cgroup
mkdir -p /run/incus
mount -t tmpfs -o mode=0711 tmpfs /run/incus
export INCUS_DIR="$d/var"
# No fetch of instance types from the public image server (and nothing sent anywhere).
export INCUS_SKIP_INSTANCE_TYPES=1
exec "$2" --group incus-admin --logfile "$d/incusd.log"
"""


@dataclass
class RemoteDaemon:
    """A running second daemon: its HTTPS address, its directory, its namespace."""

    root: Path
    ns: str
    veth: str
    host_addr: str
    daemon_addr: str
    proc: subprocess.Popen[bytes] | None = None
    tokens: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://{self.daemon_addr}:{PORT}"

    @property
    def socket(self) -> str:
        return str(self.root / "var" / "unix.socket")

    @property
    def server_cert(self) -> Path:
        return self.root / "var" / "server.crt"

    def admin(self, project: str = "default") -> IncusClient:
        """A client on the daemon's own unix socket (the test's side door, never coi's)."""
        return IncusClient(Endpoint(socket_path=self.socket), project=project, timeout=60)

    def trust_token(self, name: str) -> str:
        """A one-use trust token for a client called `name` (`incus config trust add`)."""
        with self.admin() as c:
            op = c.request(
                "POST",
                "/1.0/certificates",
                json={"name": name, "type": "client", "token": True},
                wait=False,
            )
        meta = op.get("metadata") or {}
        token = base64.b64encode(
            json.dumps(
                {
                    "client_name": name,
                    "fingerprint": meta["fingerprint"],
                    "addresses": [f"{self.daemon_addr}:{PORT}"],
                    "secret": meta["secret"],
                    "expires_at": meta.get("expires_at") or "0001-01-01T00:00:00Z",
                },
                separators=(",", ":"),
            ).encode()
        ).decode()
        self.tokens.append(token)
        return token

    def fingerprint(self) -> str:
        """The SHA-256 of the certificate the daemon presents now."""
        return pem_fingerprint(self.server_cert.read_text())

    def trusted_names(self) -> list[str]:
        with self.admin() as c:
            return [str(x.get("name")) for x in c.get("/1.0/certificates", recursion=1)]

    def log_tail(self, lines: int = 30) -> str:
        log = self.root / "incusd.log"
        return (
            "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""
        )


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def free_net(prefixlen: int = 30) -> ipaddress.IPv4Network:
    """A network of 198.18.0.0/15 (a /30 by default) that nothing on this machine uses."""
    used = host_networks()
    size = 2 ** (32 - prefixlen)
    for _ in range(64):
        second, third = 18 + secrets.randbelow(2), secrets.randbelow(256)
        fourth = secrets.randbelow(256 // size) * size
        net = ipaddress.ip_network(f"198.{second}.{third}.{fourth}/{prefixlen}")
        if net.subnet_of(SPACE) and not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /{prefixlen} in 198.18.0.0/15 for a test daemon")


def _make_namespace(rd: RemoteDaemon) -> None:
    peer = "rp" + rd.veth[2:]
    _run("ip", "netns", "add", rd.ns)
    _run("ip", "link", "add", rd.veth, "type", "veth", "peer", "name", peer)
    _run("ip", "link", "set", peer, "netns", rd.ns)
    _run("ip", "addr", "add", f"{rd.host_addr}/30", "dev", rd.veth)
    _run("ip", "link", "set", rd.veth, "up")
    _run("ip", "-n", rd.ns, "addr", "add", f"{rd.daemon_addr}/30", "dev", peer)
    _run("ip", "-n", rd.ns, "link", "set", peer, "up")
    _run("ip", "-n", rd.ns, "link", "set", "lo", "up")
    check_route(rd)


def wait_socket(rd: RemoteDaemon, timeout: float = 60) -> None:
    """Bounded: the daemon answers on its unix socket (else its log's tail is raised)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if rd.proc is not None and rd.proc.poll() is not None:
            raise RuntimeError(f"the second incusd exited ({rd.proc.returncode}):\n{rd.log_tail()}")
        if os.path.exists(rd.socket):
            with contextlib.suppress(Exception), rd.admin() as c:
                if c.answers(timeout=2):
                    return
        time.sleep(0.2)
    raise RuntimeError(f"the second incusd did not answer in {timeout}s:\n{rd.log_tail()}")


_MAIN_DAEMON_VARS = ("INCUS_SOCKET", "INCUS_DIR", "LXD_SOCKET", "LXD_DIR", "INCUS_CONF")


def launch(rd: RemoteDaemon) -> None:
    """Start incusd for `rd` in a new mount namespace inside `rd.ns`; wait till it answers."""
    with open(rd.root / "launch.err", "ab") as err:
        rd.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--",
             "nsenter", f"--net=/run/netns/{rd.ns}", "--",
             "sh", "-c", _LAUNCH, "launch", str(rd.root), INCUSD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            # Not the main daemon's socket: with INCUS_SOCKET pointing at it (scripts/test.sh
            # sets it), the second incusd finds it live and exits "Incus is already running".
            env={k: v for k, v in os.environ.items() if k not in _MAIN_DAEMON_VARS},
        )  # fmt: skip
    wait_socket(rd)


def shutdown(rd: RemoteDaemon) -> None:
    """incusd's own shutdown (SIGPWR): it stops its containers, then exits; bounded."""
    if rd.proc is None or rd.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(rd.proc.pid, signal.SIGPWR)
    try:
        rd.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rd.proc.pid, signal.SIGKILL)
        rd.proc.wait(timeout=10)


def _initialize(rd: RemoteDaemon) -> None:
    with rd.admin() as c:
        c.request("PATCH", "/1.0", json={"config": {"core.https_address": f":{PORT}"}})
        c.request(
            "POST",
            "/1.0/storage-pools",
            json={"name": "coi", "driver": "dir", "config": {"source": str(rd.root / "pool")}},
        )
        c.request(
            "POST",
            "/1.0/networks",
            json={
                "name": "coibr0",
                "type": "bridge",
                "config": {
                    "ipv4.address": BRIDGE_SUBNET,
                    "ipv4.nat": "false",
                    "ipv6.address": "none",
                },
            },
        )


def start(base: Path | None = None) -> RemoteDaemon:
    """Start a second daemon; stop() it (the fixture does) whatever happens next."""
    if not os.path.exists(INCUSD):
        raise RuntimeError(f"{INCUSD} is not installed")
    tag = secrets.token_hex(3)
    root = Path(tempfile.mkdtemp(prefix=f"coi-remote-{tag}-", dir=base))
    os.chmod(root, 0o711)
    (root / "var").mkdir(mode=0o711)
    (root / "pool").mkdir(mode=0o711)
    net = free_net()
    hosts = list(net.hosts())
    rd = RemoteDaemon(
        root=root,
        ns=f"coirmt-{tag}",
        veth=f"rh{tag}",
        host_addr=str(hosts[0]),
        daemon_addr=str(hosts[1]),
    )
    try:
        _make_namespace(rd)
        launch(rd)
        _initialize(rd)
    except BaseException:
        stop(rd)
        raise
    return rd


@contextlib.contextmanager
def stopped(rd: RemoteDaemon) -> Iterator[None]:
    """The daemon stopped for the block (its address answers nothing), started again after."""
    shutdown(rd)
    try:
        yield
    finally:
        launch(rd)


def restart(rd: RemoteDaemon, *, new_certificate: bool = False) -> None:
    """Stop and start the daemon again; with `new_certificate` it makes itself a new server
    certificate (what a reinstalled server, or someone in between, would present)."""
    shutdown(rd)
    if new_certificate:
        for name in ("server.crt", "server.key"):
            (rd.root / "var" / name).unlink(missing_ok=True)
    launch(rd)


def stop(rd: RemoteDaemon) -> None:
    """Stop the daemon and its containers, remove the namespace, the veth and every file."""
    shutdown(rd)
    # Its dnsmasq processes live in the namespace; the daemon ends them as it stops.
    subprocess.run(["ip", "link", "del", rd.veth], capture_output=True)
    subprocess.run(["ip", "netns", "del", rd.ns], capture_output=True)
    shutil.rmtree(rd.root, ignore_errors=True)


def check_route(rd: RemoteDaemon) -> None:
    """The daemon's address routes into its namespace (else nothing may be sent to it)."""
    out = subprocess.run(
        ["ip", "-o", "route", "get", rd.daemon_addr], capture_output=True, text=True, check=True
    ).stdout
    if f" dev {rd.veth} " not in out + " ":
        raise RuntimeError(f"{rd.daemon_addr} does not route into the namespace: {out.strip()}")


@contextlib.contextmanager
def running(base: Path | None = None) -> Iterator[RemoteDaemon]:
    rd = start(base)
    try:
        yield rd
    finally:
        stop(rd)


def user_env(folder: Path, image: str = "coi-tiny") -> dict[str, str]:
    """The environment of a coi user of their own, with coi's config and state under `folder`
    (no remote of an earlier try can be in it): this process's, less every COI_ variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
    env.update(
        HOME=str(folder / "home"),
        XDG_CONFIG_HOME=str(folder / "xdg"),
        COI_HOME=str(folder / "coi-home"),
        COI_IMAGE=image,
    )
    (folder / "home").mkdir(parents=True, exist_ok=True)
    return env
