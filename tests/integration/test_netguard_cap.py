"""The monitor's per-destination cap (src/coi/monitor/netguard.py) played against by a sender
that leaves megabytes in its socket when it is killed, as a paused sandbox's upload does.

The sandbox is a network namespace this test makes, behind a veth whose host end holds the
receiver: an address in 198.51.100.0/24 the test adds to its own veth (checked unused first,
and routed into that veth before anything is sent). No container is needed: the table hooks
a veth, whoever is behind it.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from coi.monitor import netguard
from coi.network.hostnet import host_networks

pytestmark = pytest.mark.skipif(not netguard.available(), reason="needs root and nft")

HOST_END = "198.51.100.241"  # the receiver, on the host end of the test's veth
SANDBOX_END = "198.51.100.242"  # the sender, in the test's namespace
# Silent addresses of the same /28, "neighbours" behind the host end (static entries in the
# namespace): what the sender sends them reaches the host end's veth and goes no further.
SILENT = ("198.51.100.243", "198.51.100.244", "198.51.100.245")
NET = "198.51.100.240/28"
CAP = 1_000_000
SENT = 6_000_000


@dataclass
class Topo:
    ns: str
    veth: str
    peer: str
    received: list[int] = field(default_factory=lambda: [0])


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def topo() -> Iterator[Topo]:
    for used in host_networks():
        if ipaddress.ip_network(NET).overlaps(used):
            pytest.fail(f"the test's {NET} overlaps {used} on this machine: nothing sent")
    tag = secrets.token_hex(3)
    peer = f"cr{tag}"
    t = Topo(ns=f"coicap-{tag}", veth=f"cq{tag}", peer=peer)
    try:
        _run("ip", "netns", "add", t.ns)
        _run("ip", "link", "add", t.veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", t.ns)
        _run("ip", "addr", "add", f"{HOST_END}/28", "dev", t.veth)
        _run("ip", "link", "set", t.veth, "up")
        _run("ip", "-n", t.ns, "addr", "add", f"{SANDBOX_END}/28", "dev", peer)
        _run("ip", "-n", t.ns, "link", "set", peer, "up")
        _run("ip", "-n", t.ns, "link", "set", "lo", "up")
        mac = _run("cat", f"/sys/class/net/{t.veth}/address").strip()
        for addr in SILENT:
            _run("ip", "-n", t.ns, "neigh", "add", addr, "lladdr", mac, "dev", peer)
        # The only way out of the namespace is the test's veth, to the test's addresses.
        for addr in (HOST_END, *SILENT):
            route = _run("ip", "-n", t.ns, "-o", "route", "get", addr)
            assert f" dev {peer} " in route + " ", route
        yield t
    finally:
        subprocess.run(["ip", "link", "del", t.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", t.ns], capture_output=True)


def _receiver(t: Topo) -> int:
    """A listener on the host end that counts what arrives; its port."""
    srv = socket.socket()
    srv.bind((HOST_END, 0))
    srv.listen(4)
    srv.settimeout(60)

    def serve() -> None:
        # Closed here whatever happens: a connection the cap never let in (its SYN dropped)
        # ends the accept by its timeout, and a socket left to the garbage collector fails a
        # later test with a ResourceWarning.
        with srv:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(60)
                try:
                    while data := conn.recv(65536):
                        t.received[0] += len(data)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    port: int = srv.getsockname()[1]
    return port


def _end(sender: subprocess.Popen[bytes] | None, *tables: str) -> None:
    """A test's clean-up: its sender killed if it still runs, its tables deleted."""
    if sender is not None and sender.poll() is None:
        sender.kill()
        sender.wait(timeout=10)
    for table in tables:
        subprocess.run(
            [netguard.nft_path() or "nft", "delete", "table", "netdev", table],
            capture_output=True,
        )


def _upload(t: Topo, port: int, first: str = "", timeout: int = 20) -> subprocess.Popen[bytes]:
    """From the test's namespace: `first` (UDP through `u`), then SENT bytes over TCP to the
    receiver."""
    return subprocess.Popen(
        [
            "ip", "netns", "exec", t.ns, "python3", "-c",
            "import socket; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            + (first or "pass") + f"; s = socket.socket(); s.settimeout({timeout});"
            f" s.connect(({HOST_END!r}, {port})); s.sendall(b'x' * {SENT})",
        ]
    )  # fmt: skip


