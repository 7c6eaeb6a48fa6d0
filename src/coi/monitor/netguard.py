"""The sandbox's traffic where it leaves: an nft table on its host-side veth that caps the bytes
sent to each destination, and reports blocked attempts and DNS queries as they happen.

Sweeps of the container's sockets see only what is alive at that moment; a scan's refused
SYNs, a 10 MB upload in 80 ms or a thousand DNS queries a second are gone before any sweep.
The kernel sees every packet: one `netdev` table per monitored sandbox, hooked on the ingress
of the veth the daemon made for it (what the container sends, whatever address it claims),
does three things, all in the kernel:

- exfiltration: a per-destination quota (a dynamic set whose elements are `quota over N`):
  once N bytes have gone to one address outside the allowlist, its further packets are
  dropped, so no more than N leave, however fast the link; the first drops are logged;
- blocked attempts (the policy's private, metadata and host ranges, or anything outside an
  allowlist) are logged, at most 100 a second: a scan is seen where it is refused;
- DNS queries (UDP to port 53, any resolver) are logged with their question, at most 400 a
  second: volume and entropy of the names, whatever the tool.

The logs reach the monitor over NFLOG (netlink, a group of its own): no polling, no cost
while the sandbox is quiet. Needs root (nft and NFLOG). A monitor that stops leaves its
table while the veth is there (see `stop`): the monitor that watches next (the service
after a detach, coi after an attach) carries every destination's count over into its own
table and removes the old one; a table whose veth is gone is removed by `tidy`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from coi.monitor.netlink import NetlinkReader
from coi.monitor.netlink import attr as _attr
from coi.monitor.netlink import attrs as _attrs

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian: the group)

# Log prefixes: what a packet was logged for.
DNS, BLOCKED, OVER, OVER_TOTAL = "coi-dns", "coi-blk", "coi-exf", "coi-exft"
# The key of the total quota (all counted destinations together) in `used_bytes`.
TOTAL = "*"
# Groups the monitor tries (nft's `log group` is 16 bits; 0 is the kernel log's).
GROUP_BASE, GROUPS = 0x5C00, 0x400


@dataclass(frozen=True)
class Packet:
    """One logged packet: why, and its addresses, ports and (for DNS) its payload."""

    kind: str  # DNS, BLOCKED, OVER or OVER_TOTAL
    proto: str  # "tcp", "udp", "icmp" or the IP protocol number
    src: str
    dst: str
    dport: int  # 0 for protocols without ports
    payload: bytes  # the transport payload (the DNS message), as far as it was copied
    length: int  # the IP packet's length


def available() -> bool:
    return os.geteuid() == 0 and nft_path() is not None


def nft_path() -> str | None:
    return shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None
    )


def table_name(container: str, pid: int | None = None) -> str:
    """One table per sandbox and monitor process (the sandbox's name hashed: names may be
    long; the pid: the table a monitor left must still be there, counts and all, when the
    next one starts and carries them over)."""
    return f"{_table_prefix(container)}{os.getpid() if pid is None else pid}"


def _table_prefix(container: str) -> str:
    return f"coi-mon-{hashlib.sha256(container.encode()).hexdigest()[:12]}-"


def coi_tables(listing: str) -> dict[str, str]:
    """coi's monitor tables in `nft list ruleset netdev`, with the NIC each is hooked on."""
    out: dict[str, str] = {}
    name = ""
    for line in listing.splitlines():
        if line.startswith("table netdev "):
            name = line.split()[2] if line.split()[2].startswith("coi-mon-") else ""
            if name:
                out[name] = ""
        elif name and "hook ingress device" in line:
            out[name] = line.split('device "', 1)[-1].split('"', 1)[0]
    return out


def remove_stale(listing: str, device_exists: Callable[[str], bool]) -> list[str]:
    """The tables to delete in `nft list ruleset netdev`: those whose sandbox is gone, its
    NIC too. A table left by a monitor that stopped or died (killed) while its sandbox runs
    stays: it still caps what the sandbox sends, until the next monitor of that sandbox
    carries its counts over (see NetGuard)."""
    return [name for name, device in coi_tables(listing).items() if not device_exists(device)]


# nft's units for a quota's bytes (powers of 1024), in its JSON output.
_UNITS = {"bytes": 1, "kbytes": 1 << 10, "mbytes": 1 << 20, "gbytes": 1 << 30}


