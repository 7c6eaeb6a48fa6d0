"""Allowlist mode lets out TCP, UDP and ICMP echo to allowed hosts, and no other IP protocol:
root inside sends raw GRE and SCTP packets to an allowed address; the test's host counts what
arrives. The same packets from an open sandbox do arrive, so the counters can tell."""

from __future__ import annotations

import pwd
import re
import subprocess
from pathlib import Path

import pytest
from tests import netkit
from tests.conftest import run_coi
from tests.integration.conftest import remove_containers, user_dir

from coi.backend import IncusClient

pytestmark = pytest.mark.timeout(2400)  # the first user of the coi image builds it

# Root inside writes IP packets of any protocol number itself: the kernel needs no module
# for the protocol (GRE and SCTP are not even built here).
SEND = """
import socket, subprocess, urllib.request
for proto in (47, 132):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    for _ in range(3):
        try:
            s.sendto(b"\\0" * 32, ("{host}", 0))
        except OSError as e:
            print("send", proto, e)
print("ping", subprocess.run(["ping", "-c2", "-W2", "{host}"], capture_output=True).returncode)
try:
    urllib.request.urlopen("http://{host}:8080/", timeout=5).read()
    print("http ok")
except OSError as e:
    print("http", e)
"""


def _counters(ns: str) -> dict[str, int]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "protos"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    got = {}
    for line in out.splitlines():
        m = re.search(r"comment \"(\w+)\"", line)
        n = re.search(r"counter packets (\d+)", line)
        if m and n:
            got[m.group(1)] = int(n.group(1))
    return got


def _count_protocols(ns: str) -> None:
    rules = {"gre": "meta l4proto 47", "sctp": "meta l4proto 132", "icmp": "meta l4proto icmp",
             "tcp": "meta l4proto tcp"}  # fmt: skip
    nsx = ["ip", "netns", "exec", ns, "nft"]
    subprocess.run([*nsx, "delete", "table", "inet", "protos"], capture_output=True)
    subprocess.run([*nsx, "add", "table", "inet", "protos"], check=True)
    subprocess.run(
        [
            *nsx,
            "add",
            "chain",
            "inet",
            "protos",
            "in",
            "{ type filter hook prerouting priority 0; }",
        ],
        check=True,
    )
    for name, match in rules.items():
        subprocess.run(
            [*nsx, "add", "rule", "inet", "protos", "in", *match.split(), "counter",
             "comment", f'"{name}"'],
            check=True,
        )  # fmt: skip


def _counted_run(
    client: IncusClient, ns: str, env: dict[str, str], ws: Path, mode: str, host: str
) -> tuple[dict[str, int], str]:
    """Run SEND to `host` in a `mode` sandbox on `ws`; what arrived (by protocol), its output."""
    before = _counters(ns)
    res = run_coi(
        "run", "--network", mode, "--writable-git-hooks", "-w", str(ws), "--",
        "sudo", "python3", "-c", SEND.format(host=host), env=env, timeout=300,
    )  # fmt: skip
    remove_containers(client, ws)
    assert res.returncode == 0, res.stderr
    after = _counters(ns)
    return {k: after[k] - before.get(k, 0) for k in after}, res.stdout


def test_allowlist_lets_out_tcp_udp_and_echo_and_no_other_protocol(
    client: IncusClient,
    topology: netkit.Topology,
    coi_env: dict[str, str],
    tmp_path: Path,
    coi_image: str,
    user: pwd.struct_passwd,
) -> None:
    netkit.check_routes(topology)
    _count_protocols(topology.ns)
    cfg = Path(coi_env["XDG_CONFIG_HOME"]) / "coi" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        f'[network]\nresolver = "{netkit.DNS}"\nallowed_domains = ["allowed.coi-test"]\n'
        "refresh_interval_minutes = 0\n"
    )
    env = {**coi_env, "COI_IMAGE": "coi"}
    results = {
        mode: _counted_run(
            client, topology.ns, env, user_dir(tmp_path / mode, user), mode, netkit.INTERNET
        )
        for mode in ("allowlist", "open")
    }
    allow, allow_out = results["allowlist"]
    open_, open_out = results["open"]
    # Open: every protocol arrives (the counters and the packets work).
    assert open_["gre"] >= 3 and open_["sctp"] >= 3, (open_, open_out)
    # Allowlist: echo and TCP to the allowed host arrive; GRE and SCTP do not.
    assert "ping 0" in allow_out and "http ok" in allow_out, allow_out
    assert allow["icmp"] >= 2 and allow["tcp"] > 0, allow
    assert allow["gre"] == 0 and allow["sctp"] == 0, allow


def test_restricted_keeps_the_lan_closed_to_every_protocol(
    client: IncusClient,
    topology: netkit.Topology,
    coi_env: dict[str, str],
    tmp_path: Path,
    coi_image: str,
    user: pwd.struct_passwd,
) -> None:
    """Restricted mode is "the internet, nothing private": any protocol may go out, but no
    packet of any protocol reaches a private range."""
    netkit.check_routes(topology)
    _count_protocols(topology.ns)
    env = {**coi_env, "COI_IMAGE": "coi"}
    got, out = _counted_run(
        client, topology.ns, env, user_dir(tmp_path / "r", user), "restricted", netkit.LAN
    )
    assert "ping 1" in out and "http ok" not in out, out
    assert {k: got[k] for k in ("gre", "sctp", "icmp")} == {
        "gre": 0,
        "sctp": 0,
        "icmp": 0,
    }