def _until(pred: object, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_a_killed_senders_held_back_bytes_stay_capped_after_the_monitor_stops(
    topo: Topo,
) -> None:
    """The attack suite's outliers (11.6 MB, 13.9 MB out for a 10 MB cap): a paused upload's
    socket holds megabytes the cap kept back; its processes are killed, the kernel keeps
    sending them, and the monitor of `coi run`, stopping when the command ends, removed the
    table while the sandbox's veth was still there. It must not: over the cap, the cap
    stays until the veth goes."""
    port = _receiver(topo)
    packets: list[netguard.Packet] = []
    guard = netguard.NetGuard(
        f"coi-test-cap-{topo.ns}", topo.veth, packets.append,
        cap_bytes=CAP, gateway="", blocked=[], allowed=None,
    )  # fmt: skip
    table = guard.table
    sender = None
    try:
        guard.start()
        sender = subprocess.Popen(
            [
                "ip", "netns", "exec", topo.ns, "python3", "-c",
                f"import socket, time; s = socket.create_connection(({HOST_END!r}, {port}));"
                f" s.sendall(b'x' * {SENT}); time.sleep(60)",
            ]
        )  # fmt: skip
        assert _until(lambda: any(p.kind == netguard.OVER for p in packets), 20), packets
        # What the cap let through has arrived; the rest waits in the sender's socket.
        last = -1
        while last != topo.received[0]:
            last = topo.received[0]
            time.sleep(1)
        assert 0 < topo.received[0] <= CAP
        sender.kill()  # as the daemon kills a paused sandbox's processes
        sender.wait(timeout=10)
        guard.stop()  # as `coi run`'s monitor stops when the command ends
        listed = _run(netguard.nft_path() or "nft", "list", "tables", "netdev")
        assert f"table netdev {table}" in listed
        # The orphaned socket retransmits with backoff (seconds): were the cap gone, its
        # five megabytes would arrive within this bound.
        assert not _until(lambda: topo.received[0] > CAP, 20), topo.received[0]
    finally:
        guard.stop()
        _end(sender, table)
    assert os.path.exists(f"/sys/class/net/{topo.veth}")


def test_a_full_set_of_destinations_does_not_open_a_new_one(topo: Topo) -> None:
    """One packet to each of as many addresses as the quota set holds (65535 in coi; 3
    here) filled it, and an address it could not hold was never counted: an upload to it
    went through whole. Now an address the set cannot hold is over its cap."""
    port = _receiver(topo)
    packets: list[netguard.Packet] = []
    guard = netguard.NetGuard(
        f"coi-test-cap-{topo.ns}", topo.veth, packets.append,
        cap_bytes=CAP, gateway="", blocked=[], allowed=None, set_size=len(SILENT),
    )  # fmt: skip
    sender = None
    try:
        guard.start()
        fill = "; ".join(f"u.sendto(b'x', ({a!r}, 9))" for a in SILENT)
        sender = _upload(topo, port, fill)
        over = _until(lambda: any(p.kind == netguard.OVER for p in packets), 20)
        assert over, f"nothing capped: {topo.received[0]} bytes received"
        assert {p.dst for p in packets if p.kind == netguard.OVER} == {HOST_END}
        sender.wait(timeout=40)  # its connect or its send times out (20 s each at most)
        assert topo.received[0] <= CAP
    finally:
        guard.stop()
        _end(sender, guard.table)


def test_a_sender_left_running_after_coi_runs_monitor_stops_is_still_capped(
    topo: Topo,
) -> None:
    """The end of a `coi run`: its monitor stops when the command ends, before the daemon
    removes the sandbox; a process the command left in the background goes on sending
    meanwhile. No destination is over its cap yet when the monitor stops: the table stays
    all the same (while the veth is there), so the upload that starts then is still
    capped."""
    port = _receiver(topo)
    guard = netguard.NetGuard(
        f"coi-test-cap-{topo.ns}", topo.veth, lambda _p: None,
        cap_bytes=CAP, gateway="", blocked=[], allowed=None,
    )  # fmt: skip
    table = guard.table
    sender = None
    try:
        guard.start()
        guard.stop()  # as coi run's monitor stops, nothing sent yet
        listed = _run(netguard.nft_path() or "nft", "list", "tables", "netdev")
        assert f"table netdev {table}" in listed
        sender = subprocess.Popen(
            [
                "ip", "netns", "exec", topo.ns, "python3", "-c",
                f"import socket; s = socket.create_connection(({HOST_END!r}, {port}));"
                f" s.settimeout(20); s.sendall(b'x' * {SENT})",
            ]
        )  # fmt: skip
        # Were the table gone, the six megabytes would arrive within a second or two.
        assert not _until(lambda: topo.received[0] > CAP, 15), topo.received[0]
        assert 0 < topo.received[0] <= CAP
    finally:
        _end(sender, table)


def test_the_next_monitor_carries_the_counts_over(topo: Topo) -> None:
    """A handover (`coi shell` detached: the monitor service takes over; attached again:
    coi's own monitor) once gave every destination its whole cap again: each monitor's table
    counted from zero. The first monitor's table stays when it stops; the next one starts
    each destination at what it had sent, then removes the old table. Played: 60 % of the
    cap sent under the first monitor, the other 60 % under the second; at most the cap
    arrives. After `coi resume` (`reset_quota`), the carried counts go too."""
    port = _receiver(topo)
    container = f"coi-test-cap-{topo.ns}"
    packets: list[netguard.Packet] = []
    part = CAP * 6 // 10
    first = netguard.NetGuard(
        container, topo.veth, lambda _p: None,
        cap_bytes=CAP, gateway="", blocked=[], allowed=None, owner=1,
    )  # fmt: skip
    tables = [first.table]
    sender = None
    gate = f"/tmp/coi-it-carry-{topo.ns}"
    try:
        first.start()
        sender = subprocess.Popen(
            [
                "ip", "netns", "exec", topo.ns, "python3", "-c",
                "import os, socket, time; "
                f"s = socket.create_connection(({HOST_END!r}, {port})); s.settimeout(30); "
                f"s.sendall(b'x' * {part}); "
                f"end = time.monotonic() + 30\n"
                f"while not os.path.exists({gate!r}) and time.monotonic() < end: time.sleep(0.1)\n"
                f"s.sendall(b'x' * {part}); time.sleep(30)",
            ]
        )  # fmt: skip
        assert _until(lambda: topo.received[0] >= part, 20), topo.received[0]
        first.stop()  # the handover: this table stays, counts and all
        listed = _run(netguard.nft_path() or "nft", "list", "tables", "netdev")
        assert f"table netdev {first.table}" in listed.splitlines()
        second = netguard.NetGuard(
            container, topo.veth, packets.append,
            cap_bytes=CAP, gateway="", blocked=[], allowed=None,
        )  # fmt: skip
        tables.append(second.table)
        second.start()
        try:
            assert second.carried.get(HOST_END, 0) >= part, second.carried
            listed = _run(netguard.nft_path() or "nft", "list", "tables", "netdev")
            assert f"table netdev {first.table}" not in listed.splitlines()  # carried, removed
            open(gate, "w").close()  # the second part goes now
            assert _until(lambda: any(p.kind == netguard.OVER for p in packets), 20), packets
            last = -1
            while last != topo.received[0]:
                last = topo.received[0]
                time.sleep(1)
            assert part <= topo.received[0] <= CAP, topo.received[0]
            second.reset_quota()  # `coi resume`: the rest may go
            assert _until(lambda: topo.received[0] >= 2 * part, 30), topo.received[0]
        finally:
            second.stop()
    finally:
        if os.path.exists(gate):
            os.unlink(gate)
        _end(sender, *tables)


def test_a_total_cap_stops_an_upload_spread_over_many_addresses(topo: Topo) -> None:
    """Under each destination's own cap, many destinations once took it all: 40 % of the total
    cap to each of three addresses, then an upload to a fourth. The total cap drops what
    passes it, the fourth gets nothing, and the monitor hears of it (`coi-exft`)."""
    port = _receiver(topo)
    packets: list[netguard.Packet] = []
    guard = netguard.NetGuard(
        f"coi-test-cap-{topo.ns}", topo.veth, packets.append,
        cap_bytes=10 * CAP, gateway="", blocked=[], allowed=None, total_bytes=CAP,
    )  # fmt: skip
    sender = None
    each = CAP * 4 // 10
    try:
        guard.start()
        spread = "; ".join(
            f"[u.sendto(b'x' * 1000, ({a!r}, 9)) for _ in range({each // 1028 + 1})]"
            for a in SILENT
        )
        sender = _upload(topo, port, spread, timeout=10)
        assert _until(lambda: any(p.kind == netguard.OVER_TOTAL for p in packets), 20), packets
        assert not any(p.kind == netguard.OVER for p in packets)  # no address over its own
        sender.wait(timeout=40)  # its connect times out (10 s), its SYNs dropped
        assert topo.received[0] == 0, topo.received[0]
        listing = _run(netguard.nft_path() or "nft", "-j", "list", "table", "netdev", guard.table)
        used = netguard.used_bytes(listing)
        assert used[netguard.TOTAL] >= CAP and all(used[a] < 10 * CAP for a in SILENT), used
    finally:
        guard.stop()
        _end(sender, guard.table)