def used_bytes(listing: str) -> dict[str, int]:
    """What each destination has used of its quota in one table (`nft -j list table`): its
    element of the dynamic sets, or its carried quota (counted by monitors before); and under
    `TOTAL`, what all of them have used of the total cap."""
    out: dict[str, int] = {}

    def note(addr: object, used: int) -> None:
        if isinstance(addr, str) and used > 0:
            out[addr] = max(out.get(addr, 0), used)

    quotas: dict[str, int] = {}
    mapped: list[object] = []
    for item in json.loads(listing).get("nftables", []):
        if "set" in item and item["set"].get("name") in ("out4", "out6"):
            for e in item["set"].get("elem", []):
                el = e.get("elem") if isinstance(e, dict) else None
                q = (el or {}).get("quota") or {}
                used = int(q.get("used", 0)) * _UNITS.get(str(q.get("used_unit", "bytes")), 1)
                note((el or {}).get("val"), used)
        elif "quota" in item:
            quotas[str(item["quota"].get("name"))] = int(item["quota"].get("used", 0))
            if item["quota"].get("name") == "total":
                note(TOTAL, int(item["quota"].get("used", 0)))
        elif "map" in item and item["map"].get("name") in ("carried4", "carried6"):
            mapped.extend(item["map"].get("elem", []))
    for pair in mapped:
        if isinstance(pair, list) and len(pair) == 2:
            note(pair[0], quotas.get(str(pair[1]), 0))
    return out


# At most this many destinations are carried over (those that sent the most): each is a
# named quota in the new table.
MAX_CARRIED = 4096


def inherited(container: str, device: str, own: str) -> tuple[dict[str, int], list[str]]:
    """The counts the tables other monitors left for this sandbox (on this veth) hold, per
    destination, and those tables."""
    path = nft_path()
    if path is None:
        return {}, []
    listing = subprocess.run(
        [path, "list", "ruleset", "netdev"], capture_output=True, text=True
    ).stdout
    prefix = _table_prefix(container)
    tables = [
        name
        for name, dev in coi_tables(listing).items()
        if name.startswith(prefix) and dev == device and name != own
    ]
    counts: dict[str, int] = {}
    for table in tables:
        res = subprocess.run(
            [path, "-j", "list", "table", "netdev", table], capture_output=True, text=True
        )
        if res.returncode != 0:
            continue  # removed meanwhile
        try:
            found = used_bytes(res.stdout)
        except (ValueError, TypeError, AttributeError):
            continue
        for addr, used in found.items():
            counts[addr] = max(counts.get(addr, 0), used)
    return counts, tables


def tidy(wait: float = 0.0) -> None:
    """Remove coi's tables that no monitor needs any more (see remove_stale). `wait`: for up
    to that many seconds, first wait for the NICs of this process's kept tables to go (the
    daemon removes a sandbox's NIC a moment after its stop returns)."""
    path = nft_path()
    if path is None:
        return

    def listing() -> str:
        return subprocess.run(
            [path, "list", "ruleset", "netdev"], capture_output=True, text=True
        ).stdout

    def exists(device: str) -> bool:
        return bool(device) and os.path.exists(f"/sys/class/net/{device}")

    def waiting(text: str) -> bool:
        mine = f"-{os.getpid()}"
        return any(n.endswith(mine) and exists(d) for n, d in coi_tables(text).items())

    deadline = time.monotonic() + wait
    text = listing()
    while waiting(text) and time.monotonic() < deadline:
        time.sleep(0.05)
        text = listing()
    for name in remove_stale(text, exists):
        try:
            nft(f"delete table netdev {name}\n")
        except OSError:
            pass  # another monitor removed it meanwhile


