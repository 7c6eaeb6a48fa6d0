"""What the host's own network looks like: subnets in use, its addresses, free subnets."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

from coi.errors import SessionError


def host_networks() -> list[ipaddress.IPv4Network]:
    """Networks in use on the host: routes, addresses and the resolver."""
    nets: list[ipaddress.IPv4Network] = []
    out = subprocess.run(
        ["ip", "-4", "-o", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    out += subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False
    ).stdout
    for tok in out.split():
        try:
            net = ipaddress.ip_network(tok, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
            nets.append(net)
    resolv = Path("/etc/resolv.conf")
    if resolv.exists():
        for line in resolv.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    nets.append(ipaddress.IPv4Network(parts[1] + "/32"))
                except ValueError:
                    pass
    return nets


def host_addresses() -> list[str]:
    """Every IPv4 address of the host (a sandbox must not reach the host on any of them)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    addrs: list[str] = []
    try:
        for link in json.loads(out or "[]"):
            for a in link.get("addr_info", []):
                if a.get("family") == "inet" and not str(a.get("local", "")).startswith("127."):
                    addrs.append(str(a["local"]))
    except (ValueError, KeyError, TypeError):
        return []
    return sorted(set(addrs))


def free_subnet(in_use: list[ipaddress.IPv4Network]) -> str:
    """A /24 for a policy bridge, from 10.200.0.0/16 upward, clear of everything in use.

    :raises SessionError: none is free.
    """
    for second in range(200, 255):
        for third in range(256):
            net = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
            if not any(net.overlaps(u) for u in in_use):
                return f"10.{second}.{third}.1/24"
    raise SessionError("no free private /24 left for a coi network")
