"""Turning `allowed_domains` into addresses, on the host, with a cache for when DNS is down."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.resolver

from coi.errors import UsageError
from coi.fsio import write_atomic
from coi.network.policy import Target, is_address, parse_target


@dataclass
class Resolved:
    """What an allowlist resolved to."""

    targets: list[Target] = field(default_factory=list)
    dns: dict[str, list[str]] = field(default_factory=dict)  # name -> IPv4 addresses
    warnings: list[str] = field(default_factory=list)


def make_resolver(nameserver: str, timeout: float = 5.0) -> dns.resolver.Resolver:
    """The host's resolver, or the one `network.resolver` names (`ip` or `ip:port`)."""
    if not nameserver:
        r = dns.resolver.Resolver()
    else:
        r = dns.resolver.Resolver(configure=False)
        host, _, port = nameserver.rpartition(":") if nameserver.count(":") == 1 else ("", "", "")
        r.nameservers = [host or nameserver]
        if port:
            r.port = int(port)
    r.lifetime = timeout
    return r


def lookup_with(resolver: dns.resolver.Resolver) -> Callable[[str], list[str]]:
    def lookup(name: str) -> list[str]:
        answer = resolver.resolve(name, "A")
        return sorted({r.address for r in answer})

    return lookup


def resolve_allowlist(
    entries: list[str],
    lookup: Callable[[str], list[str]],
    cache: Path | None = None,
) -> Resolved:
    """Literal addresses stay as they are; names are resolved (IPv4) on the host.

    A name that does not resolve now uses its cached addresses, else is skipped with a
    warning. :raises UsageError: nothing at all is allowed.
    """
    if not entries:
        raise UsageError(
            "allowlist mode requires at least one allowed domain",
            resolution="List them in [network] allowed_domains.",
        )
    cached = _read_cache(cache)
    out = Resolved()
    for entry in entries:
        host, port = parse_target(entry)
        if is_address(host):
            net = ipaddress.ip_network(host, strict=False)
            if net.version == 4:
                out.targets.append(Target(str(net), port))
            else:
                out.warnings.append(f"{entry}: IPv6 is blocked in sandboxes; skipped")
            continue
        name = host.rstrip(".").lower()
        try:
            addrs = lookup(name)
        except (dns.exception.DNSException, OSError) as err:
            addrs = cached.get(name, [])
            why = type(err).__name__
            out.warnings.append(
                f"{name}: could not resolve ({why})"
                + (f"; using {len(addrs)} cached address(es)" if addrs else "; skipped")
            )
        if addrs:
            out.dns[name] = addrs
            out.targets += [Target(f"{a}/32", port) for a in addrs]
    if not out.targets:
        raise UsageError(
            "failed to resolve any allowed domains",
            details="\n".join(out.warnings) or None,
            resolution="Check the names in [network] allowed_domains and the resolver.",
        )
    _write_cache(cache, out.dns)
    return out


def _read_cache(cache: Path | None) -> dict[str, list[str]]:
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text())
        return {str(k): [str(a) for a in v] for k, v in data.get("domains", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_cache(cache: Path | None, domains: dict[str, list[str]]) -> None:
    if cache is None:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        cache, json.dumps({"domains": domains}, indent=2, sort_keys=True) + "\n", mode=0o644
    )
