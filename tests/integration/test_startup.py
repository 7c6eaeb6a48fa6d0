"""What makes a sandbox start fast, on the real daemon: reserved addresses set at once,
spare copies of the template, and the set-up that prepares both."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import coi_names, wait_for

from coi import labels
from coi.backend import ExecRequest, IncusClient
from coi.config.loader import Config, load_config
from coi.errors import SessionError
from coi.host import provision
from coi.images import tiny
from coi.network import address
from coi.network.hostnet import host_networks
from coi.network.manager import ensure_network, policy_from_config
from coi.sessions import naming, template
from coi.sessions.runner import ShellRequest, ShellSession
from coi.sessions.sandbox import BOOTED, Sandbox, SandboxSpec, instance_config
from coi.tools.registry import get_tool

# -- reserved addresses ---------------------------------------------------------------------


def _eth0(client: IncusClient, name: str) -> tuple[str, str]:
    """The address the NIC reserves, and the one the container has on eth0."""
    nic = client.instances.get(name).expanded_devices["eth0"]
    res = client.exec.capture(name, ExecRequest(["ip", "-4", "addr", "show", "dev", "eth0"]))
    found = re.search(r"inet (\S+)/", res.stdout.decode())
    return nic.get("ipv4.address", ""), found.group(1) if found else ""


def test_sandboxes_made_at_once_get_distinct_slots_and_reserved_addresses(
    client: IncusClient, coi_env: dict[str, str], tmp_path: Path
) -> None:
    """Six sessions on one workspace at once. Each is quick (spares), so some end while
    others still wait for the slot lock: a slot list taken before the lock gave two of them
    one container ("duplicate session")."""
    env = {**coi_env, "COI_IMAGE": "coi-tiny"}

    def shell(_i: int) -> subprocess.CompletedProcess[str]:
        return run_coi("shell", "--background", "--debug", "-w", str(tmp_path), env=env)

    with ThreadPoolExecutor(6) as pool:
        res = list(pool.map(shell, range(6)))
    assert all(r.returncode == 0 for r in res), [r.stderr for r in res if r.returncode]
    names = coi_names(client, tmp_path)
    assert len(names) == 6, names
    try:
        nics = [_eth0(client, n) for n in names]
        bridge = client.instances.get(names[0]).expanded_devices["eth0"]["network"]
        net = client.networks.get(bridge)
        assert net is not None
        free = set(address.candidates(net))
        for reserved, actual in nics:
            # The container has the address the daemon reserved for it, from coi's half.
            assert reserved == actual and reserved in free
        gw = ipaddress.IPv4Interface(net.config["ipv4.address"])
        for n, (reserved, _) in zip(names, nics, strict=True):
            # What the `coi` image sets at boot is that address, also after a sandbox moved
            # to another one because a sandbox made at the same moment held it.
            boot = client.instances.get(n).config[address.BOOT_KEY]
            assert boot == f"{reserved}/{gw.network.prefixlen} {gw.ip}"
        assert len({a for a, _ in nics}) == 6
        lo, hi = net.config["ipv4.dhcp.ranges"].split("-")
        dhcp = range(int(ipaddress.IPv4Address(lo)), int(ipaddress.IPv4Address(hi)) + 1)
        assert not [a for a, _ in nics if int(ipaddress.IPv4Address(a)) in dhcp]
    finally:
        run_coi("kill", "--all", "--force", env=env)


def test_a_pool_address_dhcp_gave_first_is_replaced_by_the_reserved_one_for_good(
    client: IncusClient, bridge: str, pool: str, unique: str
) -> None:
    """When sandboxes start together the daemon's DHCP server can answer before it has read a
    reservation, and the sandbox gets a pool address. Setting the reserved one from inside
    (`address.CONFIGURE`) leaves it the only address; and a lease that arrives after it does
    not replace it."""
    net = client.networks.get(bridge)
    assert net is not None
    client.instances.create(
        unique, image="coi-tiny", start=True,
        devices={"root": {"type": "disk", "path": "/", "pool": pool},
                 "eth0": {"type": "nic", "network": bridge, "name": "eth0"}},
    )  # fmt: skip

    def addresses() -> list[str]:
        res = client.exec.capture(unique, ExecRequest(["ip", "-4", "addr", "show", "dev", "eth0"]))
        return re.findall(r"inet (\S+)/", res.stdout.decode())

    try:
        wait_for(addresses, "a DHCP address")
        (pool_address,) = addresses()
        reserved = address.choose(net, avoid={pool_address})
        assert reserved is not None
        done = client.exec.capture(
            unique, ExecRequest(["sh", "-c", address.CONFIGURE], env=reserved.env())
        )
        assert done.exit_code == 0, done.stderr
        assert addresses() == [reserved.ip]
        # The other order: the lease (a pool address) arrives after coi set the reserved
        # one; the image's DHCP hook runs as udhcpc runs it.
        lease = {"interface": "eth0", "ip": pool_address, "mask": "24", "router": reserved.gateway}
        late = client.exec.capture(unique, ExecRequest(["/etc/udhcpc.script", "bound"], env=lease))
        assert late.exit_code == 0, late.stderr
        assert addresses() == [reserved.ip]
    finally:
        client.instances.delete(unique, force=True)


@pytest.mark.parametrize("via_spare", [False, True], ids=["copy", "spare"])
def test_an_address_another_nic_holds_is_given_up_for_another(
    client: IncusClient,
    bridge: str,
    pool: str,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    via_spare: bool,
) -> None:
    """Two sandboxes made at the same moment can pick the same address: the daemon refuses
    the second when it starts, and coi picks again instead of failing (or, for a spare,
    instead of throwing the spare away)."""
    for n in _spares(client):
        client.instances.delete(n, force=True)
    if via_spare:
        fp = client.images.alias_target("coi-tiny")
        assert fp
        # The template of the sandbox's own uid map (root's folder: host root is mapped).
        idmap = instance_config(SandboxSpec(workspace=tmp_path, image="coi-tiny", persistent=False))
        tmpl = template.ready(client, fp, idmap, pool=pool, lock_dir=tmp_path, log=lambda _m: None)
        assert tmpl and template.replenish(client, tmpl, 1, lock_dir=tmp_path) == 1
        wait_for(lambda: len(_ready(client)) == 1, "a ready spare")
    net = client.networks.get(bridge)
    assert net is not None and address.candidates(net), "coi setup gives coibr0 a DHCP pool"
    held = address.candidates(net)[-1]
    client.instances.create(
        unique,
        image="coi-tiny",
        devices={
            "root": {"type": "disk", "path": "/", "pool": pool},
            "eth0": {"type": "nic", "network": bridge, "name": "eth0", "ipv4.address": held},
        },
    )
    picks = iter([held])
    real = address.random.choice
    monkeypatch.setattr(address.random, "choice", lambda seq: next(picks, None) or real(seq))
    monkeypatch.setenv("COI_HOME", str(tmp_path / "home"))
    spec = SandboxSpec(
        workspace=tmp_path, image="coi-tiny", persistent=False, kind="run",
        pool=pool, network=bridge, templates=via_spare, spares=1,
    )  # fmt: skip
    logs: list[str] = []
    box = Sandbox(client, spec, log=logs.append)
    try:
        box.ensure_image()
        box.choose_slot(None)
        box.create_or_reuse()
        assert box.address is not None and box.address.ip != held
        assert _eth0(client, box.name) == (box.address.ip, box.address.ip)
        assert ("Taking a ready spare copy of the image" in logs) == via_spare, logs
        assert not _spares(client)  # the spare became this sandbox
    finally:
        client.instances.delete(unique, force=True)
        if box.name:
            client.instances.delete(box.name, force=True)
        box.release()


class _Counted(httpx.BaseTransport):
    """The real transport, each request noted (method, path)."""

    def __init__(self, inner: httpx.BaseTransport, seen: list[tuple[str, str]]) -> None:
        self.inner, self.seen = inner, seen

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_a_sandbox_start_reads_its_policy_bridge_once(
    client: IncusClient, pool: str, bridge: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge as read to check the policy's settings is the one the address is chosen
    from: no second request for it."""
    monkeypatch.setenv("COI_HOME", str(tmp_path / "home"))
    policy, _ = policy_from_config(load_config(cwd=tmp_path, env={}, files=[]), cache_dir=tmp_path)
    assert policy.mode == "restricted"
    # Made (or brought up to date) first: a bridge made or changed just now is read again.
    ensure_network(client, policy, default_network=bridge, lock_dir=tmp_path, log=lambda _m: None)
    seen: list[tuple[str, str]] = []
    sock = client.endpoint.socket_path
    assert sock
    counted = IncusClient(
        client.endpoint,
        project=client.project,
        transport=_Counted(httpx.HTTPTransport(uds=sock), seen),
    )
    spec = SandboxSpec(
        workspace=tmp_path, image="coi-tiny", persistent=False, kind="run",
        pool=pool, network=bridge, templates=False, spares=0, policy=policy,
    )  # fmt: skip
    box = Sandbox(counted, spec, log=lambda _m: None)
    try:
        box.ensure_image()
        box.choose_slot(None)
        box.create_or_reuse()
        assert box.address is not None
    finally:
        if box.name:
            client.instances.delete(box.name, force=True)
        box.release()
        counted.close()
    assert seen.count(("GET", f"/1.0/networks/{policy.name}")) == 1, seen