def ruleset(
    table: str,
    device: str,
    group: int,
    *,
    cap_bytes: int,
    gateway: str,
    blocked: Iterable[str],
    allowed: Iterable[str] | None,
    set_size: int = 65535,
    carried: Mapping[str, int] | None = None,
    total_bytes: int = 0,
) -> str:
    """The table for one sandbox, as an `nft -f` script (replacing an older one).

    `blocked`: ranges the policy refuses (logged, not counted). `allowed`: the allowlist
    (None: no allowlist, the internet is allowed), not counted; every other address counts
    against its quota. `cap_bytes` 0: no quota. `carried`: bytes destinations have already
    sent under monitors before this one: each starts with that much of its quota used (and
    the total with `carried[TOTAL]`). `total_bytes`: the cap on what all counted
    destinations receive together (0: none); what a destination's own cap dropped is not
    counted in it.
    """
    blocked4 = _merged(blocked)
    lines = [
        "# What the sandbox sends, judged before it leaves the host (coi security monitor).",
        "meta pkttype { broadcast, multicast } return",
        f'udp dport 53 limit rate 400/second burst 400 packets log prefix "{DNS}" group {group}',
    ]
    if gateway:
        # The bridge's own DNS and DHCP; its other ports are the host (blocked, below).
        lines += [
            f"ip daddr {gateway} udp dport {{ 53, 67 }} return",
            f"ip daddr {gateway} tcp dport 53 return",
        ]
    if allowed is not None:
        allowed4 = _merged(allowed)
        if allowed4:
            lines.append(f"ip daddr {{ {', '.join(allowed4)} }} return")
    log_blocked = f'limit rate 100/second burst 100 packets log prefix "{BLOCKED}" group {group}'
    if blocked4:
        lines += [
            f"ip daddr {{ {', '.join(blocked4)} }} {log_blocked}",
            f"ip daddr {{ {', '.join(blocked4)} }} return",
        ]
    # Outside an allowlist the policy refuses the rest, but the allowlist moves (coi re-resolves
    # it every refresh_interval_minutes, this table does not): the rest is counted against
    # its quota, not reported as refused, so a host's new address is no false alarm.
    objects: list[str] = []
    kept: dict[str, str] = {"ip": "", "ip6": ""}  # "not carried", where some are
    if cap_bytes > 0 and carried:
        objects, rules = _carried(carried, cap_bytes)
        lines += rules
        for proto, version in (("ip", 4), ("ip6", 6)):
            if f"map carried{version} " in "".join(objects):
                kept[proto] = f"{proto} daddr != @carried{version} "
    if cap_bytes > 0:
        # A carried address is counted by its own quota, never in the dynamic sets.
        lines += [
            f"{kept['ip']}update @out4 {{ ip daddr quota over {cap_bytes} bytes }} jump over",
            f"{kept['ip6']}update @out6 {{ ip6 daddr quota over {cap_bytes} bytes }} jump over",
            # A full set adds no element, and the update above then does not match: a sandbox
            # that had sent a packet to each of `set_size` addresses sent to any other one
            # uncounted. An address the set cannot hold is over its cap.
            f"{kept['ip']}ip daddr != @out4 jump over",
            f"{kept['ip6']}ip6 daddr != @out6 jump over",
        ]
    if total_bytes > 0:
        used = min((carried or {}).get(TOTAL, 0), total_bytes)
        objects.append(f"quota total {{ over {total_bytes} bytes used {used} bytes }}")
        lines.append('meta protocol { ip, ip6 } quota name "total" jump overall')
    body = "\n\t\t".join(lines)
    declared = "".join(f"\t{o}\n" for o in objects)
    return f"""\
table netdev {table}
delete table netdev {table}
table netdev {table} {{
	comment "coi security monitor: {device}"
{declared}	set out4 {{
		type ipv4_addr
		size {set_size}
		flags dynamic
	}}
	set out6 {{
		type ipv6_addr
		size {set_size}
		flags dynamic
	}}
	chain over {{
		limit rate 20/second burst 20 packets log prefix "{OVER}" group {group}
		drop
	}}
	chain overall {{
		limit rate 20/second burst 20 packets log prefix "{OVER_TOTAL}" group {group}
		drop
	}}
	chain egress {{
		type filter hook ingress device "{device}" priority -100; policy accept;
		{body}
	}}
}}
"""


