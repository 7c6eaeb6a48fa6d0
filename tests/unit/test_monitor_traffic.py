"""The monitor's rules on what leaves the sandbox: the nft table it loads, the NFLOG packets
it reads, and the exfiltration, scan and DNS-tunnel judgements (pure, no kernel)."""

from __future__ import annotations

import ipaddress
import random
import secrets
import socket
import struct

from coi.monitor import detect, netguard
from coi.monitor.detect import NetContext
from coi.monitor.netguard import BLOCKED, DNS, OVER, Packet
from coi.monitor.traffic import TrafficJudge


def _ipv4(dst: str, proto: int, dport: int, payload: bytes = b"") -> bytes:
    l4 = (
        struct.pack("!HHIIBBHHH", 40000, dport, 0, 0, 0x50, 0x02, 0, 0, 0)
        if proto == 6
        else (struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0))
    )
    body = l4 + payload
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, proto, 0,
                       socket.inet_aton("10.200.0.5"), socket.inet_aton(dst))  # fmt: skip
    return head + body


def _nflog(prefix: str, packet: bytes) -> bytes:
    attrs = netguard._attr(netguard.NFULA_PREFIX, prefix.encode() + b"\0") + netguard._attr(
        netguard.NFULA_PAYLOAD, packet
    )
    body = netguard._NFGEN.pack(2, 0, 0) + attrs
    kind = netguard.NFNL_SUBSYS_ULOG << 8
    return netguard._NLMSG.pack(netguard._NLMSG.size + len(body), kind, 0, 0, 0) + body


def _query(name: str) -> bytes:
    q = b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"
    return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + q + b"\x00\x01\x00\x01"


def test_the_table_caps_each_outside_address_and_logs_refusals_and_dns() -> None:
    rules = netguard.ruleset(
        "coi-mon-x", "veth1", 23600, cap_bytes=10_000_000, gateway="10.200.0.1",
        blocked=["10.0.0.0/8", "10.200.0.1/32", "169.254.0.0/16"], allowed=None,
    )  # fmt: skip
    assert 'hook ingress device "veth1"' in rules
    assert "update @out4 { ip daddr quota over 10000000 bytes } jump over" in rules
    # Overlapping ranges are merged (nft refuses them in one set).
    assert "ip daddr { 10.0.0.0/8, 169.254.0.0/16 } limit rate" in rules
    assert 'log prefix "coi-blk" group 23600' in rules
    assert 'udp dport 53 limit rate 400/second burst 400 packets log prefix "coi-dns"' in rules
    # The bridge's DNS and DHCP are not counted; the rest of the host is refused.
    assert "ip daddr 10.200.0.1 udp dport { 53, 67 } return" in rules
    # Broadcast and multicast (DHCP, neighbour discovery) are not "sent to an address".
    assert rules.index("pkttype { broadcast, multicast } return") < rules.index("update @out4")


def test_an_allowlist_is_exempt_and_the_rest_counts_against_its_quota() -> None:
    """Not reported as refused: coi re-resolves the allowlist while the table stays, and a
    host's new address must not pause the sandbox."""
    rules = netguard.ruleset(
        "t", "veth1", 1, cap_bytes=10_000_000, gateway="10.200.0.1",
        blocked=["10.0.0.0/8"], allowed=["203.0.113.7/32"],
    )  # fmt: skip
    assert rules.index("ip daddr { 203.0.113.7/32 } return") < rules.index("update @out4")
    assert "meta protocol" not in rules
    assert (
        "quota"
        not in netguard.ruleset(
            "t", "v", 1, cap_bytes=0, gateway="", blocked=[], allowed=None
        ).split("chain egress")[1]
    )


