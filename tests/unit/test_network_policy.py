"""Network policies as data: ACL rules, DNS pinning, allowlist parsing and resolution."""

from __future__ import annotations

import dns.exception
import pytest

from coi.errors import UsageError
from coi.network.policy import (
    Target,
    acl_egress_rules,
    build_policy,
    dnsmasq_config,
    parse_target,
)
from coi.network.resolve import resolve_allowlist


def _policy(mode: str, **kw: object):  # type: ignore[no-untyped-def]
    args = {"block_private": True, "block_metadata": True, "allow_local": False, **kw}
    return build_policy(mode, **args)  # type: ignore[arg-type]


def test_restricted_rejects_private_metadata_host_and_the_bridge_then_allows_the_rest() -> None:
    p = _policy("restricted", host_addresses=["192.0.2.2", "10.123.45.1"])
    reject, allow = acl_egress_rules(p, "10.200.0.0/24")
    blocked = reject["destination"].split(",")
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                 "100.64.0.0/10", "192.0.2.2/32", "10.200.0.0/24"):  # fmt: skip
        assert cidr in blocked
    assert reject["action"] == "reject" and allow == {
        "action": "allow",
        "destination": "0.0.0.0/0",
        "state": "enabled",
        "description": "the internet",
    }


def test_allow_local_keeps_metadata_host_and_other_sandboxes_blocked() -> None:
    p = _policy("restricted", allow_local=True, host_addresses=["192.0.2.2"])
    blocked = acl_egress_rules(p, "10.200.0.0/24")[0]["destination"].split(",")
    assert "10.0.0.0/8" not in blocked
    assert {"169.254.0.0/16", "192.0.2.2/32", "10.200.0.0/24"} <= set(blocked)


def test_allowlist_rules_ports_and_pinned_dns() -> None:
    p = _policy(
        "allowlist",
        allowed=[Target("198.51.100.10/32", 443), Target("203.0.113.0/24", None)],
        dns={"api.example": ["198.51.100.10"]},
        entries=["api.example:443", "203.0.113.0/24"],
    )
    rules = acl_egress_rules(p, "10.200.1.0/24")
    assert rules[0]["action"] == "reject"
    # TCP, UDP and ICMP echo only: no allow rule without a protocol (GRE, SCTP, ... drop).
    assert all(r.get("protocol") for r in rules[1:])
    whole = [r for r in rules if r["destination"] == "203.0.113.0/24"]
    assert {(r["protocol"], r.get("destination_port")) for r in whole} == {
        ("tcp", None),
        ("udp", None),
    }
    ported = [r for r in rules if r.get("destination_port") == "443"]
    assert {r["protocol"] for r in ported} == {"tcp", "udp"}
    (echo,) = [r for r in rules if r.get("protocol") == "icmp4"]
    assert echo["icmp_type"] == "8"
    assert set(echo["destination"].split(",")) == {"198.51.100.10/32", "203.0.113.0/24"}
    assert not any(r["destination"] == "0.0.0.0/0" for r in rules)
    assert dnsmasq_config(p).splitlines() == [
        "no-resolv",
        "no-hosts",
        "host-record=api.example,198.51.100.10",
    ]
    assert dnsmasq_config(_policy("restricted")) == ""
    assert acl_egress_rules(_policy("open"), "10.0.0.0/24") == []


def test_policy_name_follows_the_request_not_the_resolution() -> None:
    a = _policy("allowlist", entries=["x.example"], dns={"x.example": ["198.51.100.1"]})
    b = _policy("allowlist", entries=["x.example"], dns={"x.example": ["198.51.100.2"]})
    assert a.name == b.name and len(a.name) <= 15
    assert a.name != _policy("allowlist", entries=["y.example"]).name
    assert _policy("restricted").name != _policy("restricted", allow_local=True).name
    with pytest.raises(UsageError, match="unknown network mode: bogus"):
        _policy("bogus")


def test_parse_target() -> None:
    assert parse_target("api.example.com") == ("api.example.com", None)
    assert parse_target("api.example.com:443") == ("api.example.com", 443)
    assert parse_target("10.0.0.0/8") == ("10.0.0.0/8", None)
    assert parse_target("[2001:db8::1]:443") == ("2001:db8::1", 443)
    for bad in ("host:0", "host:99999", "host:http", ""):
        with pytest.raises(UsageError):
            parse_target(bad)


def test_resolve_allowlist_uses_cache_when_dns_fails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "allowlist.json"
    ok = resolve_allowlist(["a.example:443", "198.51.100.7"], lambda n: ["198.51.100.1"], cache)
    assert Target("198.51.100.1/32", 443) in ok.targets
    assert Target("198.51.100.7/32", None) in ok.targets

    def broken(_name: str) -> list[str]:
        raise dns.exception.Timeout

    again = resolve_allowlist(["a.example:443"], broken, cache)
    assert again.dns == {"a.example": ["198.51.100.1"]} and "cached" in again.warnings[0]
    with pytest.raises(UsageError, match="failed to resolve any allowed domains"):
        resolve_allowlist(["b.example"], broken, cache)
    with pytest.raises(UsageError, match="requires at least one allowed domain"):
        resolve_allowlist([], broken, cache)
