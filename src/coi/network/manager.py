"""A sandbox's network: its policy's bridge and ACL (made once, shared), and proof it holds.

LXD 5.0 cannot put an ACL on one NIC, so every distinct policy gets a bridge of its own with
the ACL on the bridge; sandboxes with the same policy share it. Everything made here is
named `coi-<digest>` and marked managed, so `coi clean` removes it once nothing uses it.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from coi import labels
from coi.backend.client import IncusClient
from coi.backend.exec import ExecRequest
from coi.backend.models import Network
from coi.config.loader import Config
from coi.errors import Conflict, SessionError
from coi.locks import held
from coi.network import resources
from coi.network.address import CONFIGURE, Address, dhcp_pool
from coi.network.hostnet import free_subnet, host_addresses, host_networks
from coi.network.policy import Policy, Target, acl_egress_rules, build_policy, dnsmasq_config

Log = Callable[[str], None]


def policy_from_config(
    cfg: Config, *, cache_dir: Path, lookup: Callable[[str], list[str]] | None = None
) -> tuple[Policy, list[str]]:
    """The policy the config asks for, allowlist names resolved on the host; and warnings."""
    base = build_policy(
        cfg.get_str("network.mode"),
        block_private=cfg.get_bool("network.block_private_networks"),
        block_metadata=cfg.get_bool("network.block_metadata_endpoint"),
        allow_local=cfg.get_bool("network.allow_local_network_access"),
        entries=[str(e) for e in cfg.get_list("network.allowed_domains")],
        resolver=cfg.get_str("network.resolver"),
        refresh_minutes=cfg.get_int("network.refresh_interval_minutes"),
    )
    return resolved(base, cache_dir=cache_dir, lookup=lookup)


def resolved(
    policy: Policy, *, cache_dir: Path, lookup: Callable[[str], list[str]] | None = None
) -> tuple[Policy, list[str]]:
    """The policy with its allowlist resolved now and the host's current addresses."""
    warnings: list[str] = []
    allowed: list[Target] = []
    dns: dict[str, list[str]] = {}
    if policy.mode == "allowlist":
        # dnspython costs 130 ms to import: only allowlist sessions pay it.
        from coi.network.resolve import lookup_with, make_resolver, resolve_allowlist

        lookup = lookup or lookup_with(make_resolver(policy.resolver))
        res = resolve_allowlist(list(policy.entries), lookup, cache_dir / "allowlist.json")
        allowed, dns, warnings = res.targets, res.dns, res.warnings
    fresh = build_policy(
        policy.mode,
        block_private=policy.block_private,
        block_metadata=policy.block_metadata,
        allow_local=policy.allow_local,
        allowed=allowed,
        dns=dns,
        host_addresses=host_addresses() if policy.mode != "open" else (),
        entries=policy.entries,
        resolver=policy.resolver,
        refresh_minutes=policy.refresh_minutes,
    )
    return fresh, warnings


@contextmanager
def allowlist_refresh(
    client: IncusClient, policy: Policy | None, *, cache_dir: Path, lock_dir: Path, log: Log
) -> Iterator[threading.Event]:
    """While the block runs, re-resolve the allowlist every `refresh_minutes` and update the
    bridge's rules and DNS in place (live connections to still-allowed addresses survive).

    Yields an event; setting it asks for a refresh now (used by tests and `coi` itself).
    """
    wake, stop = threading.Event(), threading.Event()
    if policy is None or policy.mode != "allowlist" or policy.refresh_minutes <= 0:
        yield wake
        return

    def loop() -> None:
        while not stop.is_set():
            wake.wait(policy.refresh_minutes * 60)
            wake.clear()
            if stop.is_set():
                return
            try:
                fresh, _ = resolved(policy, cache_dir=cache_dir)
                ensure_network(
                    client, fresh, default_network="", lock_dir=lock_dir, log=lambda _m: None
                )
            except Exception as err:
                log(f"Warning: allowlist refresh failed: {err}")

    thread = threading.Thread(target=loop, daemon=True, name="allowlist-refresh")
    thread.start()
    try:
        yield wake
    finally:
        stop.set()
        wake.set()
        thread.join(timeout=5)


def _subnets_in_use(client: IncusClient) -> list[ipaddress.IPv4Network]:
    nets = host_networks()
    for n in client.networks.list():
        addr = n.config.get("ipv4.address", "")
        try:
            nets.append(ipaddress.IPv4Interface(addr).network)
        except ValueError:
            continue
    return nets