def test_logged_packets_are_parsed_from_nflog() -> None:
    data = _nflog(BLOCKED, _ipv4("192.168.77.3", 6, 22)) + _nflog(
        DNS, _ipv4("203.0.113.5", 17, 53, _query("abc.example.com"))
    ) + _nflog("someone-else", _ipv4("1.2.3.4", 6, 80))  # fmt: skip
    a, b = netguard.parse_nflog(data)
    assert (a.kind, a.proto, a.dst, a.dport) == (BLOCKED, "tcp", "192.168.77.3", 22)
    assert (b.kind, b.proto, b.dst, b.dport) == (DNS, "udp", "203.0.113.5", 53)
    assert detect.dns_qname(b.payload) == "abc.example.com"


def test_dns_answers_and_compressed_garbage_are_not_queries() -> None:
    answer = bytearray(_query("a.example.com"))
    answer[2] |= 0x80
    assert detect.dns_qname(bytes(answer)) is None
    assert detect.dns_qname(b"\x00" * 12 + b"\xc0\x0c") is None


def _pkt(kind: str, dst: str, port: int = 0, payload: bytes = b"") -> Packet:
    return Packet(kind, "tcp" if kind != DNS else "udp", "10.200.0.5", dst, port, payload, 60)


def test_over_the_cap_is_one_high_threat_per_address_a_minute() -> None:
    judge = TrafficJudge(NetContext(), cap_bytes=10_000_000, dns_threshold=100)
    (t,) = judge.judge(_pkt(OVER, "203.0.113.9", 443), 0.0)
    assert (t.level, t.category, t.title) == ("high", "exfiltration", "Upload limit reached")
    assert judge.judge(_pkt(OVER, "203.0.113.9", 443), 0.05) == []  # the next drops
    assert judge.judge(_pkt(OVER, "203.0.113.10", 443), 0.1) != []  # another address
    assert judge.judge(_pkt(OVER, "203.0.113.9", 443), 61.0) != []
    judge.resumed()  # the quotas were reset: filled again, raised again at once
    (again,) = judge.judge(_pkt(OVER, "203.0.113.9", 443), 62.0)
    assert again.key != t.key  # not deduplicated as the same alert


def test_a_refused_attempt_raises_and_ten_distinct_targets_are_a_scan() -> None:
    net = NetContext(mode="restricted", gateway="10.200.0.1")
    judge = TrafficJudge(net, cap_bytes=0, dns_threshold=100)
    (first,) = judge.judge(_pkt(BLOCKED, "192.168.77.1", 22), 0.0)
    assert (first.title, first.level) == ("Private network access", "high")
    assert "refused" in first.description
    titles: list[str] = []
    for i in range(2, 11):
        titles += [t.title for t in judge.judge(_pkt(BLOCKED, f"192.168.77.{i}", 22), i * 0.1)]
    assert titles.count("Network scan") == 1
    assert titles.count("Private network access") == 9  # one per address


def test_the_bridge_counts_only_towards_a_scan() -> None:
    """coi's own policy proof tries one port of the bridge (and TCP retries it)."""
    judge = TrafficJudge(NetContext(gateway="10.200.0.1"), cap_bytes=0, dns_threshold=100)
    assert judge.judge(_pkt(BLOCKED, "10.200.0.1", 40123), 0.0) == []
    assert judge.judge(_pkt(BLOCKED, "10.200.0.1", 40123), 1.0) == []
    found = []
    for port in range(20, 30):
        found += judge.judge(_pkt(BLOCKED, "10.200.0.1", port), 2.0)
    assert [t.title for t in found] == ["Network scan"]


def test_a_slow_trickle_of_refusals_is_no_scan() -> None:
    assert detect.scan([(i * 5.0, f"10.0.0.{i}", 22) for i in range(12)], 60.0) is None


def test_hex_in_dns_names_is_a_tunnel_under_the_label_length_rule() -> None:
    names = [f"{secrets.token_hex(15)}.x.exfil.example.com" for _ in range(20)]
    assert all(detect._LABEL.search(n) is None for n in names)  # 30 characters a label
    t = detect.dns_tunnel_names(names, 60)
    assert t is not None and (t.level, t.title) == ("high", "DNS tunnel")
    assert t.evidence["dns"]["domain"] == "example.com"
    assert detect.dns_tunnel_names(names[:19], 60) is None  # too few to carry much
    # Base32 in 12-character labels: short labels, as much data.
    b32 = [f"{secrets.token_hex(6)}{i}.t.example.org" for i in range(40)]
    assert detect.dns_tunnel_names(b32, 60) is not None


