"""A small network of test hosts, all inside this machine: "the internet", "the LAN", a cloud
metadata stand-in and a DNS server, each an address in a network namespace the test makes.

Nothing here ever sends to an address it did not create: the namespace, its veth and host
routes are made first, and `check_routes` proves every address routes into the namespace
before any test sends a packet.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coi.network.hostnet import host_networks

HOST_SIDE = "198.51.100.9/30"  # the host's end of the veth
INTERNET = "198.51.100.10"  # "the internet": HTTP on :8080
OTHER_INTERNET = "198.51.100.11"  # an internet host that is not on the allowlist
DNS = "198.51.100.12"  # the test's DNS server (the only one that knows the test names)
# Every address also holds TCP connections open on :80, :443 and :4444 (listeners for attacks)
# and echoes on :7.
LAN = "192.168.77.10"  # a private "LAN" host
METADATA = "169.254.169.254"  # the cloud metadata stand-in
EXTRA = (OTHER_INTERNET, DNS, LAN, METADATA)
ALL = (INTERNET, *EXTRA)
DNS_NAMES = {"allowed.coi-test": INTERNET, "other.coi-test": OTHER_INTERNET}

_SERVER = r"""
import http.server, socket, socketserver, sys, threading
log = open(sys.argv[1], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {self.connection.getsockname()[0]}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
threading.Thread(target=S(("0.0.0.0", 8080), H).serve_forever, daemon=True).start()
def hold(port):  # accept and keep the connection open for 20 s: a reverse-shell listener
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port)); srv.listen(16)
    while True:
        c, _ = srv.accept(); threading.Timer(20, c.close).start()
for port in (80, 443, 4444):
    threading.Thread(target=hold, args=(port,), daemon=True).start()
def echo(conn):  # :7 echoes what it gets, for 30 s at most: a live connection to test
    conn.settimeout(30)
    try:
        while data := conn.recv(4096):
            conn.sendall(data)
    except OSError:
        pass
    conn.close()
def echo_server():
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 7)); srv.listen(16)
    while True:
        threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
threading.Thread(target=echo_server, daemon=True).start()
names = dict(a.split("=") for a in sys.argv[3:])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[2], 53))
while True:
    q, peer = s.recvfrom(512)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1 : i + 1 + q[i]].decode(errors="replace")); i += 1 + q[i]
    name = ".".join(labels).lower(); log.write(name + "\n")
    qend = i + 5
    ip = names.get(name)
    flags, count = (b"\x81\x80", b"\x00\x01") if ip else (b"\x81\x83", b"\x00\x00")
    head = q[:2] + flags + q[4:6] + count + b"\x00\x00\x00\x00"
    ans = b""
    if ip:
        ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(ip)
    s.sendto(head + q[12:qend] + ans, peer)
"""


@dataclass
class Topology:
    ns: str
    veth: str
    dns_log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def queries(self) -> list[str]:
        return self.dns_log.read_text().split() if self.dns_log.exists() else []


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def check_no_overlap() -> None:
    """The planned addresses must not be anything this machine already uses."""
    planned = [ipaddress.ip_network(HOST_SIDE, strict=False)] + [
        ipaddress.ip_network(f"{a}/32") for a in ALL
    ]
    for used in host_networks():
        for p in planned:
            if p.overlaps(used):
                raise RuntimeError(f"test address {p} overlaps {used} on this machine")


def check_routes(top: Topology) -> None:
    """Every test address must route into our namespace, or nothing may be sent."""
    for addr in ALL:
        out = subprocess.run(
            ["ip", "-o", "route", "get", addr], capture_output=True, text=True, check=True
        ).stdout
        if f" dev {top.veth} " not in out + " ":
            raise RuntimeError(f"{addr} does not route into the test namespace: {out.strip()}")


def create(tmp: Path) -> Topology:
    check_no_overlap()
    tag = secrets.token_hex(3)
    top = Topology(ns=f"coitest-{tag}", veth=f"ct{tag}", dns_log=tmp / "dns.log")
    peer = f"cp{tag}"
    try:
        _run("ip", "netns", "add", top.ns)
        _run("ip", "link", "add", top.veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", top.ns)
        _run("ip", "addr", "add", HOST_SIDE, "dev", top.veth)
        _run("ip", "link", "set", top.veth, "up")
        _run("ip", "-n", top.ns, "addr", "add", f"{INTERNET}/30", "dev", peer)
        for a in EXTRA:
            _run("ip", "-n", top.ns, "addr", "add", f"{a}/32", "dev", peer)
            _run("ip", "route", "add", f"{a}/32", "via", INTERNET, "dev", top.veth)
        _run("ip", "-n", top.ns, "link", "set", peer, "up")
        _run("ip", "-n", top.ns, "link", "set", "lo", "up")
        _run("ip", "-n", top.ns, "route", "add", "default", "via", HOST_SIDE.split("/")[0])
        check_routes(top)
        names = [f"{k}={v}" for k, v in DNS_NAMES.items()]
        top.procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    top.ns,
                    sys.executable,
                    "-c",
                    _SERVER,
                    str(top.dns_log),
                    DNS,
                    *names,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_listening(top)
    except BaseException:
        destroy(top)
        raise
    return top


def _wait_listening(top: Topology) -> None:
    for _ in range(50):
        out = subprocess.run(
            ["ip", "netns", "exec", top.ns, "ss", "-ltnu"], capture_output=True, text=True
        ).stdout
        if all(f":{p} " in out for p in (8080, 80, 443, 4444, 7)) and f"{DNS}:53" in out:
            return
        time.sleep(0.1)
    raise RuntimeError("test servers did not start")


def destroy(top: Topology) -> None:
    for p in top.procs:
        p.kill()
        p.wait(timeout=5)
    for a in EXTRA:
        subprocess.run(["ip", "route", "del", f"{a}/32"], capture_output=True)
    subprocess.run(["ip", "link", "del", top.veth], capture_output=True)
    subprocess.run(["ip", "netns", "del", top.ns], capture_output=True)
