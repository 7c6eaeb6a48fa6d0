"""A three-member Incus cluster on this host for the cluster tests, reachable only over HTTPS.

Each member is an incusd started as tests/remotekit.py starts its second daemon (its own
INCUS_DIR under /tmp, a private /run/incus in a mount namespace, a network namespace of its
own, none of the main daemon's environment). The members, this host and the test's "LAN
host" meet on one bridge inside a hub namespace:

    host  ch<tag> 198.18.x.1/29 ──┐
    member m1  hub0 198.18.x.2 ───┤
    member m2  hub0 198.18.x.3 ───┤  bridge `hubbr` in namespace coiclhub-<tag>
    member m3  hub0 198.18.x.4 ───┤
    LAN host   hub0 198.18.x.5 ───┘  and LAN (172.29.77.10) on its loopback

The /29 comes from 198.18.0.0/15 (benchmarking addresses: no real host) and is checked free
on this machine first; this host has a route to the /29 only (through ch<tag>), the members
have no default route, only the /29 and a route to the LAN address via the LAN host, which
the kit sets and checks in every member before anything is sent. The LAN address is a private
one (what restricted mode blocks); only the members' namespaces have a route to it.

m1 bootstraps the cluster, m2 and m3 join with tokens; then the storage pool `coi` (dir, a
folder of each member's) and the bridge `coibr0` are made as a cluster makes them: pending on
each member (`?target=`), then the global create. Everything made is removed at the end
(members and their containers, namespaces, the host's veth, folders, the LAN listener);
each wait is bounded.
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
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from coi.network.hostnet import host_networks
from tests import remotekit
from tests.remotekit import PORT, RemoteDaemon

MEMBERS = ("m1", "m2", "m3")
# The test's LAN host: a private address (restricted mode blocks it), reached from the
# members only (this host has no route to it).
LAN = "172.29.77.10"
LAN_PORT = 8080
BRIDGE_SUBNET = remotekit.BRIDGE_SUBNET

# Counts who connects to the LAN host: one line per accepted connection, the peer address.
_LISTENER = r"""
import socket, sys
log = open(sys.argv[1], "a", buffering=1)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[2], int(sys.argv[3]))); srv.listen(64)
while True:
    c, peer = srv.accept(); log.write(peer[0] + "\n"); c.close()
"""


@dataclass
class Cluster:
    """The members (each a remotekit.RemoteDaemon on the hub), the hub and the LAN host."""

    root: Path
    tag: str
    hub: str  # the hub namespace
    veth: str  # this host's side of its veth to the hub
    host_addr: str
    lan_ns: str
    lan_hub_addr: str
    members: list[RemoteDaemon] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(MEMBERS[: len(self.members)])

    @property
    def lan_log(self) -> Path:
        return self.root / "lan.log"

    def member(self, name: str) -> RemoteDaemon:
        return self.members[MEMBERS.index(name)]

    def lan_peers(self) -> list[str]:
        """Who reached the LAN host so far (their addresses, in order)."""
        return self.lan_log.read_text().split() if self.lan_log.exists() else []

    def locations(self, project: str) -> dict[str, str]:
        """Instance name -> the member it runs on, as the cluster says."""
        with self.members[0].admin(project) as c:
            return {
                str(d["name"]): str(d.get("location") or "")
                for d in c.get("/1.0/instances", recursion=1) or ()
            }

    def on_member(self, name: str, project: str) -> list[str]:
        """What the member's own directory holds for `project` (a member's containers)."""
        base = self.member(name).root / "var" / "containers"
        prefix = "" if project == "default" else f"{project}_"
        return sorted(
            p.name.removeprefix(prefix)
            for p in (base.iterdir() if base.exists() else ())
            if p.name.startswith(prefix) and (prefix or "_" not in p.name)
        )


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _make_hub(cl: Cluster, net: ipaddress.IPv4Network) -> None:
    """The hub namespace and its bridge; this host's veth onto it (the /29 routes there)."""
    _run("ip", "netns", "add", cl.hub)
    _run("ip", "-n", cl.hub, "link", "add", "hubbr", "type", "bridge")
    _run("ip", "-n", cl.hub, "link", "set", "hubbr", "up")
    _run("ip", "link", "add", cl.veth, "type", "veth", "peer", "name", "host", "netns", cl.hub)
    _run("ip", "-n", cl.hub, "link", "set", "host", "master", "hubbr", "up")
    _run("ip", "addr", "add", f"{cl.host_addr}/{net.prefixlen}", "dev", cl.veth)
    _run("ip", "link", "set", cl.veth, "up")


