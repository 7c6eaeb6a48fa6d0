"""The attack suite's hosts: tests/netkit.py's namespace ("the internet", the LAN host, the
metadata stand-in, the DNS stand-in), plus a LAN range to scan and counting listeners.

Nothing is sent anywhere before every address an attack names is proved to route into the
namespace (`check`); the extra routes go with the namespace's veth.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import random
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import netkit

# A /28 of "the LAN" around netkit's LAN host, routed into the namespace: a scan of it reaches
# one live host (netkit.LAN) and 13 silent addresses, all of them ours.
LAN_RANGE = "192.168.77.0/28"
SINK = Path(__file__).with_name("sink.py")


@dataclass(frozen=True)
class Conn:
    """What one connection to the listeners brought: bytes, and when (host clock)."""

    bytes: int
    first: float
    last: float


@dataclass
class Net:
    top: netkit.Topology
    counts_file: Path
    files: Path  # what the namespace's HTTP server on :8000 serves (a package index)
    sink: subprocess.Popen[bytes] | None = None
    addresses: list[str] = field(default_factory=list)

    def _read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.counts_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def counts(self) -> dict[str, int]:
        """Bytes each (proto, port, peer) has sent to the counting listeners so far."""
        counts: dict[str, int] = self._read().get("counts", {})
        return counts

    def conns(self, *, after: float = 0.0) -> dict[str, Conn]:
        """Each connection's (or UDP source port's) bytes, first and last byte times, as
        the listeners wrote them after the host time `after` (waited for, 3 s at most: they
        write five times a second)."""
        for _ in range(30):
            data = self._read()
            if data.get("at", 0.0) > after:
                return {
                    k: Conn(int(n), first, last) for k, (n, first, last) in data["conns"].items()
                }
            time.sleep(0.1)
        raise RuntimeError("the counting listeners stopped writing their counts")

    def sent_by(self, peer: str) -> int:
        return sum(n for k, n in self.counts().items() if k.endswith(f" {peer}"))

    def dns_queries(self) -> list[str]:
        return self.top.queries()


def _lan_addresses() -> list[str]:
    return [str(a) for a in ipaddress.ip_network(LAN_RANGE).hosts()]


def _index(d: Path) -> None:
    """A package index: one small tool package with its checksum, and a 20 MB dependency."""
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        script = b"#!/bin/sh\necho hello-tool 1.0\n"
        info = tarfile.TarInfo("bin/hello-tool")
        info.size, info.mode = len(script), 0o755
        tar.addfile(info, io.BytesIO(script))
    (d / "hello-tool-1.0.tar.gz").write_bytes(buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    (d / "SHA256SUMS").write_text(f"{digest}  hello-tool-1.0.tar.gz\n")
    (d / "big-dependency.bin").write_bytes(random.Random(7).randbytes(20_000_000))


def check(net: Net) -> None:
    """Every address the corpus names routes into the test namespace, or nothing is sent."""
    netkit.check_routes(net.top)
    for addr in net.addresses:
        out = subprocess.run(
            ["ip", "-o", "route", "get", addr], capture_output=True, text=True, check=True
        ).stdout
        if f" dev {net.top.veth} " not in out + " ":
            raise RuntimeError(f"{addr} does not route into the test namespace: {out.strip()}")


def create(tmp: Path) -> Net:
    tmp.mkdir(parents=True, exist_ok=True)
    top = netkit.create(tmp)
    net = Net(top, tmp / "sink-counts.json", tmp / "index", addresses=_lan_addresses())
    try:
        _index(net.files)
        subprocess.run(
            ["ip", "route", "add", LAN_RANGE, "via", netkit.INTERNET, "dev", top.veth],
            check=True,
            capture_output=True,
        )
        check(net)
        net.sink = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                top.ns,
                sys.executable,
                str(SINK),
                str(net.counts_file),
                str(net.files),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(50):
            out = subprocess.run(
                ["ip", "netns", "exec", top.ns, "ss", "-ltnu"], capture_output=True, text=True
            ).stdout
            if ":8000 " in out and ":8443 " in out and net.counts_file.exists():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the counting listeners did not start")
    except BaseException:
        destroy(net)
        raise
    return net


def destroy(net: Net) -> None:
    if net.sink is not None:
        net.sink.kill()
        net.sink.wait(timeout=5)
    subprocess.run(["ip", "route", "del", LAN_RANGE], capture_output=True)
    netkit.destroy(net.top)