def test_ordinary_lookups_are_no_tunnel() -> None:
    ordinary = [
        f"{h}.{d}"
        for d in ("github.com", "npmjs.org", "pypi.org", "debian.org")
        for h in ("www", "api", "registry", "files", "deb", "security", "objects", "codeload")
    ]
    words = [f"{w}{i}.cdn.example.net" for i in range(20) for w in ("static", "img")]
    assert detect.dns_tunnel_names(ordinary * 3, 60) is None
    assert detect.dns_tunnel_names(words, 60) is None
    # A page's worth of random-looking CDN hosts (14 characters each, 20 of them).
    cdn = [f"d{secrets.token_hex(7)[:13]}.cloudfront.net" for _ in range(20)]
    assert detect.dns_tunnel_names(cdn, 60) is None
    assert detect.split_name("a.b.example.co.uk") == ("a.b", "example.co.uk")


def test_dns_volume_is_a_warning_once_a_minute() -> None:
    judge = TrafficJudge(NetContext(), cap_bytes=0, dns_threshold=100)
    found = []
    for i in range(150):
        found += judge.judge(_pkt(DNS, "10.200.0.1", 53, _query(f"www.site{i % 3}.org")), i * 0.1)
    assert [t.title for t in found] == ["High DNS query volume"]
    assert found[0].level == "warning"


def test_parse_ip_takes_ipv6_too() -> None:
    src, dst = ipaddress.IPv6Address("fd00::5").packed, ipaddress.IPv6Address("fd00::1").packed
    udp = struct.pack("!HHHH", 5000, 53, 8, 0)
    pkt = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + src + dst + udp
    p = netguard.parse_ip(DNS, pkt)
    assert p is not None and (p.dst, p.dport, p.proto) == ("fd00::1", 53, "udp")


def test_tables_are_per_monitor_process_and_only_those_of_gone_sandboxes_are_removed() -> None:
    """A table left by a monitor that stopped or died still caps its running sandbox, until
    the next monitor carries its counts over: only a table whose NIC is gone is stale."""
    assert netguard.table_name("coi-abc-1", 42) != netguard.table_name("coi-abc-1", 43)
    assert netguard.table_name("coi-abc-1", 42).endswith("-42")

    def chain(device: str) -> str:
        return (
            "\tchain egress {\n"
            f'\t\ttype filter hook ingress device "{device}" priority -100; policy accept;\n'
            "\t}\n}\n"
        )

    listing = (
        "table netdev coi-mon-0123456789ab-42 {\n" + chain("veth1")  # its monitor died
        + "table netdev coi-mon-0123456789ab-43 {\n" + chain("veth2")  # alive, NIC there
        + "table netdev coi-mon-0123456789ab-44 {\n" + chain("veth3")  # kept, sandbox gone
        + "table netdev someone-else-45 {\n" + chain("veth4")  # not coi's
    )  # fmt: skip
    stale = netguard.remove_stale(listing, lambda dev: dev != "veth3")
    assert stale == ["coi-mon-0123456789ab-44"]