def _plug(cl: Cluster, ns: str, port: str, addr: str, prefixlen: int) -> None:
    """Namespace `ns` on the hub: its `hub0` has `addr`, the hub's side is `port`."""
    _run("ip", "netns", "add", ns)
    _run("ip", "-n", cl.hub, "link", "add", port, "type", "veth", "peer", "name", "hub0",
         "netns", ns)  # fmt: skip
    _run("ip", "-n", cl.hub, "link", "set", port, "master", "hubbr", "up")
    _run("ip", "-n", ns, "addr", "add", f"{addr}/{prefixlen}", "dev", "hub0")
    _run("ip", "-n", ns, "link", "set", "hub0", "up")
    _run("ip", "-n", ns, "link", "set", "lo", "up")


def check_routes(cl: Cluster) -> None:
    """Every member's address routes from this host into the hub, and the LAN address from
    every member's namespace to the LAN host only (else nothing may be sent)."""
    for m in cl.members:
        remotekit.check_route(m)
        out = _run("ip", "-n", m.ns, "-o", "route", "get", LAN)
        if f" via {cl.lan_hub_addr} dev hub0 " not in out + " ":
            raise RuntimeError(f"{LAN} does not route to the LAN host from {m.ns}: {out.strip()}")
        if "default" in _run("ip", "-n", m.ns, "route", "show"):
            raise RuntimeError(f"{m.ns} has a default route")
    if any(ipaddress.ip_network(f"{LAN}/32").overlaps(u) for u in host_networks()):
        raise RuntimeError(f"{LAN} is in use on this machine")


def _lan_host(cl: Cluster, prefixlen: int) -> None:
    _plug(cl, cl.lan_ns, "lan", cl.lan_hub_addr, prefixlen)
    _run("ip", "-n", cl.lan_ns, "addr", "add", f"{LAN}/32", "dev", "lo")
    cmd = ["ip", "netns", "exec", cl.lan_ns, sys.executable, "-c", _LISTENER]
    cmd += [str(cl.lan_log), LAN, str(LAN_PORT)]
    cl.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for _ in range(100):
        if f"{LAN}:{LAN_PORT} " in _run("ip", "netns", "exec", cl.lan_ns, "ss", "-ltn"):
            return
        time.sleep(0.1)
    raise RuntimeError("the LAN host's listener did not start")


