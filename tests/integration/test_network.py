"""Network policy on the real daemon, played as the agent would, against hosts the test makes.

Topology (tests/netkit.py): "the internet" 198.51.100.10, an off-allowlist internet host
198.51.100.11, the test's DNS server 198.51.100.12, "the LAN" 192.168.77.10 and a metadata
stand-in 169.254.169.254, all in a network namespace routed from the host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests import netkit
from tests.conftest import remove_unused_coi_networks, run_coi

from coi import labels
from coi.backend import IncusClient
from coi.backend.exec import ExecRequest
from coi.errors import SessionError
from coi.network import echolimit, resources
from coi.network.hostnet import host_networks
from coi.network.manager import (
    allowlist_refresh,
    ensure_network,
    gateway_of,
    prove_enforced,
    resolved,
)
from coi.network.policy import Policy, build_policy
from coi.sessions.sandbox import NIC_FILTERING

# Network policy is the daemon's firewall: both daemons must enforce it alike.
pytestmark = pytest.mark.lxd


@pytest.fixture(autouse=True)
def _workspaces_of_the_test_user(tmp_path: Path, user: pwd.struct_passwd) -> None:
    """coi runs as root here, on folders of the test user: LXD cannot map host root into a
    container, and coi refuses a root-owned workspace there."""
    os.chown(tmp_path, user.pw_uid, user.pw_gid)


@pytest.fixture
def net_env(coi_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    cfg = Path(coi_env["XDG_CONFIG_HOME"]) / "coi" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        "[network]\n"
        f'resolver = "{netkit.DNS}"\n'
        'allowed_domains = ["allowed.coi-test:8080"]\n'
        "refresh_interval_minutes = 0\n"
    )
    return {**coi_env, "COI_IMAGE": "coi-tiny"}


@pytest.fixture(autouse=True)
def _no_coi_networks_left(client: IncusClient) -> Iterator[None]:
    yield
    for inst in client.instances.list():
        if inst.name.startswith("coi-"):
            client.instances.delete(inst.name, force=True)
    remove_unused_coi_networks(client)


def probe(*targets: str) -> str:
    """Shell that prints "<target> ok" or "<target> blocked" for each HTTP target."""
    return "".join(
        f"if timeout 4 wget -q -O - http://{t}/ >/dev/null 2>&1; "
        f"then echo '{t} ok'; else echo '{t} blocked'; fi; "
        for t in targets
    )


def resolves(label: str, name: str, server: str = "") -> str:
    """Shell that prints "<label> ok" if `name` gets an A record (from `server` if given)."""
    return (
        f"timeout 4 nslookup -type=a {name} {server} >/dev/null 2>&1 "
        f"&& echo '{label} ok' || echo '{label} no'; "
    )


def _probe_run(env: dict[str, str], ws: Path, mode: str, *targets: str) -> dict[str, str]:
    res = run_coi(
        "run", "--network", mode, "--writable-git-hooks", "-w", str(ws), "--",
        "sh", "-c", probe(*targets), env=env, timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return dict(line.split() for line in res.stdout.splitlines())


def _allow_test_name(**kw: Any) -> Policy:
    """The allowlist policy a session with `allowed_domains = ["allowed.coi-test"]` gets."""
    return build_policy(
        "allowlist",
        block_private=True,
        block_metadata=True,
        allow_local=False,
        entries=["allowed.coi-test"],
        resolver=netkit.DNS,
        **kw,
    )


def _http(addr: str) -> str:
    return f"{addr}:8080"


def test_restricted_reaches_the_internet_only(
    client: IncusClient, topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    netkit.check_routes(topology)
    got = _probe_run(
        net_env, tmp_path, "restricted",
        _http(netkit.INTERNET), _http(netkit.LAN), _http(netkit.METADATA),
    )  # fmt: skip
    assert got == {
        _http(netkit.INTERNET): "ok",
        _http(netkit.LAN): "blocked",
        _http(netkit.METADATA): "blocked",
    }


def test_open_reaches_everything(
    topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    netkit.check_routes(topology)
    targets = [_http(a) for a in (netkit.INTERNET, netkit.LAN, netkit.METADATA)]
    got = _probe_run(net_env, tmp_path, "open", *targets)
    assert got == dict.fromkeys(targets, "ok")


def test_allowlist_answers_only_allowed_names_and_leaks_no_dns(
    topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    netkit.check_routes(topology)
    script = (
        resolves("name-allowed", "allowed.coi-test")
        + resolves("name-other", "other.coi-test")
        + resolves("tunnel", "tunnel-s3cr3t.allowed.coi-test")
        + resolves("foreign-resolver", "allowed.coi-test", netkit.DNS)
        + probe("allowed.coi-test:8080", _http(netkit.OTHER_INTERNET), _http(netkit.LAN))
    )
    before = topology.queries()
    res = run_coi(
        "run", "--network", "allowlist", "--writable-git-hooks", "-w", str(tmp_path), "--",
        "sh", "-c", script, env=net_env, timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = dict(line.split() for line in res.stdout.splitlines())
    assert got == {
        "name-allowed": "ok",
        "name-other": "no",
        "tunnel": "no",
        "foreign-resolver": "no",
        "allowed.coi-test:8080": "ok",
        _http(netkit.OTHER_INTERNET): "blocked",
        _http(netkit.LAN): "blocked",
    }
    # The host resolved the allowed name (coi did, before the sandbox started); nothing the
    # sandbox asked ever reached the test's DNS server.
    new = topology.queries()[len(before) :]
    assert set(new) <= {"allowed.coi-test"}, new
    assert not any("s3cr3t" in q for q in topology.queries())


def test_two_sessions_keep_their_own_policies(
    client: IncusClient, topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    netkit.check_routes(topology)
    names: dict[str, str] = {}
    for label, mode in (("restricted", "restricted"), ("open", "open"), ("peer", "restricted")):
        ws = tmp_path / label
        ws.mkdir()
        os.chown(ws, tmp_path.stat().st_uid, tmp_path.stat().st_gid)
        res = run_coi(
            "shell", "--background", "--debug", "--network", mode, "--writable-git-hooks",
            "-w", str(ws), env=net_env, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        (names[label],) = [n for n in client.instances.names() if n.startswith("coi-")
                           and n not in names.values()]  # fmt: skip
    for mode, expect in (("restricted", "blocked"), ("open", "ok")):
        res = client.exec.capture(names[mode], ExecRequest(["sh", "-c", probe(_http(netkit.LAN))]))
        assert res.stdout.decode().split() == [_http(netkit.LAN), expect], mode
    # Neither can reach the other (the open one is on another bridge, the restricted one
    # rejects private ranges).
    ip_open = client.instances.state(names["open"]).ipv4()
    res = client.exec.capture(
        names["restricted"], ExecRequest(["sh", "-c", f"timeout 4 ping -c1 -W2 {ip_open}"])
    )
    assert res.exit_code != 0
    # A second sandbox on the same restricted bridge serves HTTP; the first cannot reach it.
    peer_ip = client.instances.state(names["peer"]).ipv4()
    serve = "mkdir -p /tmp/www && echo hi > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"
    assert client.exec.quiet(names["peer"], ExecRequest(["sh", "-c", serve])) == 0
    own = client.exec.capture(names["peer"], ExecRequest(["sh", "-c", probe("127.0.0.1:8080")]))
    assert own.stdout.decode().split() == ["127.0.0.1:8080", "ok"]  # the server does serve
    res = client.exec.capture(
        names["restricted"], ExecRequest(["sh", "-c", probe(f"{peer_ip}:8080")])
    )
    assert res.stdout.decode().split() == [f"{peer_ip}:8080", "blocked"]
    assert client.exec.capture(
        names["open"], ExecRequest(["sh", "-c", probe(f"{peer_ip}:8080")])
    ).stdout.decode().split() == [f"{peer_ip}:8080", "blocked"]
    # No IPv6 beyond link-local in a restricted sandbox: nothing to leak over.
    res = client.exec.capture(names["restricted"], ExecRequest(["ip", "-6", "route"]))
    assert "default" not in res.stdout.decode()


def test_a_broken_policy_is_caught_before_the_agent_starts(
    client: IncusClient, topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    res = run_coi(
        "shell", "--background", "--debug", "--writable-git-hooks", "-w", str(tmp_path),
        env=net_env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Network policy verified" in res.stderr
    (name,) = [n for n in client.instances.names() if n.startswith("coi-")]
    network = client.instances.get(name).expanded_devices["eth0"]["network"]
    # Someone (or something) takes the ACL off the bridge: the proof must fail.
    client.networks.patch(network, {"security.acls": ""}, description="coi restricted")
    with pytest.raises(SessionError, match="NOT in force"):
        prove_enforced(client, name, network, lambda _m: None)
    client.instances.delete(name, force=True)
    # The next session repairs the bridge and proves it again.
    res = run_coi("run", "--writable-git-hooks", "-w", str(tmp_path), "--", "true", env=net_env)
    assert res.returncode == 0, res.stderr
    assert client.networks.get(network).config.get("security.acls") == network


def test_clean_removes_policy_networks_once_unused(
    client: IncusClient, topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    res = run_coi("run", "--writable-git-hooks", "-w", str(tmp_path), "--", "true", env=net_env)
    assert res.returncode == 0, res.stderr
    ours = [n.name for n in client.networks.list() if n.config.get(labels.MANAGED)]
    assert ours
    res = run_coi("clean", "--force", env=net_env)
    assert res.returncode == 0, res.stderr
    left = [n.name for n in client.networks.list() if n.config.get(labels.MANAGED)]
    assert left == [] and resources.coi_acls(client) == []
    assert json.loads(run_coi("list", "--format", "json", env=net_env).stdout) == {
        "active_containers": [],
        "pending_reviews": [],
    }


def test_allowlist_refresh_updates_the_rules_in_place(
    client: IncusClient, topology: netkit.Topology, tmp_path: Path
) -> None:
    netkit.check_routes(topology)
    policy = _allow_test_name(refresh_minutes=60)
    # First resolved while the name pointed elsewhere (a CDN that moved).
    stale, _ = resolved(policy, cache_dir=tmp_path, lookup=lambda _n: [netkit.OTHER_INTERNET])
    name, _ = ensure_network(
        client, stale, default_network="", lock_dir=tmp_path, log=lambda _m: None
    )
    assert f"{netkit.OTHER_INTERNET}/32" in str(client.networks.acl(name).egress)
    with allowlist_refresh(
        client, stale, cache_dir=tmp_path, lock_dir=tmp_path, log=lambda _m: None
    ) as wake:
        wake.set()  # what the timer does every refresh_minutes
        deadline = time.monotonic() + 20
        while f"{netkit.INTERNET}/32" not in str(client.networks.acl(name).egress):
            assert time.monotonic() < deadline, "refresh did not update the ACL"
            time.sleep(0.2)
    egress = str(client.networks.acl(name).egress)
    assert f"{netkit.OTHER_INTERNET}/32" not in egress
    assert (
        f"host-record=allowed.coi-test,{netkit.INTERNET}"
        in client.networks.get(name).config["raw.dnsmasq"]
    )


def test_a_live_connection_survives_an_allowlist_refresh(
    client: IncusClient, topology: netkit.Topology, coi_env: dict[str, str], tmp_path: Path
) -> None:
    """Rewriting the bridge's rules (a refresh that moved a name) keeps established flows."""
    netkit.check_routes(topology)
    cfg = Path(coi_env["XDG_CONFIG_HOME"]) / "coi" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        f'[network]\nresolver = "{netkit.DNS}"\nallowed_domains = ["allowed.coi-test"]\n'
        "refresh_interval_minutes = 0\n"
    )
    env = {**coi_env, "COI_IMAGE": "coi-tiny"}
    res = run_coi(
        "shell", "--background", "--debug", "--network", "allowlist", "--writable-git-hooks",
        "-w", str(tmp_path), env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (name,) = [n for n in client.instances.names() if n.startswith("coi-")]
    network = client.instances.get(name).expanded_devices["eth0"]["network"]
    # One TCP connection, open for 6 s: "one" is echoed now, "two" after the rules change.
    talk = f"(echo one; sleep 6; echo two; sleep 2) | nc {netkit.INTERNET} 7 >/tmp/echo"
    client.exec.quiet(name, ExecRequest(["sh", "-c", f"({talk}) </dev/null >/dev/null 2>&1 &"]))

    def echoed() -> list[str]:
        info = client.files.stat(name, "/tmp/echo")
        return client.files.read(name, "/tmp/echo").decode().split() if info else []

    deadline = time.monotonic() + 10
    while echoed() != ["one"]:
        assert time.monotonic() < deadline, "the echo connection never worked"
        time.sleep(0.2)
    before = str(client.networks.acl(network).egress)
    # The name moved (a CDN): same bridge, its rules rewritten while the flow is open.
    policy = _allow_test_name()
    moved, _ = resolved(
        policy, cache_dir=tmp_path, lookup=lambda _n: [netkit.INTERNET, netkit.OTHER_INTERNET]
    )
    log: list[str] = []
    assert (
        ensure_network(client, moved, default_network="", lock_dir=tmp_path, log=log.append)[0]
        == network
    )
    assert str(client.networks.acl(network).egress) != before, log
    deadline = time.monotonic() + 15
    while echoed() != ["one", "two"]:
        assert time.monotonic() < deadline, "the live connection died with the rule change"
        time.sleep(0.2)


def _sandbox(client: IncusClient, env: dict[str, str], ws: Path, *extra: str) -> str:
    """Start a detached session on `ws`; return its container's name."""
    before = set(client.instances.names())
    res = run_coi(
        "shell", "--background", "--debug", "--writable-git-hooks", "-w", str(ws), *extra,
        env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (name,) = [n for n in set(client.instances.names()) - before if n.startswith("coi-")]
    return name


def _as_root(client: IncusClient, name: str, script: str) -> tuple[int, str]:
    res = client.exec.capture(name, ExecRequest(["sh", "-c", script]))
    return res.exit_code, (res.stdout + res.stderr).decode()


def _user_ws(tmp_path: Path, label: str) -> Path:
    ws = tmp_path / label
    ws.mkdir()
    os.chown(ws, tmp_path.stat().st_uid, tmp_path.stat().st_gid)
    return ws


def test_root_inside_cannot_take_another_address_or_mac(
    client: IncusClient, topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon's filtering on the NIC, host-side: a second address, a neighbour's
    address or another MAC gets no packet out, whatever root inside configures."""
    netkit.check_routes(topology)
    attacker = _sandbox(client, net_env, _user_ws(tmp_path, "a"))
    victim = _sandbox(client, net_env, _user_ws(tmp_path, "b"))
    nic = client.instances.get(attacker).expanded_devices["eth0"]
    assert {k: nic.get(k) for k in NIC_FILTERING} == NIC_FILTERING
    own = client.instances.state(attacker).ipv4()
    theirs = client.instances.state(victim).ipv4()
    gw = gateway_of(client, nic["network"])
    prefix = own.rsplit(".", 1)[0]
    spare = next(
        f"{prefix}.{i}" for i in range(250, 200, -1) if f"{prefix}.{i}" not in (own, theirs)
    )
    ping = f"ping -c2 -W2 {netkit.INTERNET}"
    # The internet host answers the sandbox from its own address and MAC: the checks below
    # fail for the spoofing alone.
    assert _as_root(client, attacker, ping)[0] == 0
    assert _as_root(client, attacker, f"ping -c2 -W2 {theirs}")[0] != 0  # port isolation
    code, out = _as_root(client, attacker, f"ip addr add {spare}/24 dev eth0 && {ping} -I {spare}")
    assert code != 0 and "2 packets transmitted, 0 packets received" in out, out
    code, out = _as_root(client, attacker, f"ip addr add {theirs}/24 dev eth0; {ping} -I {theirs}")
    assert code != 0 and "0 packets received" in out, out
    code, out = _as_root(
        client,
        attacker,
        f"ip addr del {spare}/24 dev eth0; ip addr del {theirs}/24 dev eth0; "
        "ip link set eth0 down && ip link set eth0 address 02:00:5e:10:00:99 && "
        f"ip link set eth0 up && ip route replace default via {gw} && {ping}",
    )
    assert code != 0 and "0 packets received" in out, out


def test_ipv6_never_leaves_a_sandbox_whatever_root_inside_does(
    client: IncusClient, topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    """A ULA neighbour the test puts on the sandbox's own bridge: root inside turns IPv6 on
    and addresses it; the daemon drops every IPv6 frame of the sandbox on the bridge."""
    lan6 = "fd00:77:1::10"
    assert not any(n.overlaps(ipaddress.ip_network("fd00:77:1::/64")) for n in host_networks())
    name = _sandbox(client, net_env, _user_ws(tmp_path, "v6"))
    bridge = client.instances.get(name).expanded_devices["eth0"]["network"]
    ns, port = f"coiv6-{secrets.token_hex(3)}", f"cv6{secrets.token_hex(3)}"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(
            ["ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns],
            check=True,
        )
        subprocess.run(["ip", "link", "set", port, "master", bridge, "up"], check=True)
        nsx = ["ip", "netns", "exec", ns]
        for cmd in (
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "-6", "addr", "add", f"{lan6}/64", "dev", "eth0", "nodad"],
            ["nft", "add", "table", "ip6", "count"],
            [
                "nft",
                "add",
                "chain",
                "ip6",
                "count",
                "in",
                "{ type filter hook prerouting priority 0; }",
            ],
            [
                "nft",
                "add",
                "rule",
                "ip6",
                "count",
                "in",
                "ip6",
                "saddr",
                "fd00:77:1::/64",
                "counter",
            ],
        ):
            subprocess.run([*nsx, *cmd], check=True)
        code, out = _as_root(
            client,
            name,
            "sysctl -w net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.eth0.disable_ipv6=0; "
            "ip -6 addr add fd00:77:1::2/64 dev eth0 && sleep 2 && ip -6 addr show dev eth0; "
            f"ping -6 -c3 -W1 {lan6}",
        )
        # The address is there (the attempt is real), and nothing came back.
        assert "fd00:77:1::2/64" in out and "0 packets received" in out and code != 0, out
        counted = subprocess.run(
            [*nsx, "nft", "list", "table", "ip6", "count"], capture_output=True, text=True
        ).stdout
        assert "counter packets 0 bytes 0" in counted, counted
    finally:
        subprocess.run(["ip", "link", "del", port], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_boot_script_left_in_a_persistent_sandbox_is_blocked_from_its_first_packet(
    client: IncusClient, topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    """The agent (root) adds a boot script to its persistent container that reaches for the
    LAN as soon as the network is up; the next session's boot runs it before coi checks
    anything. The bridge's policy holds from the first packet: the internet answers the
    script, the LAN does not."""
    netkit.check_routes(topology)
    ws = _user_ws(tmp_path, "boot")
    name = _sandbox(client, net_env, ws, "--persistent")
    script = (
        "i=0; until ping -c1 -W1 " + netkit.INTERNET + " >/dev/null 2>&1 || [ $i -ge 20 ]; "
        "do i=$((i+1)); sleep 0.2; done; "
        "ping -c1 -W1 " + netkit.INTERNET + " >/dev/null 2>&1 && echo internet-ok > /root/boot; "
        f"wget -q -T 3 -O /root/lan http://{netkit.LAN}:8080/ && echo lan-ok >> /root/boot; "
        "echo done >> /root/boot"
    )
    code, out = _as_root(
        client,
        name,
        f"printf '%s\\n' '#!/bin/sh' '{script}' > /etc/init.d/reach && chmod +x /etc/init.d/reach"
        " && echo '::sysinit:/etc/init.d/reach' >> /etc/inittab && rm -f /root/boot",
    )
    assert code == 0, out
    stopped = run_coi("container", "stop", name, env=net_env, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    before = set(client.instances.names())
    res = run_coi(
        "shell", "--background", "--debug", "--writable-git-hooks", "-w", str(ws),
        "--persistent", "--slot", "1", env=net_env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert set(client.instances.names()) == before  # the same container, started again
    wait = (
        "i=0; until grep -q done /root/boot 2>/dev/null || [ $i -ge 50 ]; "
        "do i=$((i+1)); sleep 0.2; done"
    )
    code, out = _as_root(client, name, wait + "; cat /root/boot")
    assert out.split() == ["internet-ok", "done"], out
    client.instances.delete(name, force=True)


def test_icmp_echo_out_of_a_sandbox_is_rate_limited(
    client: IncusClient, topology: netkit.Topology, net_env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon's ACLs have no rate: coi setup's own table bounds echo per sandbox (a burst
    of 20, then 10 a second). The test's internet host counts the echo requests it gets."""
    netkit.check_routes(topology)
    assert echolimit.installed(), "coi setup loads the table"
    nsx = ["ip", "netns", "exec", topology.ns, "nft"]
    subprocess.run([*nsx, "delete", "table", "inet", "echo"], capture_output=True)
    for cmd in (
        ["add", "table", "inet", "echo"],
        ["add", "chain", "inet", "echo", "in", "{ type filter hook prerouting priority 0; }"],
        ["add", "rule", "inet", "echo", "in", "icmp", "type", "echo-request", "counter"],
    ):
        subprocess.run([*nsx, *cmd], check=True)
    name = _sandbox(client, net_env, _user_ws(tmp_path, "echo"))
    started = time.monotonic()
    _code, out = _as_root(client, name, f"ping -q -c 100 -i 0.01 -W 2 {netkit.INTERNET}")
    took = time.monotonic() - started
    listed = subprocess.run([*nsx, "list", "table", "inet", "echo"], capture_output=True, text=True)
    arrived = int(re.search(r"counter packets (\d+)", listed.stdout).group(1))  # type: ignore[union-attr]
    # The burst gets through (ping works), the flood does not.
    assert 20 <= arrived <= 20 + 10 * (took + 1), (arrived, took, out)
    assert "100 packets transmitted" in out, out