# `nft -j list table` of a monitor's table (nft 1.0.6, trimmed): one destination counted
# in the dynamic set, one carried from a monitor before (its named quota), one over its cap.
_LISTED = """{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
{"table": {"family": "netdev", "name": "coi-mon-x-7", "handle": 5}},
{"quota": {"family": "netdev", "name": "c0", "table": "coi-mon-x-7", "handle": 3,
  "bytes": 1000000, "used": 400000, "inv": true}},
{"map": {"family": "netdev", "name": "carried4", "table": "coi-mon-x-7", "type": "ipv4_addr",
  "handle": 4, "map": "quota", "elem": [["203.0.113.9", "c0"]]}},
{"set": {"family": "netdev", "name": "out4", "table": "coi-mon-x-7", "type": "ipv4_addr",
  "handle": 5, "size": 65535, "elem": [
  {"elem": {"val": "198.51.100.7", "quota": {"val": 1000000, "val_unit": "bytes", "inv": true,
    "used": 684, "used_unit": "bytes"}}},
  {"elem": {"val": "198.51.100.8", "quota": {"val": 1000000, "val_unit": "bytes", "inv": true,
    "used": 2, "used_unit": "mbytes"}}}]}},
{"set": {"family": "netdev", "name": "out6", "table": "coi-mon-x-7", "type": "ipv6_addr",
  "handle": 6, "size": 65535}}]}"""


def test_what_a_table_counted_is_read_back_for_the_next_monitor() -> None:
    assert netguard.used_bytes(_LISTED) == {
        "203.0.113.9": 400_000,
        "198.51.100.7": 684,
        "198.51.100.8": 2 << 20,
    }
    total = _LISTED.replace(
        '{"table":',
        '{"quota": {"family": "netdev", "name": "total", "table": "coi-mon-x-7", "handle": 9, '
        '"bytes": 5000000, "used": 1234567, "inv": true}},\n{"table":',
    )
    assert netguard.used_bytes(total)[netguard.TOTAL] == 1_234_567


def test_a_total_cap_counts_what_every_destination_let_through() -> None:
    """9 MB to each of many addresses stayed under the per-destination cap: the total cap
    counts them all together, after each one's own cap (what that dropped is not counted),
    and starts at what the monitors before counted."""
    rules = netguard.ruleset(
        "t", "veth1", 7, cap_bytes=1000, gateway="", blocked=["10.0.0.0/8"], allowed=None,
        carried={netguard.TOTAL: 700, "203.0.113.9": 5}, total_bytes=3000,
    )  # fmt: skip
    assert "quota total { over 3000 bytes used 700 bytes }" in rules
    total = 'meta protocol { ip, ip6 } quota name "total" jump overall'
    assert rules.index("ip6 daddr != @out6 jump over") < rules.index(total)
    assert rules.index("ip daddr { 10.0.0.0/8 } return") < rules.index(total)
    assert 'log prefix "coi-exft" group 7' in rules.split("chain overall")[1]
    plain = netguard.ruleset("t", "v", 1, cap_bytes=1000, gateway="", blocked=[], allowed=None)
    assert "total" not in plain
    judge = TrafficJudge(NetContext(), cap_bytes=1000, dns_threshold=100, total_bytes=3000)
    over = _pkt(netguard.OVER_TOTAL, "203.0.113.12", 443)
    found = judge.judge(over, 1.0) + judge.judge(over, 2.0)  # logged 20 a second: one alert
    assert [(t.level, t.title) for t in found] == [("high", "Total upload limit reached")]
    assert found[0].evidence["network"]["total_bytes"] == 3000
    judge.resumed()
    assert judge.judge(over, 3.0)


def test_carried_counts_start_the_next_table_where_the_last_one_was() -> None:
    """Each carried destination has a named quota started at what it used (at most the cap:
    over it, its next packet is dropped), looked up before the dynamic sets, which it never
    enters; nothing carried, nothing added."""
    rules = netguard.ruleset(
        "t", "veth1", 1, cap_bytes=1000, gateway="", blocked=[], allowed=None,
        carried={"203.0.113.9": 684, "2001:db8::1": 5000, "not-an-address": 3, "198.51.100.1": 0},
    )  # fmt: skip
    assert "quota c0 { over 1000 bytes used 684 bytes }" in rules
    assert "quota c1 { over 1000 bytes used 1000 bytes }" in rules
    assert 'elements = { 203.0.113.9 : "c0" }' in rules and '2001:db8::1 : "c1"' in rules
    assert "198.51.100.1" not in rules and "not-an-address" not in rules
    lookup = "ip daddr @carried4 quota name ip daddr map @carried4 jump over"
    assert rules.index(lookup) < rules.index("ip daddr != @carried4 update @out4")
    # Not in the dynamic sets, and so not taken for "an address the full set cannot hold".
    assert "ip daddr != @carried4 ip daddr != @out4 jump over" in rules
    plain = netguard.ruleset("t", "v", 1, cap_bytes=1000, gateway="", blocked=[], allowed=None)
    assert "carried" not in plain and "quota c" not in plain
    many = {f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}": i + 1 for i in range(5000)}
    capped = netguard.ruleset(
        "t", "v", 1, cap_bytes=10**9, gateway="", blocked=[], allowed=None, carried=many
    )
    assert capped.count("quota c") == netguard.MAX_CARRIED  # those that sent the most
    assert "used 5000 bytes" in capped and "used 1 bytes" not in capped