def _member(cl: Cluster, name: str, addr: str, prefixlen: int) -> RemoteDaemon:
    root = cl.root / name
    for d in (root, root / "var", root / "pool"):
        d.mkdir(mode=0o711)
    m = RemoteDaemon(
        root=root,
        ns=f"coicl{name}-{cl.tag}",
        veth=cl.veth,
        host_addr=cl.host_addr,
        daemon_addr=addr,
    )
    cl.members.append(m)
    _plug(cl, m.ns, name, addr, prefixlen)
    # The members' sandboxes reach the LAN host through the member (its bridge NATs them).
    _run("ip", "-n", m.ns, "route", "add", f"{LAN}/32", "via", cl.lan_hub_addr, "dev", "hub0")
    _run("ip", "netns", "exec", m.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    return m


def _join_token(m1: RemoteDaemon, name: str) -> str:
    with m1.admin() as c:
        op = c.request("POST", "/1.0/cluster/members", json={"server_name": name}, wait=False)
    meta = op.get("metadata") or {}
    data = {
        "server_name": name,
        "fingerprint": meta["fingerprint"],
        "addresses": meta["addresses"],
        "secret": meta["secret"],
        "expires_at": meta.get("expiresAt") or "0001-01-01T00:00:00Z",
    }
    return base64.b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def _form(cl: Cluster) -> None:
    """m1 bootstraps; the others join with tokens (each join waits for its operation)."""
    first = cl.members[0]
    for m in cl.members:
        with m.admin() as c:
            c.request(
                "PATCH", "/1.0", json={"config": {"core.https_address": f"{m.daemon_addr}:{PORT}"}}
            )
    with first.admin() as c:
        c.request("PUT", "/1.0/cluster", json={"server_name": MEMBERS[0], "enabled": True})
    for name, m in zip(MEMBERS[1:], cl.members[1:], strict=False):
        token = _join_token(first, name)
        with m.admin() as c:
            c.request(
                "PUT",
                "/1.0/cluster",
                json={
                    "server_name": name,
                    "enabled": True,
                    "cluster_address": f"{first.daemon_addr}:{PORT}",
                    "cluster_token": token,
                    # The cluster's certificate (what `incus admin init` fetches and checks
                    # against the token's fingerprint): the test reads it from m1's folder.
                    "cluster_certificate": (first.root / "var" / "cluster.crt").read_text(),
                    "server_address": f"{m.daemon_addr}:{PORT}",
                    "member_config": [],
                },
                timeout=180,
            )


def _pool_and_bridge(cl: Cluster) -> None:
    """As a cluster makes them: pending on each member (`?target=`), then the global create."""
    with cl.members[0].admin() as c:
        for name, m in zip(cl.names, cl.members, strict=True):
            c.request(
                "POST",
                "/1.0/storage-pools",
                params={"target": name},
                json={"name": "coi", "driver": "dir", "config": {"source": str(m.root / "pool")}},
            )
        c.request("POST", "/1.0/storage-pools", json={"name": "coi", "driver": "dir"})
        for name in cl.names:
            c.request(
                "POST",
                "/1.0/networks",
                params={"target": name},
                json={"name": "coibr0", "type": "bridge", "config": {}},
            )
        c.request(
            "POST",
            "/1.0/networks",
            json={
                "name": "coibr0",
                "type": "bridge",
                "config": {
                    "ipv4.address": BRIDGE_SUBNET,
                    "ipv4.nat": "true",
                    "ipv6.address": "none",
                },
            },
        )


def start(size: int = 3, base: Path | None = None) -> Cluster:
    """A running cluster of `size` members; stop() it (the fixture does) whatever happens."""
    if not os.path.exists(remotekit.INCUSD):
        raise RuntimeError(f"{remotekit.INCUSD} is not installed")
    tag = secrets.token_hex(3)
    root = Path(tempfile.mkdtemp(prefix=f"coi-cluster-{tag}-", dir=base))
    os.chmod(root, 0o711)
    net = remotekit.free_net(29)
    hosts = [str(h) for h in net.hosts()]  # .1 .. .6
    cl = Cluster(
        root=root,
        tag=tag,
        hub=f"coiclhub-{tag}",
        veth=f"ch{tag}",
        host_addr=hosts[0],
        lan_ns=f"coicllan-{tag}",
        lan_hub_addr=hosts[size + 1],
    )
    try:
        _make_hub(cl, net)
        for i in range(size):
            _member(cl, MEMBERS[i], hosts[i + 1], net.prefixlen)
        _lan_host(cl, net.prefixlen)
        check_routes(cl)
        for m in cl.members:
            remotekit.launch(m)
        _form(cl)
        _pool_and_bridge(cl)
    except BaseException:
        stop(cl)
        raise
    return cl


def stop(cl: Cluster) -> None:
    """Stop every member (their containers with them), the LAN listener; remove the
    namespaces, this host's veth and every file."""
    for p in cl.procs:
        p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
    # The joiners first: a cluster's last members wait for the others' heartbeats otherwise.
    for m in reversed(cl.members):
        remotekit.shutdown(m)
    # What a member started and did not end as it stopped (seen: the last member's dnsmasq,
    # left running in its namespace): every process still in the kit's namespaces, or
    # naming its folder, is the kit's own.
    _end(_pids_in(cl))
    subprocess.run(["ip", "link", "del", cl.veth], capture_output=True)
    for ns in _namespaces(cl):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(cl.root, ignore_errors=True)


def _namespaces(cl: Cluster) -> list[str]:
    return [m.ns for m in cl.members] + [cl.lan_ns, cl.hub]


def _pids_in(cl: Cluster) -> set[int]:
    """Processes in the kit's network namespaces, or with its folder in their command line."""
    pids: set[int] = set()
    listed = _run("ip", "netns", "list")
    for ns in _namespaces(cl):
        if ns in listed:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            pids.update(int(p) for p in out.stdout.split() if p.isdigit())
    mark = str(cl.root).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if mark in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
    pids.discard(os.getpid())
    return pids


def _end(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL what is left after 5 s (bounded)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + 5
        while pids and time.monotonic() < end:
            pids = {p for p in pids if Path(f"/proc/{p}").exists()}
            time.sleep(0.1)
        if not pids:
            return


def leftovers(cl: Cluster) -> list[str]:
    """Anything of the cluster still on this machine (for the fixture's last check)."""
    out = []
    if cl.root.exists():
        out.append(str(cl.root))
    netns = _run("ip", "netns", "list")
    out += [ns for ns in _namespaces(cl) if ns in netns]
    if cl.veth in _run("ip", "-br", "link"):
        out.append(cl.veth)
    out += [str(p.pid) for p in cl.procs if p.poll() is None]
    out += [str(m.proc.pid) for m in cl.members if m.proc is not None and m.proc.poll() is None]
    out += [f"pid {p}" for p in sorted(_pids_in(cl))]
    return out


@contextlib.contextmanager
def running(size: int = 3, base: Path | None = None) -> Iterator[Cluster]:
    cl = start(size, base)
    try:
        yield cl
    finally:
        stop(cl)


def user_env(cl: Cluster, folder: Path, *, remote: str = "c", via: str = "m2") -> dict[str, str]:
    """A coi user of their own (remotekit.user_env) with the cluster added as remote `remote`
    through member `via` (any member answers for the whole cluster); the routes are checked
    before anything is sent."""
    from tests.conftest import run_coi

    check_routes(cl)
    env = remotekit.user_env(folder)
    member = cl.member(via)
    res = run_coi("remote", "add", remote, member.url, "--token", member.trust_token("alice"),
                  env=env)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"coi remote add failed: {res.stderr}")
    return env
