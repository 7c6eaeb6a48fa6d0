"""coi on a three-member Incus cluster (tests/clusterkit.py), reached only over HTTPS: the
scheduler places sandboxes, `--target` chooses a member, `coi list` shows it, restricted mode
blocks the test's LAN host on every member, `coi clean` leaves nothing on any member, the
max_duration watchdog and the keeper end sandboxes on a member coi does not talk to, and
`coi health` lists the members and warns of one that is not online."""

from __future__ import annotations

import getpass
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests import clusterkit, remotekit
from tests.conftest import coi_argv, run_coi

from coi.errors import Conflict

pytestmark = pytest.mark.cluster

PROJECT = f"coi-{getpass.getuser()}"
# From inside a sandbox: one TCP connect to the LAN host's listener, and what came of it.
PROBE = (
    f"if nc -w 2 {clusterkit.LAN} {clusterkit.LAN_PORT} </dev/null >/dev/null 2>&1; "
    "then echo reached; else echo shut; fi"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, cluster: clusterkit.Cluster) -> dict[str, str]:
    """A user of their own, with the cluster added as remote 'c' through its second member
    (any member answers for the whole cluster)."""
    return clusterkit.user_env(cluster, tmp_path_factory.mktemp("user"))


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("from the host\n")
    return ws