def test_one_query_carrying_data_is_a_warning_and_host_names_are_not() -> None:
    long_hex = "3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b99"
    t = detect.dns_data_query(f"{long_hex}.t.coi-test")
    assert t is not None and (t.level, t.title) == ("warning", "DNS tunnel-shaped query")
    b32 = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwey3e"  # base32, 48 characters
    assert detect.dns_data_query(f"{b32}.x.example.org") is not None
    for name in (
        "internal-my-application-loadbalancer-1234567890.us-east-1.elb.amazonaws.com",
        "thisisaverylongsubdomainnamewithoutanydigitsatall.example.com",
        "ip-10-0-12-34-ec2-internal-compute-us-west-2.compute.internal",
        "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6.r2.cloudflarestorage.com",  # 32: an account id
        "registry.npmjs.org",
        f"{long_hex}.com",  # the domain itself is not a query's data
    ):
        assert detect.dns_data_query(name) is None, name


def test_a_slow_drip_of_data_labels_is_a_warning_once_a_minute() -> None:
    judge = TrafficJudge(NetContext(), cap_bytes=0, dns_threshold=100)
    found = []
    for i in range(15):  # 2.5 a second: under the tunnel rule's 20 names
        name = f"{secrets.token_hex(15)}.t.coi-test"
        found += judge.judge(_pkt(DNS, "10.200.0.1", 53, _query(name)), i * 0.4)
    assert [t.title for t in found] == ["DNS tunnel-shaped queries"]
    assert found[0].level == "warning" and found[0].evidence["dns"]["names"] == 8
    # Ordinary lookups, and a page of CDN hosts, under one domain: nothing.
    judge2 = TrafficJudge(NetContext(), cap_bytes=0, dns_threshold=1000)
    ordinary = [f"d{secrets.token_hex(7)[:13]}.cloudfront.net" for _ in range(20)]
    ordinary += [f"{w}{i}.cdn.example.net" for i in range(10) for w in ("static", "img")]
    ordinary += [f"{r}.s3.{z}.amazonaws.com" for r in ("my-bucket", "logs-2024") for z in
                 ("us-east-1", "eu-west-1", "ap-southeast-2")]  # fmt: skip
    found = []
    for i, name in enumerate(ordinary):
        found += judge2.judge(_pkt(DNS, "10.200.0.1", 53, _query(name)), i * 0.1)
    assert found == []


def test_data_labels() -> None:
    assert detect.data_label("3f9a1c07b2e84d6a5c0f1e92")
    assert not detect.data_label("3f9a1c07b2e84d6a5c0f1e")  # too short to say
    # Random hex of 24 characters, seeded (a label now and then is nearly all digits or
    # repeats itself: the tunnel rule judges the volume of names, not one).
    rng = random.Random(25)
    labels = [f"{rng.getrandbits(96):024x}" for _ in range(500)]
    assert sum(map(detect.data_label, labels)) >= 0.9 * len(labels)  # 94 % with this seed
    assert not detect.data_label("0123456789" * 3)  # a counter, not data
    assert not detect.data_label("abcdefabcdefabcdefabcdefabcdef")  # no digits