def _carried(carried: Mapping[str, int], cap_bytes: int) -> tuple[list[str], list[str]]:
    """The named quotas (one a destination, started at what it used) and maps that carry
    counts over, and the rules that apply them (a carried address then skips the dynamic
    sets: see `ruleset`)."""
    top = sorted(((a, u) for a, u in carried.items() if u > 0), key=lambda au: au[1], reverse=True)[
        :MAX_CARRIED
    ]
    objects: list[str] = []
    rules: list[str] = []
    for version, kind, proto in ((4, "ipv4_addr", "ip"), (6, "ipv6_addr", "ip6")):
        pairs = []
        for addr, used in top:
            try:
                if ipaddress.ip_address(addr).version != version:
                    continue
            except ValueError:
                continue
            name = f"c{sum(o.startswith('quota') for o in objects)}"
            used = min(used, cap_bytes)
            objects.append(f"quota {name} {{ over {cap_bytes} bytes used {used} bytes }}")
            pairs.append(f'{addr} : "{name}"')
        if pairs:
            carried_map = f"carried{version}"
            elements = ", ".join(pairs)
            objects.append(
                f"map {carried_map} {{ type {kind} : quota; elements = {{ {elements} }} }}"
            )
            rules.append(
                f"{proto} daddr @{carried_map} quota name {proto} daddr map @{carried_map} "
                "jump over"
            )
    return objects, rules


def _merged(cidrs: Iterable[str]) -> list[str]:
    """IPv4 ranges without overlaps (nft refuses overlapping intervals in one set)."""
    nets = []
    for c in cidrs:
        try:
            net = ipaddress.ip_network(c, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network):
            nets.append(net)
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


_PROTOS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}


def parse_ip(kind: str, pkt: bytes) -> Packet | None:
    """A packet from its IP header on (what NFLOG copies at a netdev hook)."""
    if len(pkt) < 1:
        return None
    version = pkt[0] >> 4
    if version == 4 and len(pkt) >= 20:
        ihl = (pkt[0] & 0x0F) * 4
        total = struct.unpack_from("!H", pkt, 2)[0]
        proto = pkt[9]
        src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
        rest = pkt[ihl:]
    elif version == 6 and len(pkt) >= 40:
        total = 40 + struct.unpack_from("!H", pkt, 4)[0]
        proto = pkt[6]
        src = str(ipaddress.IPv6Address(pkt[8:24]))
        dst = str(ipaddress.IPv6Address(pkt[24:40]))
        rest = pkt[40:]
    else:
        return None
    dport, payload = 0, b""
    if proto in (6, 17) and len(rest) >= 4:
        dport = struct.unpack_from("!H", rest, 2)[0]
        if proto == 17:
            payload = rest[8:]
        elif len(rest) >= 13:
            payload = rest[(rest[12] >> 4) * 4 :]
    return Packet(kind, _PROTOS.get(proto, str(proto)), src, dst, dport, payload, total)


def parse_nflog(data: bytes) -> list[Packet]:
    """The logged packets in one netlink datagram (those with one of coi's prefixes)."""
    out: list[Packet] = []
    off = 0
    packet_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
    while off + _NLMSG.size <= len(data):
        length, kind = _NLMSG.unpack_from(data, off)[:2]
        if length < _NLMSG.size:
            break
        if kind == packet_type:
            attrs = _attrs(data, off + _NLMSG.size + _NFGEN.size, off + length)
            prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0")[0].decode(errors="replace")
            if prefix in (DNS, BLOCKED, OVER, OVER_TOTAL) and (
                p := parse_ip(prefix, attrs.get(NFULA_PAYLOAD, b""))
            ):
                out.append(p)
        off += (length + 3) & ~3
    return out


def _config(group: int, attrs: bytes) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body


def _ack(sock: socket.socket) -> int:
    """The error code of the kernel's answer to a config request (0: done)."""
    data = sock.recv(4096)
    if len(data) >= _NLMSG.size + 4 and _NLMSG.unpack_from(data, 0)[1] == NLMSG_ERROR:
        return -int(struct.unpack_from("=i", data, _NLMSG.size)[0])
    return 0


def bind_group(container: str) -> tuple[socket.socket, int]:
    """An NFLOG socket bound to a group no one else listens on (tried from the container's
    hash: two monitors never share one)."""
    start = int(hashlib.sha256(container.encode()).hexdigest(), 16) % GROUPS
    for i in range(64):
        group = GROUP_BASE + (start + i) % GROUPS
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        sock.send(_config(group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))))
        err = _ack(sock)
        if err == 0:
            sock.send(
                _config(
                    group, _attr(NFULA_CFG_MODE, struct.pack("!IBB", 600, NFULNL_COPY_PACKET, 0))
                )
            )
            _ack(sock)
            # Each packet at once, not batched for a second.
            sock.send(_config(group, _attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))))
            _ack(sock)
            sock.send(_config(group, _attr(NFULA_CFG_TIMEOUT, struct.pack("!I", 1))))
            _ack(sock)
            return sock, group
        sock.close()
    raise OSError("no free NFLOG group for the monitor")