def ensure_network(
    client: IncusClient, policy: Policy, *, default_network: str, lock_dir: Path, log: Log
) -> tuple[str, Network | None]:
    """The network a sandbox with this policy attaches to (made or updated as needed).

    With it, the network as read here when nothing had to change (None: made or changed just
    now, or not read), so that the caller need not ask the daemon for it again.
    """
    if policy.mode == "open":
        log(f"Network mode: open (no restrictions), bridge {default_network}")
        return default_network, None
    name = policy.name
    with held(lock_dir / "network.lock"):
        net = client.networks.get(name)
        if net is None:
            subnet = free_subnet(_subnets_in_use(client))
            rules = acl_egress_rules(policy, str(ipaddress.IPv4Interface(subnet).network))
            made = False
            if client.networks.acl(name) is None:
                try:
                    client.networks.create_acl(
                        name, egress=rules, description=f"coi {policy.mode}", config=_marks(policy)
                    )
                    made = True
                except Conflict:
                    pass  # another coi made it a moment ago (its own lock folder): set it ours
            if not made:
                client.networks.update_acl(name, egress=rules, ingress=[], config=_marks(policy))
            config = {
                "ipv4.address": subnet,
                "ipv4.nat": "true",
                **dhcp_pool(subnet),
                **_enforced_config(policy),
            }
            try:
                client.networks.create(name, config=config, description=f"coi {policy.mode}")
            except Conflict:
                pass  # another coi made it a moment ago (another user, no shared lock)
            log(f"Created network {name} ({policy.mode}, {subnet})")
        elif _refresh(client, policy, net, log):
            net = None
    log(_describe(policy, name))
    return name, net


def _enforced_config(policy: Policy) -> dict[str, str]:
    """The bridge keys that carry the policy; checked and restored on every session start."""
    config = {
        "ipv6.address": "none",  # IPv6 cannot be filtered the same way here: none at all
        "security.acls": policy.name,
        "security.acls.default.egress.action": "reject",
        "security.acls.default.ingress.action": "reject",
        **_marks(policy),
    }
    if raw := dnsmasq_config(policy):
        config["raw.dnsmasq"] = raw
    return config


def _marks(policy: Policy) -> dict[str, str]:
    return {**resources.managed_config(), labels.NETWORK_MODE: policy.mode}


def _refresh(client: IncusClient, policy: Policy, net: Network, log: Log) -> bool:
    """Bring an existing policy network up to date (allowlist addresses move); whether the
    bridge's own config changed."""
    config = net.config
    subnet = str(ipaddress.IPv4Interface(config["ipv4.address"]).network)
    rules = acl_egress_rules(policy, subnet)
    acl = client.networks.acl(policy.name)
    current = [{k: v for k, v in r.items() if v} for r in acl.egress] if acl else None
    if current != rules:
        # Established connections survive: the daemon accepts them before any rule.
        if acl is None:
            client.networks.create_acl(policy.name, egress=rules, config=_marks(policy))
        else:
            client.networks.update_acl(policy.name, egress=rules, ingress=[])
        log(f"Updated the rules of {policy.name}")
    want = {**_enforced_config(policy), "raw.dnsmasq": dnsmasq_config(policy)}
    drift = {k: v for k, v in want.items() if config.get(k, "") != v}
    if not config.get("ipv4.dhcp.ranges"):
        # Bridges made before coi reserved sandbox addresses: DHCP keeps the lower half.
        drift.update(dhcp_pool(config["ipv4.address"]))
    if drift:
        client.networks.patch(policy.name, drift, description=net.description)
        log(f"Restored the policy settings of {policy.name}: {', '.join(sorted(drift))}")
    return bool(drift)


def _describe(policy: Policy, name: str) -> str:
    if policy.mode == "restricted":
        return (
            f"Network mode: restricted (internet only; private, metadata and host blocked), {name}"
        )
    return (
        f"Network mode: allowlist ({len(policy.dns)} domain(s), {len(policy.allowed)} "
        f"address rule(s); DNS answers only for allowed names), {name}"
    )


def gateway_of(client: IncusClient, network: str) -> str:
    net = client.networks.get(network)
    if net is None:
        raise SessionError(f"network {network} not found")
    return str(ipaddress.IPv4Interface(net.config["ipv4.address"]).ip)


# -- proof of enforcement -----------------------------------------------------------------

# Up to 10 s for DHCP to give the sandbox its default route; none where coi set the
# address itself (`address.CONFIGURE`, which comes first). Fresh containers pay for every
# program they start (their files are not yet in the page cache): shell built-ins where we can.
WAIT_ROUTE = r"""
if [ -z "${ADDR:-}" ]; then
  i=0; while [ $i -lt 500 ] && ! ip route 2>/dev/null | grep -q '^default'; do
    sleep 0.02; i=$((i+1)); done
fi
"""

