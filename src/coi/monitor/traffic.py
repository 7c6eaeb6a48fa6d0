"""Judging what the sandbox's nft table logged (coi.monitor.netguard): over a cap, refused by
the policy, or a DNS query. Kept apart from the kernel plumbing so it is unit-tested."""

from __future__ import annotations

from collections import deque

from coi.monitor import detect
from coi.monitor.collect import Conn
from coi.monitor.detect import NetContext, Threat
from coi.monitor.netguard import BLOCKED, DNS, OVER, OVER_TOTAL, Packet

# DNS names are judged over the last minute of queries; one threat of a kind per address
# (or per kind) a minute, however many packets the kernel logs meanwhile.
DNS_WINDOW = 60.0
QUIET = 60.0


class TrafficJudge:
    """Turns logged packets into threats; keeps the little history the rules need."""

    def __init__(
        self, net: NetContext, *, cap_bytes: int, dns_threshold: int, total_bytes: int = 0
    ) -> None:
        self.net = net
        self.cap_bytes = cap_bytes
        self.total_bytes = total_bytes
        self.dns_threshold = dns_threshold
        self.refused: deque[tuple[float, str, int]] = deque(maxlen=512)
        self.names: deque[tuple[float, str]] = deque(maxlen=4096)
        self._quiet: dict[tuple[str, str], float] = {}
        self._times: dict[str, int] = {}  # address -> how often it filled its cap

    def _first(self, what: str, key: str, now: float) -> bool:
        """True at most once a minute per (what, key)."""
        if now - self._quiet.get((what, key), -1e9) <= QUIET:
            return False
        self._quiet[(what, key)] = now
        return True

    def resumed(self) -> None:
        """The user resumed the sandbox and its quotas were reset: a destination that fills
        its cap again is raised again, however soon."""
        self._quiet = {k: v for k, v in self._quiet.items() if k[0] not in ("over", "total")}

    def judge(self, p: Packet, now: float) -> list[Threat]:
        found: list[Threat] = []
        if p.kind == OVER:
            # Logged up to 20 times a second while its packets are dropped.
            if self._first("over", p.dst, now):
                # Counted, so that the next time is not taken for the same alert (deduplicated).
                times = self._times[p.dst] = self._times.get(p.dst, 0) + 1
                found.append(detect.exfil_over(p.dst, self.cap_bytes, p.proto, p.dport, times))
        elif p.kind == OVER_TOTAL:
            if self._first("total", "", now):
                found.append(detect.exfil_total(self.total_bytes, p.dst, p.proto, p.dport))
        elif p.kind == BLOCKED:
            self.refused.append((now, p.dst, p.dport))
            # The bridge's own address: only as part of a scan. coi's policy proof tries a
            # port there before the agent starts, and its SYN is retried a second later.
            if p.dst != self.net.gateway and self._first("refused", p.dst, now):
                state = "SYN_SENT" if p.proto == "tcp" else p.proto.upper()
                remote = f"{p.dst}:{p.dport}" if ":" not in p.dst else f"[{p.dst}]:{p.dport}"
                conn = Conn(p.proto, p.src, remote, state, -1)
                if t := detect.suspicious_connection(conn, self.net):
                    t.description += " (refused by the network policy)"
                    found.append(t)
            if t := detect.scan(self.refused, now):
                found.append(t)
                self.refused.clear()
        elif p.kind == DNS and (name := detect.dns_qname(p.payload)):
            self.names.append((now, name))
            while self.names and now - self.names[0][0] > DNS_WINDOW:
                self.names.popleft()
            if t := detect.dns_tunnel_names([n for _, n in self.names], DNS_WINDOW):
                found.append(t)
                self.names.clear()
            else:
                # One query carrying data, or a slow drip of them (a warning each, per domain
                # once a minute): under the tunnel rule's 20 names.
                drip = detect.dns_drip([n for _, n in self.names], DNS_WINDOW)
                for shaped in (detect.dns_data_query(name), drip):
                    if shaped and self._first(shaped.title, shaped.evidence["dns"]["domain"], now):
                        found.append(shaped)
                        break
            per_minute = float(len(self.names))  # the window is a minute
            loud = detect.dns_volume([], per_minute, self.dns_threshold)
            if loud and self._first("dns", "", now):
                found.append(loud)
        return found