def test_a_tmux_session_a_lost_exec_already_made_is_accepted_only_in_a_new_sandbox(
    client: IncusClient,
    pool: str,
    bridge: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under load LXD 5.0 can fail an exec ("Failed to retrieve PID of executing child
    process") after its command ran, and coi starts it again: a second `tmux new-session`
    then finds the session the first one made. In a sandbox coi made a moment ago that
    session is the first start's; in any other container it is not coi's to take."""
    monkeypatch.setenv("COI_HOME", str(tmp_path / "home"))
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = SandboxSpec(
        workspace=ws, image="coi-tiny", persistent=False, kind="shell",
        pool=pool, network=bridge, templates=False, spares=0,
    )  # fmt: skip
    shell = ShellSession(client, Config({}, {}), spec, ShellRequest(tool=get_tool("claude")))
    box = shell.box
    try:
        box.ensure_image()
        box.choose_slot(None)
        box.create_or_reuse()
        session = naming.tmux_session(box.name)
        first = client.exec.capture(
            box.name, box.request(["tmux", "new-session", "-d", "-s", session, "sleep 60"], {})
        )
        assert first.exit_code == 0, first.stderr
        assert box.created
        shell._new_tmux_session(session, "sleep 60")  # the retry of a start that ran
        box.created = False  # a container coi did not just make: the session is not its own
        with pytest.raises(SessionError, match="duplicate session"):
            shell._new_tmux_session(session, "sleep 60")
    finally:
        if box.name:
            client.instances.delete(box.name, force=True)
        box.release()


def test_the_boot_wait_blocks_in_systemd_with_one_call_once_systemd_listens(
    client: IncusClient, pool: str, unique: str
) -> None:
    """The wait for `sockets.target` (`BOOTED`), in a tiny container dressed as a systemd
    image whose `systemctl` is a stand-in that counts its calls. Until systemd's own socket
    is there the wait only looks for it; then it asks systemd once, to start the target (which
    returns when the boot has it running), and polls no more."""
    client.instances.create(
        unique, image="coi-tiny", devices={"root": {"type": "disk", "path": "/", "pool": pool}},
        start=True,
    )  # fmt: skip
    stub = '#!/bin/sh\necho "$*" >> /tmp/calls\nexit 0\n'

    def wait(before: str = "") -> tuple[int, list[str]]:
        res = client.exec.capture(unique, ExecRequest(["sh", "-c", before + BOOTED + "echo $i"]))
        assert res.exit_code == 0, res.stderr
        calls = client.exec.capture(
            unique, ExecRequest(["sh", "-c", "cat /tmp/calls; rm -f /tmp/calls"])
        )
        return int(res.stdout.decode().strip()), calls.stdout.decode().splitlines()

    try:
        made = client.exec.capture(
            unique,
            ExecRequest(["sh", "-c", f"mkdir -p /run/systemd/system && printf '{stub}' > "
                         "/bin/systemctl && chmod +x /bin/systemctl"]),
        )  # fmt: skip
        assert made.exit_code == 0, made.stderr
        # systemd's socket appears 0.3 s into the wait: only then is systemd asked, once.
        turns, calls = wait("( sleep 0.3; touch /run/systemd/private ) & ")
        assert 5 <= turns < 100 and calls == ["start sockets.target"]
        # A booted system: asked at once.
        assert wait() == (0, ["start sockets.target"])
    finally:
        client.instances.delete(unique, force=True)


def test_a_slot_is_chosen_from_the_containers_that_exist_once_the_lock_is_held(
    client: IncusClient, pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """coi A waits for the slot lock while coi B claims slot 1, makes its container and
    ends (its claim released): A must see B's container, not a list from before the wait."""
    monkeypatch.setenv("COI_HOME", str(tmp_path / "home"))
    spec = SandboxSpec(workspace=tmp_path, image="coi-tiny", persistent=False, pool=pool)
    box = Sandbox(client, spec, log=lambda _m: None)
    lock = tmp_path / "home" / "locks" / f"{naming.workspace_hash(str(tmp_path))}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    name = naming.container_name(str(tmp_path), 1)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # B holds the lock
        chooser = threading.Thread(target=box.choose_slot, args=(None,))
        chooser.start()
        time.sleep(0.5)  # A is waiting for the lock now
        client.instances.create(
            name, image="coi-tiny", devices={"root": {"type": "disk", "path": "/", "pool": pool}}
        )
        fcntl.flock(fh, fcntl.LOCK_UN)  # B is done
    try:
        chooser.join(timeout=30)
        assert box.slot == 2 and box.name == naming.container_name(str(tmp_path), 2)
    finally:
        box.release()
        client.instances.delete(name, force=True)


# -- spares ---------------------------------------------------------------------------------


def _spares(client: IncusClient) -> list[str]:
    return [n for n in client.instances.names() if n.startswith(template.SPARE_PREFIX)]


def _ready(client: IncusClient) -> list[str]:
    busy = client.instances.busy()
    return [n for n in _spares(client) if n not in busy]


@pytest.fixture
def no_spares(client: IncusClient) -> Iterator[None]:
    """Tests that count spares start and end without any."""
    for n in _spares(client):
        client.instances.delete(n, force=True)
    yield
    for n in _spares(client):
        client.instances.delete(n, force=True)


def test_a_sandbox_takes_a_ready_spare_and_a_new_one_is_made_after(
    client: IncusClient, coi_env: dict[str, str], tmp_path: Path, no_spares: None
) -> None:
    env = {**coi_env, "COI_IMAGE": "coi-tiny", "COI_SPARES": "1", "COI_TEMPLATES": "always"}
    first = run_coi("run", "-w", str(tmp_path), "--", "true", env=env)
    assert first.returncode == 0, first.stderr
    assert "ready spare" not in first.stderr
    wait_for(lambda: len(_ready(client)) == 1, "one ready spare after the first run")
    (spare,) = _spares(client)
    listing = run_coi("list", "--format", "json", env=env)
    assert spare not in listing.stdout  # spares are not sessions

    second = run_coi("run", "-w", str(tmp_path), "--", "true", env=env)
    assert second.returncode == 0, second.stderr
    assert "ready spare" in second.stderr
    # The spare became the session's container (renamed), and a new spare replaces it.
    wait_for(lambda: len(_ready(client)) == 1, "the spare to be replaced")
    assert spare not in client.instances.names()

    # A spare is configured like any sandbox: workspace, protection, network proof.
    (tmp_path / "f").write_text("from the host")
    tmp_path.chmod(0o755)  # root's folder: the agent (uid 1000 inside) may read, not write
    third = run_coi("run", "-w", str(tmp_path), "--", "cat", "/workspace/f", env=env)
    assert third.returncode == 0 and third.stdout == "from the host", third.stderr
    assert "Network policy verified" in third.stderr and "ready spare" in third.stderr

    # Turned off: no new spares, and `coi clean` removes the ones left.
    off = {**env, "COI_SPARES": "0"}
    wait_for(lambda: len(_ready(client)) == 1, "the spare after the third run")
    assert run_coi("run", "-w", str(tmp_path), "--", "true", env=off).returncode == 0
    assert len(_spares(client)) == 1
    res = run_coi("clean", "--force", env=off)
    assert res.returncode == 0 and "Deleting coispare-" in res.stdout, res.stdout
    assert _spares(client) == []
    wait_for(lambda: not coi_names(client, tmp_path), "the sandboxes to go")


def test_a_sandbox_made_from_a_spare_has_its_own_name_as_hostname(
    client: IncusClient, coi_env: dict[str, str], unique: str, tmp_path: Path, pool: str,
    no_spares: None,
) -> None:  # fmt: skip
    """An image whose hostname template runs only at create and copy, as most images'
    do: coi makes the template run at rename too, or a sandbox would carry the spare's name."""
    client.instances.create(
        unique, image="coi-tiny", devices={"root": {"type": "disk", "path": "/", "pool": pool}}
    )
    meta = client.instances.metadata(unique)
    meta["templates"]["/etc/hostname"]["when"] = ["create", "copy"]
    client.instances.set_metadata(unique, meta)
    alias = f"{unique}-img"
    fp = client.images.publish(instance=unique, aliases=(alias,))
    client.instances.delete(unique, force=True)
    env = {**coi_env, "COI_IMAGE": alias, "COI_SPARES": "1", "COI_TEMPLATES": "always"}
    try:
        assert run_coi("run", "-w", str(tmp_path), "--", "true", env=env).returncode == 0
        wait_for(lambda: len(_ready(client)) == 1, "a ready spare")
        res = run_coi("run", "-w", str(tmp_path), "--", "hostname", env=env)
        assert res.returncode == 0 and "ready spare" in res.stderr, res.stderr
        name = re.search(r"Launching container (\S+) ", res.stderr)
        assert name and res.stdout.strip() == name.group(1), res.stdout
    finally:
        for n in client.instances.names():
            if fp[:12] in n:
                client.instances.delete(n, force=True)
        client.images.delete(fp)


def test_a_spare_still_being_copied_is_never_taken(
    client: IncusClient, coi_image: str, unique: str, pool: str, no_spares: None
) -> None:
    """Renaming a container the daemon is still copying breaks the copy (LXD 5.0 lets it):
    coi only takes spares no operation is working on."""
    fp = client.images.alias_target("coi")
    assert fp
    locks = Path("/tmp") / unique
    tmpl = template.ready(client, fp, {}, pool=pool, lock_dir=locks, log=lambda _m: None)
    assert tmpl
    try:
        # The `coi` image's copy takes the daemon about half a second: long enough to look.
        assert template.replenish(client, tmpl, 1, lock_dir=locks) == 1
        # The daemon lists the new instance a moment after it took the copy on.
        deadline = time.monotonic() + 5
        while not _spares(client) and time.monotonic() < deadline:
            time.sleep(0.01)
        (spare,) = _spares(client)
        assert spare in client.instances.busy()
        assert not template.claim(client, tmpl, unique)
        assert client.instances.exists(spare) and not client.instances.exists(unique)
        wait_for(lambda: spare not in client.instances.busy(), "the copy to finish")
        assert template.replenish(client, tmpl, 1, lock_dir=locks) == 0  # already enough
        assert template.claim(client, tmpl, unique)
        client.instances.start(unique)
        res = client.exec.capture(unique, ExecRequest(["cat", "/etc/hostname"]))
        assert res.stdout.decode().strip() == unique
    finally:
        for n in (unique, tmpl):
            client.instances.delete(n, force=True)
        shutil.rmtree(locks, ignore_errors=True)


def test_no_spare_is_copied_while_another_sandbox_is_starting(
    client: IncusClient, pool: str, tmp_path: Path, no_spares: None
) -> None:
    """A copy costs the daemon 0.4 s of CPU: sessions started together must not wait on
    copies made for later ones, and two sessions ending together must not both refill."""
    fp = client.images.alias_target("coi-tiny")
    assert fp
    tmpl = template.ready(client, fp, {}, pool=pool, lock_dir=tmp_path, log=lambda _m: None)
    assert tmpl
    with template.Starting(tmp_path):  # another sandbox of this user is starting
        assert template.replenish(client, tmpl, 1, lock_dir=tmp_path) == 0
    # Another coi is refilling right now: this one leaves it to that one.
    fd = os.open(tmp_path / f"{template.SPARES_LOCK}.lock", os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert template.replenish(client, tmpl, 1, lock_dir=tmp_path) == 0
    finally:
        os.close(fd)
    assert not _spares(client)
    assert template.replenish(client, tmpl, 1, lock_dir=tmp_path) == 1
    wait_for(lambda: len(_ready(client)) == 1, "the spare copied once nobody is starting")


def test_a_sandbox_holds_off_spare_copies_while_it_starts_and_refills_after(
    client: IncusClient, coi_env: dict[str, str], tmp_path: Path, no_spares: None
) -> None:
    """coi marks its sandbox as starting from the moment it begins until the agent runs; the
    spare it leaves for the next sandbox is copied by a detached child."""
    env = {**coi_env, "COI_IMAGE": "coi-tiny", "COI_SPARES": "1", "COI_TEMPLATES": "always"}
    locks = Path(env["COI_HOME"]) / "locks"
    ws = tmp_path / "ws"
    ws.mkdir()
    argv = coi_argv("shell", "--background", "--debug", "-w", str(ws))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    held = False
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            held = held or template.someone_starting(locks)
            time.sleep(0.01)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        assert held, "the sandbox was never marked as starting"
        assert not template.someone_starting(locks)
        wait_for(lambda: len(_ready(client)) == 1, "the spare the detached child copies")
    finally:
        proc.kill()
        run_coi("kill", "--all", "--force", env=env)


def test_a_new_template_drops_the_old_one_and_its_spares_but_not_other_images(
    client: IncusClient, coi_env: dict[str, str], unique: str, tmp_path: Path, pool: str,
    no_spares: None,
) -> None:  # fmt: skip
    # Two images of our own, so a rebuild can be played without touching coi-tiny.
    client.instances.create(
        unique, image="coi-tiny", devices={"root": {"type": "disk", "path": "/", "pool": pool}}
    )
    alias = f"{unique}-img"
    fps = [client.images.publish(instance=unique, aliases=(alias,))]
    env = {**coi_env, "COI_IMAGE": alias, "COI_SPARES": "1", "COI_TEMPLATES": "always"}
    other: str | None = None
    try:
        assert run_coi("run", "-w", str(tmp_path), "--", "true", env=env).returncode == 0
        wait_for(lambda: len(_ready(client)) == 1, "a spare of the first image")
        (old,) = _spares(client)
        assert fps[0][:12] in old
        prefix = template.PREFIX + fps[0][:12]
        (old_tmpl,) = [n for n in client.instances.names() if n.startswith(prefix)]
        # Another image in use, for the same uid map: its template must outlive the rebuild.
        cfg = client.instances.get(old_tmpl).config
        idmap = {k: v for k, v in cfg.items() if k in template.IDMAP_KEYS}
        tiny_fp = client.images.alias_target("coi-tiny")
        assert tiny_fp
        locks = tmp_path / "locks"
        other = template.ready(client, tiny_fp, idmap, pool=pool, lock_dir=locks, log=print)
        assert other and other.rsplit("-", 1)[1] == old_tmpl.rsplit("-", 1)[1]
        fps.append(client.images.publish(instance=unique, aliases=(alias,)))  # "coi build"
        assert fps[1] != fps[0]
        res = run_coi("run", "-w", str(tmp_path), "--", "true", env=env)
        assert res.returncode == 0 and "ready spare" not in res.stderr, res.stderr
        assert not client.instances.exists(old) and not client.instances.exists(old_tmpl)
        assert client.instances.exists(other)
        wait_for(lambda: len(_ready(client)) == 1, "a spare of the new image")
        assert fps[1][:12] in _spares(client)[0]
    finally:
        client.instances.delete(unique, force=True)
        for n in [*_spares(client), *client.instances.names()]:
            if any(fp[:12] in n for fp in fps):
                client.instances.delete(n, force=True)
        if other:
            client.instances.delete(other, force=True)
        for fp in fps:
            client.images.delete(fp)


def test_a_template_another_coi_is_still_making_is_never_copied(
    client: IncusClient, unique: str, pool: str, tmp_path: Path
) -> None:
    """Until its first start (the re-owning) is over, a template looks like a stopped
    container: without the ready mark coi must not copy it. Under the lock, nobody is
    making it, so a half-made one (coi killed midway) is made again."""
    fp = client.images.alias_target("coi-tiny")
    assert fp
    name = template.template_name(fp, {})
    client.instances.delete(name, force=True)  # a ready one another test left
    client.instances.create(
        name,
        image=fp,
        config={labels.KIND: "template", labels.TEMPLATE_IMAGE: fp},
        devices={"root": {"type": "disk", "path": "/", "pool": pool}},
    )
    half = client.instances.get(name)
    assert half.status == "Stopped" and labels.TEMPLATE_READY not in half.config
    try:
        got = template.ready(client, fp, {}, pool=pool, lock_dir=tmp_path, log=lambda _m: None)
        assert got == name
        made = client.instances.get(name)
        assert made.config[labels.TEMPLATE_READY] == "true"
        assert made.config["volatile.uuid"] != half.config["volatile.uuid"]  # made anew
    finally:
        client.instances.delete(name, force=True)


# -- set-up ---------------------------------------------------------------------------------


def test_setup_gives_an_older_coi_bridge_its_dhcp_pool_and_keeps_its_description(
    client: IncusClient,
) -> None:
    name = f"coi-t{secrets.token_hex(3)}"
    subnet = ipaddress.IPv4Network("10.231.77.0/24")
    # A bridge of the test's own, clear of the machine's networks and resolver.
    assert not [n for n in host_networks() if n.overlaps(subnet)], host_networks()
    client.networks.create(
        name,
        config={"ipv4.address": "10.231.77.1/24", "ipv4.nat": "false", "ipv6.address": "none"},
        description=provision.BRIDGE_DESCRIPTION,
    )
    try:
        report = provision.SetupReport()
        provision.ensure_bridge(report, client, provision.SetupOptions(network=name))
        assert report.steps[-1].changed, report.steps
        net = client.networks.get(name)
        assert net is not None
        assert net.config["ipv4.dhcp.ranges"] == "10.231.77.2-10.231.77.127"
        assert net.description == provision.BRIDGE_DESCRIPTION
        again = provision.SetupReport()
        provision.ensure_bridge(again, client, provision.SetupOptions(network=name))
        assert not again.steps[-1].changed
    finally:
        client.networks.delete(name)


def test_setup_rebuilds_a_tiny_image_of_an_older_version(client: IncusClient) -> None:
    """The project's coi-tiny was imported without a version (as by an older coi)."""
    old = client.images.by_alias(tiny.TINY_ALIAS)
    assert old is not None and tiny.VERSION_PROPERTY not in old.properties
    report = provision.SetupReport()
    provision.ensure_tiny_image(report, client)
    assert "rebuilt" in report.steps[-1].message
    new = client.images.by_alias(tiny.TINY_ALIAS)
    assert new is not None and new.fingerprint != old.fingerprint
    assert new.properties[tiny.VERSION_PROPERTY] == tiny.TINY_VERSION
    assert not client.images.exists_fingerprint(old.fingerprint)
    report = provision.SetupReport()
    provision.ensure_tiny_image(report, client)
    assert not report.steps[-1].changed and "present" in report.steps[-1].message