# POSIX sh for busybox and Debian alike: a TCP connect with whatever the image has.
_PROBE = (
    CONFIGURE
    + WAIT_ROUTE
    + r"""
tcp() {
  if command -v nc >/dev/null 2>&1; then
    timeout 3 nc -w 1 "$1" "$2" </dev/null >/dev/null 2>&1; return $?
  fi
  timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1
}
# The control connect to the bridge's DNS proves the path works. Then the forbidden connect,
# in the background: the host listener counts what arrives (whatever the container says),
# and a refused connect would take a second to fail (TCP retries after an ICMP reject), so
# it is not waited for; a SYN needs far less than the 0.1 s that must pass after it (the
# sleeper) to cross the bridge. What the caller runs next (`then`) counts toward those 0.1 s.
# Subshells, not redirected function calls: dash keeps copies of the redirected fds in a
# function's children, and the daemon's exec would then wait for the output pipe to close.
# dnsmasq serves at most 20 TCP connections at once (a child each): with many sandboxes
# starting together the control connect may wait its turn, so it is tried three times.
control() { tcp "$GW" 53 || { sleep 0.2; tcp "$GW" 53; } || { sleep 0.5; tcp "$GW" 53; }; }
control || { echo control-failed; exit 3; }
( tcp "$GW" "$PORT" ) </dev/null >/dev/null 2>&1 &
( sleep 0.1 ) </dev/null >/dev/null 2>&1 &
SLEEPER=$!
"""
)
_PROBE_END = r"""
wait "$SLEEPER"
echo blocked
"""


class _Listener:
    """A TCP listener on the bridge's own address: the forbidden probe target. The kernel
    completes any handshake that gets through and queues it, so counting the queue after the
    probe catches a broken policy even if the container lies (no thread needed)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.hits = 0

    def close(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            self.hits += 1
            conn.close()
        self.sock.close()


def wait_for_network(
    client: IncusClient, container: str, address: Address | None, *, then: str = ""
) -> None:
    """Return once the sandbox has a default route (commands expect a network at start).
    `then`: more shell to run in the same exec (one round trip instead of two)."""
    env = address.env() if address else {}
    script = CONFIGURE + WAIT_ROUTE + then
    client.exec.quiet(container, ExecRequest(["sh", "-c", script], env=env))


def prove_enforced(
    client: IncusClient,
    container: str,
    network: str,
    log: Log,
    address: Address | None = None,
    *,
    then: str = "",
    tidy: bool = True,
    remote: bool = False,
) -> str:
    """From inside the sandbox: the bridge's DNS answers, a listener on the host does not.
    `remote`: the daemon is on another machine, where coi cannot listen: only the DNS half
    is proven, and the log says so.
    Returns the bridge's address (the gateway it probed). `then` runs in the same exec once
    the control connection worked, while the proof's 0.1 s pass. `tidy`: remove the daemon's
    record of the probe's output (not needed in a sandbox about to be removed anyway).

    Nothing leaves the machine: both targets are the bridge's own address.
    :raises SessionError: the policy is not in force (the agent must not start).
    """
    gw = address.gateway if address else gateway_of(client, network)
    listener = _Listener(gw) if not remote else None
    port = listener.port if listener else 9
    env = {**(address.env() if address else {}), "GW": gw, "PORT": str(port)}
    try:
        script = _PROBE + then + _PROBE_END
        # Its output only explains a failure: read then, and no websockets otherwise.
        res = client.exec.recorded(container, ExecRequest(["sh", "-c", script], env=env), tidy=tidy)
    finally:
        if listener:
            listener.close()
    out = res.stdout.decode(errors="replace").strip()
    if listener and listener.hits:
        raise SessionError(
            "network policy is NOT in force: the sandbox reached a blocked address",
            details=f"probe to {gw}:{listener.port} from {container} got through",
            resolution="Do not use this sandbox. Check 'coi health' and the daemon's firewall "
            "(nftables); run 'coi clean' and try again.",
        )
    if res.exit_code != 0:
        raise SessionError(
            "could not verify the network policy from inside the sandbox",
            details=(out + "\n" + res.stderr.decode(errors="replace")).strip() or None,
            resolution="The image needs sh, timeout and nc or bash; or use --network=open.",
        )
    if listener is None:
        log(
            f"Network policy: the remote daemon applies it (ACL {network}); DNS at {gw} "
            "reachable. Not proven from here that its host is blocked: coi cannot listen on "
            "the remote machine"
        )
        return gw
    log(f"Network policy verified: {gw}:{port} blocked, DNS at {gw} reachable")
    return gw