def _coi(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return run_coi("--remote", "c", *args, env=env, timeout=timeout)


def _volumes_on(cluster: clusterkit.Cluster, member: str) -> list[str]:
    """coi's custom volumes in a member's own pool folder (a dir pool: custom/PROJECT_NAME;
    the user's project keeps its volumes in the default project's)."""
    custom = cluster.member(member).root / "pool" / "custom"
    found = custom.iterdir() if custom.exists() else ()
    return [v.name for v in found if v.name.partition("_")[2].startswith("coi-")]


def _memory_limit(pid: int) -> int:
    """The memory limit of the cgroup process `pid` is in (cgroup v1's memory controller or
    v2's unified tree, whichever this machine has)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            limit = Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
            return int(limit.read_text())
    path = next(line.split("::", 1)[1] for line in lines if line.startswith("0::"))
    return int(Path(f"/sys/fs/cgroup{path}/memory.max").read_text())


def _listed(env: dict[str, str]) -> list[dict[str, object]]:
    out = _coi(env, "list", "--format", "json")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)["active_containers"])


def test_the_scheduler_spreads_shells_and_list_shows_the_member(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """Three background shells on an empty cluster: its scheduler (fewest instances first)
    puts one on each member; coi list says where, as the cluster itself does."""
    names = []
    for _ in range(3):
        bg = _coi(env, "shell", "--background", "--network", "open", "-w", str(ws))
        assert bg.returncode == 0, bg.stderr
    listed = _listed(env)
    names = [str(c["name"]) for c in listed if c["kind"] == "shell"]
    assert len(names) == 3, listed
    where = cluster.locations(PROJECT)
    assert {str(c["name"]): c["location"] for c in listed} == {n: where[n] for n in names}
    assert sorted(where[n] for n in names) == cluster.names
    # Each runs where the cluster says: in that member's own directory.
    for n in names:
        assert n in cluster.on_member(where[n], PROJECT)
    text = _coi(env, "list").stdout
    for n in names:
        assert f"Member: {where[n]}" in text.split(n, 1)[1].split("\n  coi-", 1)[0]
    # coi kill removes them wherever they are.
    killed = _coi(env, "kill", "--force", *names)
    assert killed.returncode == 0, killed.stderr
    assert [c for c in cluster.locations(PROJECT) if c in names] == []


def test_target_places_a_run_and_a_shell_on_the_member(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """`--target`: the sandbox is made on that member. For `coi run` (gone when it ends) the
    proof is where its connection to the LAN host came from: each member NATs its sandboxes
    to its own hub address."""
    before = len(cluster.lan_peers())
    res = _coi(env, "run", "--target", "m3", "--network", "open", "-w", str(ws), "--",
               "sh", "-c", f"cat /workspace/notes.txt; {PROBE}")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["from", "the", "host", "reached"]
    assert cluster.lan_peers()[before:] == [cluster.member("m3").daemon_addr]
    bg = _coi(env, "shell", "--background", "--target", "m1", "--network", "open",
              "--limit-memory", "256MiB", "-w", str(ws))  # fmt: skip
    assert bg.returncode == 0, bg.stderr
    (name,) = [str(c["name"]) for c in _listed(env) if c["kind"] == "shell"]
    assert cluster.locations(PROJECT)[name] == "m1"
    assert name in cluster.on_member("m1", PROJECT)
    # Its limit is in force where it runs: the kernel's, read from its init's cgroup.
    with cluster.members[0].admin(PROJECT) as c:
        pid = c.instances.state(name).pid
    assert _memory_limit(pid) == 256 * 2**20
    assert _coi(env, "kill", "--force", name).returncode == 0


def test_container_launch_and_the_sdk_take_a_target(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """Placement wherever coi makes a container: `coi container launch --target` and the
    SDK's `sandbox(target=...)` (its run proven by where its connection came from)."""
    launched = _coi(env, "container", "launch", "coi-tiny", "box-t", "--target", "m3")
    assert launched.returncode == 0, launched.stderr
    assert cluster.locations(PROJECT)["box-t"] == "m3"
    assert _coi(env, "container", "delete", "box-t", "--force").returncode == 0
    wrong = _coi(env, "container", "launch", "coi-tiny", "box-u", "--target", "m0")
    assert wrong.returncode == 2 and "no member of that name" in wrong.stderr, wrong.stderr
    before = len(cluster.lan_peers())
    script = (
        "import sys, coi\n"
        "with coi.connect() as c, c.sandbox(sys.argv[1], target='m2', network='open') as sb:\n"
        f"    print(sb.run({PROBE!r}).stdout, end='')\n"
    )
    sdk = subprocess.run(
        [sys.executable, "-c", script, str(ws)], env={**env, "COI_REMOTE": "c"},
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.strip() == "reached"
    assert cluster.lan_peers()[before:] == [cluster.member("m2").daemon_addr]
    # Closed: stopped at once, the (ephemeral) container's removal follows by itself.
    end = time.monotonic() + 60
    while cluster.locations(PROJECT):
        assert time.monotonic() < end, cluster.locations(PROJECT)
        time.sleep(0.3)


def test_a_persistent_sandbox_stays_on_its_member_and_says_so(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """A stopped persistent sandbox is reused where it is; a --target naming another member
    is said not to apply (not silently ignored)."""
    first = _coi(env, "shell", "--background", "--persistent", "--slot", "1", "--target", "m2",
                 "--network", "open", "-w", str(ws))  # fmt: skip
    assert first.returncode == 0, first.stderr
    (name,) = [str(c["name"]) for c in _listed(env) if c["kind"] == "shell"]
    assert cluster.locations(PROJECT)[name] == "m2"
    down = _coi(env, "container", "stop", name)
    assert down.returncode == 0, down.stderr
    assert cluster.locations(PROJECT)[name] == "m2"  # persistent: stopped and kept
    again = _coi(env, "shell", "--background", "--persistent", "--slot", "1", "--target", "m3",
                 "--network", "open", "-w", str(ws))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"the persistent sandbox {name} is on member m2, not m3" in again.stderr, again.stderr
    assert cluster.locations(PROJECT) == {name: "m2"}
    assert _coi(env, "kill", "--force", name).returncode == 0
    assert cluster.locations(PROJECT) == {}


def _audit(env: dict[str, str], name: str) -> list[dict[str, object]]:
    """The audit events this machine's coi (or its detached helpers) wrote for `name`."""
    path = Path(env["COI_HOME"]) / "audit" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _helpers_of(name: str) -> list[str]:
    """coi's detached helpers (keeper, watchdog) still running for sandbox `name`."""
    out = subprocess.run(["pgrep", "-af", "coi.sessions.keeper|coi.limits.watchdog"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return [line for line in out.splitlines() if f" {name} " in line]


def _wait(what: str, done: Callable[[], bool], within: float = 60) -> None:
    end = time.monotonic() + within
    while not done():
        assert time.monotonic() < end, f"{what}: not within {within} s"
        time.sleep(0.3)


def test_the_time_limit_stops_a_run_on_a_member_coi_does_not_talk_to(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """max_duration on m3 (coi talks to m2): the watchdog's stop, forwarded by m2, ends the
    sandbox where it runs. `sleep 600` under a 240 s timeout: only the limit ends it in time."""
    res = _coi(env, "run", "--target", "m3", "--network", "open", "--limit-duration", "5s",
               "-w", str(ws), "--", "sleep", "600")  # fmt: skip
    assert res.returncode == 124, res.stderr
    assert "[limits] Container will auto-stop after 5s" in res.stderr
    assert "[limits] Stopped: max_duration 5s reached" in res.stderr
    (name,) = [line.split()[2] for line in res.stderr.splitlines()
               if line.startswith("Launching container ")]  # fmt: skip
    # The watchdog (not coi run's own clock) stopped it: its audit event says so (written
    # once the daemon's stop returns, which may be after coi run saw its command end).
    _wait("the watchdog's audit event", lambda: bool(_audit(env, name)))
    assert [e["title"] for e in _audit(env, name)] == ["Time limit reached"]
    assert cluster.locations(PROJECT) == {}
    assert name not in cluster.on_member("m3", PROJECT)
    _wait("the watchdog to end", lambda: not _helpers_of(name))


def test_the_time_limit_stops_a_background_shell_on_another_member(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """coi has exited (a background shell on m1, coi talks to m2): its watchdog alone stops
    the sandbox."""
    bg = _coi(env, "shell", "--background", "--target", "m1", "--network", "open",
              "--limit-duration", "5s", "-w", str(ws))  # fmt: skip
    assert bg.returncode == 0, bg.stderr
    (name,) = [str(c["name"]) for c in _listed(env) if c["kind"] == "shell"]
    assert cluster.locations(PROJECT)[name] == "m1"
    with cluster.members[0].admin(PROJECT) as c:
        _wait("the time limit to stop it", lambda: not c.instances.get(name).running)
    assert cluster.locations(PROJECT) == {name: "m1"}  # stopped where it ran (a shell's is kept)
    _wait("the watchdog's audit event", lambda: bool(_audit(env, name)))
    assert [e["title"] for e in _audit(env, name)] == ["Time limit reached"]
    _wait("the watchdog to end", lambda: not _helpers_of(name))
    assert _coi(env, "kill", "--force", name).returncode == 0
    assert cluster.locations(PROJECT) == {}


def test_a_killed_coi_run_on_another_member_is_ended_by_its_keeper(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """kill -9 of `coi run` whose sandbox runs on m3 (coi talks to m2): its keeper, seeing
    coi gone, stops it through m2; the (ephemeral) sandbox is gone from m3."""
    argv = coi_argv("--remote", "c", "run", "--target", "m3", "--network", "open", "-w",
                    str(ws), "--", "sleep", "600")  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait("the sandbox to run on m3", lambda: "m3" in cluster.locations(PROJECT).values(),
              within=120)  # fmt: skip
        (name,) = cluster.locations(PROJECT)
        with cluster.members[0].admin(PROJECT) as c:
            _wait("its command to run", lambda: c.instances.get(name).running)
        assert _helpers_of(name)  # its keeper is there, watching
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    _wait("the keeper to end the sandbox", lambda: not cluster.locations(PROJECT))
    assert name not in cluster.on_member("m3", PROJECT)
    _wait("the keeper's audit event", lambda: bool(_audit(env, name)))
    assert [e["title"] for e in _audit(env, name)] == ["Owner gone"]
    _wait("the keeper to end", lambda: not _helpers_of(name))


def _members_state(cluster: clusterkit.Cluster, member: str, action: str) -> None:
    """Evacuate or restore a member (the cluster's own maintenance: no sandbox is on it)."""
    with cluster.members[0].admin() as c:
        c.request("POST", f"/1.0/cluster/members/{member}/state", json={"action": action})


def test_health_lists_the_members_and_warns_of_one_not_online(
    cluster: clusterkit.Cluster, env: dict[str, str]
) -> None:
    """coi health on a cluster: a line with each member's status, as the cluster says; an
    evacuated member is a warning (text and JSON) until it is restored."""
    assert cluster.locations(PROJECT) == {}
    first = _coi(env, "health", "--format", "json")
    doc = json.loads(first.stdout)
    assert doc["backend"]["clustered"] is True
    assert doc["checks"]["cluster"]["status"] == "ok", doc["checks"]["cluster"]
    assert doc["checks"]["cluster"]["message"] == "3 members online: m1, m2, m3"
    _members_state(cluster, "m3", "evacuate")
    try:
        text = _coi(env, "health")
        assert text.returncode in (1, 2), text.stdout  # degraded at least
        line = next(x for x in text.stdout.splitlines() if "Cluster" in x)
        assert line.startswith("  [WARN] Cluster"), text.stdout
        assert "m3 evacuated" in line and "2 of 3 members online" in line, line
        assert "'incus cluster restore m3' brings it back" in text.stdout
        doc = json.loads(_coi(env, "health", "--format", "json").stdout)
        check = doc["checks"]["cluster"]
        assert check["status"] == "warning"
        assert [(m["name"], m["status"]) for m in check["details"]["members"]] == [
            ("m1", "online"), ("m2", "online"), ("m3", "evacuated"),
        ]  # fmt: skip
    finally:
        _members_state(cluster, "m3", "restore")
    doc = json.loads(_coi(env, "health", "--format", "json").stdout)
    assert doc["checks"]["cluster"]["status"] == "ok", doc["checks"]["cluster"]


def test_a_wrong_target_is_refused_before_anything_is_made(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    before = cluster.locations(PROJECT)
    bad = _coi(env, "run", "--target", "m9", "-w", str(ws), "--", "true")
    assert bad.returncode == 2, bad.stderr
    assert "--target m9: the cluster has no member of that name" in bad.stderr
    assert "Its members: m1, m2, m3" in bad.stderr
    assert cluster.locations(PROJECT) == before
    # The local daemon is not a cluster: --target there is a mistake, said so.
    local = run_coi("--remote", "local", "run", "--target", "m1", "-w", str(ws), "--", "true",
                    env=env, timeout=120)  # fmt: skip
    assert local.returncode == 2, local.stderr
    assert "--target m1: the daemon is not a cluster" in local.stderr


def test_restricted_mode_blocks_the_lan_host_on_every_member(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """On each member, a restricted sandbox cannot reach the LAN host (nothing arrives
    there), and an open one can (so the probe can tell)."""
    clusterkit.check_routes(cluster)
    for member in cluster.names:
        before = len(cluster.lan_peers())
        shut = _coi(env, "run", "--target", member, "-w", str(ws), "--", "sh", "-c", PROBE)
        assert shut.returncode == 0, shut.stderr
        assert shut.stdout.strip() == "shut", (member, shut.stderr)
        assert cluster.lan_peers()[before:] == []
        opened = _coi(env, "run", "--target", member, "--network", "open", "-w", str(ws), "--",
                      "sh", "-c", PROBE)  # fmt: skip
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout.strip() == "reached"
        assert cluster.lan_peers()[before:] == [cluster.member(member).daemon_addr]


def test_allowlist_mode_on_a_member_lets_through_only_what_it_lists(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path, tmp_path: Path
) -> None:
    """Allowlist mode on a cluster: the members' API port (listed) is reached from a sandbox
    on m3, the LAN host (not listed, private) is not."""
    conf = tmp_path / "xdg"
    shutil.copytree(Path(env["XDG_CONFIG_HOME"]), conf)
    net = ipaddress.ip_interface(f"{cluster.host_addr}/29").network
    (conf / "coi" / "config.toml").write_text(
        f'[network]\nmode = "allowlist"\nallowed_domains = ["{net}:8443"]\n'
    )
    m1 = cluster.member("m1").daemon_addr
    script = f"nc -w 2 {m1} 8443 </dev/null >/dev/null 2>&1 && echo api || echo api-shut; {PROBE}"
    before = len(cluster.lan_peers())
    res = run_coi("--remote", "c", "run", "--target", "m3", "-w", str(ws), "--", "sh", "-c",
                  script, env={**env, "XDG_CONFIG_HOME": str(conf)}, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Network mode: allowlist" in res.stderr
    assert res.stdout.split() == ["api", "shut"]
    assert cluster.lan_peers()[before:] == []


def test_a_bridge_is_made_on_every_member_and_twice_is_a_conflict(
    cluster: clusterkit.Cluster,
) -> None:
    """coi's NetworksAPI.create on a cluster (what a policy's bridge goes through): pending
    on each member, then global, up on every member; made again (another coi won the race),
    the daemon's "not in pending state" is the Conflict coi's network code expects."""
    with cluster.members[0].admin() as c:
        assert c.server.clustered
        c.networks.create(
            "coitwice", config={"ipv4.address": "10.201.9.1/24", "ipv6.address": "none"}
        )
        try:
            for member in cluster.names:
                links = subprocess.run(["ip", "-n", cluster.member(member).ns, "-br", "link"],
                                       capture_output=True, text=True).stdout  # fmt: skip
                assert "coitwice" in links, member
            with pytest.raises(Conflict):
                c.networks.create("coitwice", config={"ipv4.address": "10.201.9.1/24"})
        finally:
            c.networks.delete("coitwice")
    assert (
        "coitwice"
        not in subprocess.run(
            ["ip", "-n", cluster.member("m3").ns, "-br", "link"], capture_output=True, text=True
        ).stdout
    )


def test_clean_leaves_nothing_on_any_member(
    cluster: clusterkit.Cluster, env: dict[str, str], ws: Path
) -> None:
    """Stopped sandboxes on every member (their agent powered them off), the restricted
    policy's bridge and the workspace's cache volume: `coi clean --all --workspace-caches`
    removes them all, on each member."""
    for member in cluster.names:
        bg = _coi(env, "shell", "--background", "--target", member, "-w", str(ws))
        assert bg.returncode == 0, bg.stderr
    names = [str(c["name"]) for c in _listed(env)]
    assert len(names) == 3
    with cluster.members[0].admin(PROJECT) as c:
        for n in names:
            c.instances.stop(n, force=True)
        assert any(n.name.startswith("coi-") for n in c.networks.list())
        assert c.networks.volumes("coi")  # the workspace's cache on the server
    assert any(_volumes_on(cluster, m) for m in cluster.names)  # ... on a member's disk
    for member in cluster.names:
        links = subprocess.run(["ip", "-n", cluster.member(member).ns, "-br", "link"],
                               capture_output=True, text=True).stdout  # fmt: skip
        assert "coi-" in links  # the policy's bridge is up on every member
    clean = _coi(env, "clean", "--all", "--force", "--workspace-caches")
    assert clean.returncode == 0, clean.stderr
    assert cluster.locations(PROJECT) == {}
    with cluster.members[0].admin(PROJECT) as c:
        assert [n.name for n in c.networks.list() if n.name.startswith("coi-")] == []
        assert [a.name for a in c.networks.acls() if a.name.startswith("coi-")] == []
        assert c.networks.volumes("coi") == []
    for member in cluster.names:
        assert cluster.on_member(member, PROJECT) == []
        assert _volumes_on(cluster, member) == []
        links = subprocess.run(["ip", "-n", cluster.member(member).ns, "-br", "link"],
                               capture_output=True, text=True).stdout  # fmt: skip
        assert "coi-" not in links, (member, links)
    remotekit.check_route(cluster.members[0])
