"""A fixed address for each sandbox, so it is on its network the moment it starts.

DHCP in a booting container costs about a third of a second before anything can use the
network. Instead coi reserves an address for the sandbox's NIC with the daemon (`ipv4.address`,
which the daemon refuses if another NIC holds it, and which its DHCP server then hands to this
NIC only) and sets it from inside right after start. The `coi` image sets it at boot already
(`BOOT_KEY`) and runs no DHCP client; in other images the container's own DHCP client later
gets the same address and changes nothing.

Only networks whose DHCP pool leaves part of the subnet free are used this way (coi's own
bridges keep the lower half for DHCP): a reserved address can then never be one that DHCP has
already given to some other container. On any other network the sandbox waits for DHCP.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping
from dataclasses import dataclass

from coi.backend.models import Network

# The lower half of a coi bridge's subnet is its DHCP pool; the upper half is for coi.
_KEY = "ipv4.dhcp.ranges"
# The daemon puts `environment.*` keys in init's environment: the `coi` image sets the address
# at boot from this one and starts no DHCP client (images/scripts/coi-image.sh). Exec'd
# commands see it too; it is only the sandbox's own address.
BOOT_KEY = "environment.COI_ADDRESS"


@dataclass(frozen=True)
class Address:
    """A sandbox's IPv4 address on its bridge."""

    ip: str
    prefix: int
    gateway: str

    def env(self) -> dict[str, str]:
        """For the in-container script `CONFIGURE` (and the probe that starts with it)."""
        return {"ADDR": self.ip, "PREFIX": str(self.prefix), "GW": self.gateway}

    def config(self) -> dict[str, str]:
        """Instance config that hands the address to the container's init (`BOOT_KEY`)."""
        return {BOOT_KEY: f"{self.ip}/{self.prefix} {self.gateway}"}


def dhcp_pool(subnet: str) -> dict[str, str]:
    """The bridge config that keeps DHCP in the lower half of `subnet` (`10.x.y.1/24`)."""
    iface = ipaddress.IPv4Interface(subnet)
    hosts = list(iface.network.hosts())
    if len(hosts) < 8:
        return {}
    return {_KEY: f"{hosts[1]}-{hosts[len(hosts) // 2 - 1]}"}


def _gateway(net: Network) -> ipaddress.IPv4Interface | None:
    try:
        return ipaddress.IPv4Interface(net.config.get("ipv4.address", ""))
    except ValueError:
        return None  # "none", "auto" before the daemon picked one, or unset


def _dynamic(net: Network) -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]]:
    ranges = []
    for part in net.config.get(_KEY, "").split(","):
        lo, sep, hi = part.strip().partition("-")
        if not sep:
            continue
        try:
            ranges.append((ipaddress.IPv4Address(lo.strip()), ipaddress.IPv4Address(hi.strip())))
        except ValueError:
            continue
    return ranges


def candidates(net: Network) -> list[str]:
    """Addresses of `net` that DHCP never hands out (empty: this network is DHCP only)."""
    gw = _gateway(net)
    ranges = _dynamic(net)
    if gw is None or not ranges or net.type != "bridge" or not net.managed:
        return []
    return [
        str(h)
        for h in gw.network.hosts()
        if h != gw.ip and not any(lo <= h <= hi for lo, hi in ranges)
    ]


def choose(net: Network, *, avoid: set[str] | frozenset[str] = frozenset()) -> Address | None:
    """A random free-looking address on `net` (the daemon has the last word), or None."""
    free = [a for a in candidates(net) if a not in avoid]
    gw = _gateway(net)
    if not free or gw is None:
        return None
    return Address(random.choice(free), gw.network.prefixlen, str(gw.ip))


def of_nic(net: Network | None, nic: Mapping[str, str]) -> Address | None:
    """The address a container's NIC already reserves (a reused container), or None."""
    ip = nic.get("ipv4.address", "")
    gw = _gateway(net) if net is not None else None
    if not ip or gw is None:
        return None
    return Address(ip, gw.network.prefixlen, str(gw.ip))


def is_taken(err: Exception) -> bool:
    """The daemon refused the reservation because another NIC holds the address."""
    return "already defined on another NIC" in str(err)


# Run as root inside, right after start; POSIX sh and busybox alike. The DHCP client may be
# doing the same at the same moment: every step tolerates the address or route already set.
# When sandboxes start together, the daemon's DHCP server can answer before it has read the
# reservation and hand out a pool address (seen once in CI: six at once): any other address
# on eth0 is removed first, so the sandbox has the reserved one only. First, because removing
# the interface's primary address takes its secondary ones with it.
CONFIGURE = r"""
if [ -n "${ADDR:-}" ]; then
  ip link set eth0 up 2>/dev/null
  for other in $(ip -4 addr show dev eth0 2>/dev/null | awk '/inet /{print $2}'); do
    [ "${other%/*}" = "$ADDR" ] || ip addr del "$other" dev eth0 2>/dev/null
  done
  ip addr add "$ADDR/$PREFIX" dev eth0 2>/dev/null
  ip route replace default via "$GW" dev eth0 2>/dev/null
  if [ ! -L /etc/resolv.conf ] && ! grep -qs "^nameserver $GW\$" /etc/resolv.conf; then
    echo "nameserver $GW" > /etc/resolv.conf
  fi
fi
"""
