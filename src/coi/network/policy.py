"""Network policies as data: what a mode allows and blocks, turned into daemon ACL rules."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coi.config.schema import NETWORK_MODES
from coi.errors import UsageError

PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
# Carrier-grade NAT space is private in practice (many cloud VPCs and Tailscale use it).
SHARED_RANGE = "100.64.0.0/10"
LINK_LOCAL = "169.254.0.0/16"  # includes the cloud metadata address 169.254.169.254
MODES = NETWORK_MODES


@dataclass(frozen=True)
class Target:
    """One allowlist entry: an address range, optionally one port (tcp and udp)."""

    cidr: str
    port: int | None = None


@dataclass(frozen=True)
class Policy:
    """What a sandbox may reach. Identical policies share one bridge."""

    mode: str
    block_private: bool = True
    block_metadata: bool = True
    allow_local: bool = False
    allowed: tuple[Target, ...] = ()
    # Pinned DNS answers (allowlist): name -> addresses. Nothing else resolves.
    dns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    host_addresses: tuple[str, ...] = ()
    # The allowlist as configured: it names the bridge, so re-resolving (a CDN moved) updates
    # the same bridge's rules in place instead of making a new one.
    entries: tuple[str, ...] = ()
    # How to re-resolve while a session runs (not part of the identity).
    resolver: str = ""
    refresh_minutes: int = 0

    @property
    def key(self) -> str:
        """A short stable digest of what the user asked for: names the bridge and ACL."""
        blob = json.dumps(
            [
                self.mode,
                self.block_private,
                self.block_metadata,
                self.allow_local,
                list(self.entries),
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        """Bridge and ACL name, at most 15 characters (a Linux interface name)."""
        return f"coi-{self.key}"


def parse_target(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `1.2.3.4`, `10.0.0.0/8`, `[::1]:443` -> (host or cidr, port).

    :raises UsageError: a malformed entry or port.
    """
    text = entry.strip()
    if not text:
        raise UsageError("empty entry in network.allowed_domains")
    port: int | None = None
    host = text
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = _port(rest[1:], entry)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, entry)
    return host, port


def _port(value: str, entry: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise UsageError(
            f"invalid port in network.allowed_domains entry '{entry}'",
            resolution="Use host, host:port (1-65535), an IP or a CIDR.",
        )
    return int(value)


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_network(host, strict=False)
    except ValueError:
        return False
    return True


def blocked_ranges(policy: Policy) -> list[str]:
    """Destinations a restricted or allowlist sandbox must never reach (IPv4)."""
    out: list[str] = []
    if policy.block_private and not policy.allow_local:
        out += [*PRIVATE_RANGES, SHARED_RANGE]
    if policy.block_metadata:
        out.append(LINK_LOCAL)
    # The host itself, on every address it has, and loopback-looking tricks.
    out += [f"{a}/32" if ":" not in a else f"{a}/128" for a in policy.host_addresses]
    out.append("0.0.0.0/8")
    return sorted(set(out), key=_sort_key)


def _sort_key(cidr: str) -> tuple[int, str]:
    return (4 if ":" not in cidr else 6, cidr)


def acl_egress_rules(policy: Policy, bridge_subnet: str) -> list[dict[str, str]]:
    """The ACL's egress rules. The daemon applies reject rules before allow rules, so a
    blocked range stays blocked even inside an allowed one."""
    if policy.mode == "open":
        return []
    v4 = [c for c in blocked_ranges(policy) if ":" not in c]
    # Other sandboxes on this bridge and the bridge's own address are never reachable
    # (DNS and DHCP to the bridge are let through by the daemon before these rules).
    v4.append(bridge_subnet)
    rules = [_rule("reject", ",".join(sorted(set(v4), key=_sort_key)), "blocked ranges")]
    if policy.mode == "restricted":
        rules.append(_rule("allow", "0.0.0.0/0", "the internet"))
        return rules
    by_port: dict[int | None, list[str]] = {}
    for t in policy.allowed:
        by_port.setdefault(t.port, []).append(t.cidr)
    # Only TCP, UDP and ICMP echo reach an allowed destination: any other IP protocol (GRE,
    # SCTP, raw IP, ...) is a way around port rules and tunnels, and is dropped by the ACL's
    # default rule. The daemon's ACLs cannot bound a rate, so echo is limited by destination.
    for port, cidrs in sorted(by_port.items(), key=lambda kv: kv[0] or 0):
        dest = ",".join(sorted(set(cidrs)))
        what = "allowlist" if port is None else f"allowlist :{port}"
        for proto in ("tcp", "udp"):
            rules.append(_rule("allow", dest, what, proto, "" if port is None else str(port)))
    every = sorted({t.cidr for t in policy.allowed})
    v4_allowed = [c for c in every if ":" not in c]
    if v4_allowed:
        echo = _rule("allow", ",".join(v4_allowed), "allowlist ping", "icmp4")
        echo["icmp_type"] = "8"
        rules.append(echo)
    return rules


def _rule(
    action: str, dest: str, description: str, protocol: str = "", port: str = ""
) -> dict[str, str]:
    rule = {"action": action, "destination": dest, "state": "enabled", "description": description}
    if protocol:
        rule["protocol"] = protocol
    if port:
        rule["destination_port"] = port
    return rule


def dnsmasq_config(policy: Policy) -> str:
    """`raw.dnsmasq` for the policy's bridge.

    allowlist: the bridge answers only the pinned allowed names and forwards nothing, so a
    lookup of any other name (a DNS tunnel, say) never leaves the machine.
    """
    if policy.mode != "allowlist":
        return ""
    lines = ["no-resolv", "no-hosts"]
    for name, addrs in policy.dns:
        for a in addrs:
            lines.append(f"host-record={name},{a}")
    return "\n".join(lines)


def build_policy(
    mode: str,
    *,
    block_private: bool,
    block_metadata: bool,
    allow_local: bool,
    allowed: Iterable[Target] = (),
    dns: Mapping[str, Iterable[str]] | None = None,
    host_addresses: Iterable[str] = (),
    entries: Iterable[str] = (),
    resolver: str = "",
    refresh_minutes: int = 0,
) -> Policy:
    if mode not in MODES:
        raise UsageError(f"unknown network mode: {mode}", resolution="Use " + ", ".join(MODES))
    return Policy(
        mode=mode,
        block_private=block_private,
        block_metadata=block_metadata,
        allow_local=allow_local,
        allowed=tuple(sorted(set(allowed), key=lambda t: (t.cidr, t.port or 0))),
        dns=tuple(sorted((n, tuple(sorted(set(a)))) for n, a in (dns or {}).items())),
        host_addresses=tuple(sorted(set(host_addresses))),
        entries=tuple(sorted(set(entries))) if mode == "allowlist" else (),
        resolver=resolver,
        refresh_minutes=refresh_minutes if mode == "allowlist" else 0,
    )