def nft(script: str) -> None:
    path = nft_path()
    if path is None:
        raise OSError("nft is not installed")
    res = subprocess.run([path, "-f", "-"], input=script, capture_output=True, text=True)
    if res.returncode != 0:
        raise OSError(f"nft: {res.stderr.strip()}")


class NetGuard(NetlinkReader):
    """The sandbox's table in place and its logged packets handed to `on_packet`."""

    name = "coi-netguard"

    def __init__(
        self,
        container: str,
        device: str,
        on_packet: Callable[[Packet], None],
        *,
        cap_bytes: int,
        gateway: str,
        blocked: Iterable[str],
        allowed: Iterable[str] | None,
        set_size: int = 65535,
        owner: int | None = None,
        total_bytes: int = 0,
    ) -> None:
        """`owner`: the pid the table is named after (this process's by default)."""
        self.table = table_name(container, owner)
        # Before `tidy`: what the monitors before this one counted is carried over, so a
        # handover (detach, attach) gives no destination its whole cap again.
        carried, before = inherited(container, device, self.table)
        tidy()
        sock, self.group = bind_group(container)
        super().__init__(sock)
        self.device = device
        self.on_packet = on_packet
        self.carried = carried
        try:
            nft(
                ruleset(
                    self.table,
                    device,
                    self.group,
                    cap_bytes=cap_bytes,
                    gateway=gateway,
                    blocked=blocked,
                    allowed=allowed,
                    set_size=set_size,
                    carried=carried,
                    total_bytes=total_bytes,
                )
            )
        except OSError:
            sock.close()
            raise
        # Only now: until this table was in place, the old ones went on counting.
        for table in before:
            try:
                nft(f"delete table netdev {table}\n")
            except OSError:
                pass  # gone with the veth, or removed by another monitor meanwhile

    def handle(self, data: bytes) -> None:
        for p in parse_nflog(data):
            self.on_packet(p)

    def reset_quota(self) -> None:
        """Every destination gets its whole cap again (after the user resumed the sandbox):
        in this table and in any other monitor's left for the same sandbox (see `stop`)."""
        prefix = self.table.rsplit("-", 1)[0] + "-"
        path = nft_path()
        listing = ""
        if path is not None:
            listing = subprocess.run(
                [path, "list", "tables", "netdev"], capture_output=True, text=True
            ).stdout
        tables = {self.table} | {
            line.split()[-1]
            for line in listing.splitlines()
            if line.startswith(f"table netdev {prefix}")
        }
        for table in sorted(tables):
            for what in ("flush set netdev {} out4", "flush set netdev {} out6",
                         "flush map netdev {} carried4", "flush map netdev {} carried6",
                         "reset quota netdev {} total"):  # fmt: skip
                try:
                    nft(f"{what.format(table)}\n")
                except OSError:
                    pass  # no such map (nothing was carried), or the table is gone

    def stop(self) -> None:
        """Stop listening; the table stays while the veth is there, counts and all.

        What the sandbox sends meanwhile stays capped: a paused sandbox's sockets still hold
        what the cap kept back (1.5 to 3.7 MB of unsent data each in the attack suite), and
        the kernel keeps sending it after its processes are killed (removed while the daemon
        tore the sandbox down, the table let those megabytes out); a process `coi run`'s
        command left running sends on while the sandbox goes. And the next monitor of the
        sandbox (the service after a detach, coi after an attach) carries its counts over
        and removes it (it once started from zero: every destination had its whole cap
        again after each handover). Once the veth is gone (the kernel unhooks the table),
        `tidy` removes it (`coi run` once its sandbox is gone, and every monitor as it
        starts)."""
        super().stop()
        if os.path.exists(f"/sys/class/net/{self.device}"):
            return
        try:
            nft(f"delete table netdev {self.table}\n")
        except OSError:
            pass  # gone with the veth already
