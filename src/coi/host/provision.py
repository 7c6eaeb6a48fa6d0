"""`coi setup`: make a fresh Linux machine ready, idempotently, reporting each step."""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from coi import labels
from coi.errors import SetupError
from coi.host import daemon as dmn
from coi.network.address import dhcp_pool
from coi.network.hostnet import host_networks

if TYPE_CHECKING:
    from coi.backend.client import IncusClient

# Host tools coi uses, by the command that proves each is there.
HOST_PACKAGES = {
    "busybox": "busybox-static",  # the tiny image
    "tmux": "tmux",  # the tiny image carries the host's tmux
    "mkfs.btrfs": "btrfs-progs",  # fast storage pool
    "debootstrap": "debootstrap",  # `coi build` without an image server
    "nft": "nftables",
    "conntrack": "conntrack",
    "ip": "iproute2",
    # LXD only recommends dnsmasq, and coi installs without recommends: its bridges need it.
    "dnsmasq": "dnsmasq-base",
}

# How `coi setup` marks the bridge it made (a later setup may update only that one).
BRIDGE_DESCRIPTION = "coi bridge"
# Candidate bridge subnets; the first that overlaps nothing on the host is used.
BRIDGE_SUBNETS = ("10.123.45.1/24", "10.187.23.1/24", "172.29.137.1/24", "192.168.231.1/24")


@dataclass
class StepResult:
    """One line of the setup report."""

    name: str
    changed: bool
    message: str


@dataclass
class SetupReport:
    """What `coi setup` found and did."""

    steps: list[StepResult] = field(default_factory=list)
    on_step: Callable[[StepResult], None] | None = None

    def add(self, name: str, *, changed: bool, message: str) -> StepResult:
        step = StepResult(name, changed, message)
        self.steps.append(step)
        if self.on_step:
            self.on_step(step)
        return step

    @property
    def changed(self) -> bool:
        return any(s.changed for s in self.steps)


@dataclass
class SetupOptions:
    """Choices for `coi setup`."""

    pool: str = "coi"
    pool_size_gib: int = 30
    storage_driver: str = "auto"  # auto | btrfs | dir
    network: str = "coibr0"
    users: list[str] = field(default_factory=list)
    project: str = "default"
    build_tiny: bool = True
    daemon: dmn.DaemonChoice = "auto"
    backports: bool = True


def _need_root(step: str) -> SetupError:
    return SetupError(
        f"{step} needs root",
        resolution="Run 'sudo coi setup' once; later runs as your user need no root.",
    )


def _missing_packages() -> list[str]:
    return sorted(
        {
            pkg
            for cmd, pkg in HOST_PACKAGES.items()
            # sbin directories are not on a non-root user's PATH.
            if not shutil.which(cmd)
            and not any(Path(d, cmd).exists() for d in ("/usr/sbin", "/sbin", "/bin"))
        }
    )


def _apt(argv: list[str], what: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    res = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SetupError(
            what,
            details=(res.stderr or res.stdout).strip()[-2000:],
            resolution="Fix the package sources (apt-get update) and run 'coi setup' again.",
        )


def _apt_update() -> None:
    _apt(["apt-get", "update"], "apt-get update failed")


def _apt_install(packages: Iterable[str], *, release: str | None = None) -> None:
    pkgs = list(packages)
    target = ["-t", release] if release else []
    _apt(
        ["apt-get", "install", "-y", "--no-install-recommends", *target, *pkgs],
        "installing packages failed: " + " ".join(pkgs),
    )


def ensure_packages(
    report: SetupReport,
    *,
    is_root: bool,
    daemon: dmn.DaemonChoice = "auto",
    backports: bool = True,
) -> dmn.DaemonKind:
    kind = dmn.installed_kind(daemon)
    wanted = _missing_packages()
    if kind is not None and not wanted:
        report.add("packages", changed=False, message=f"{kind.name} and host tools installed")
        return kind
    what = ", ".join(wanted) if kind is not None else "the container daemon"
    if not is_root:
        raise _need_root("installing " + what)
    if not shutil.which("apt-get"):
        raise SetupError(
            f"cannot install {what}: no apt-get on this machine",
            resolution="Install them with your package manager (Incus: "
            "https://linuxcontainers.org/incus/docs/main/installing/).",
        )
    _apt_update()
    if kind is not None:
        _apt_install(wanted)
        report.add("packages", changed=True, message="installed " + ", ".join(wanted))
        return kind
    plan = dmn.plan_install(daemon, backports=backports)
    for note in plan.notes:
        report.add("daemon choice", changed=False, message=note)
    if plan.enable_backports and plan.release:
        path = dmn.enable_backports(plan.release)
        _apt_update()
        report.add(
            "package sources",
            changed=True,
            message=f"enabled Debian {plan.release} for Incus ({path}; "
            "'coi setup --no-backports' refuses this and installs LXD)",
        )
    if wanted:
        _apt_install(wanted)
    _apt_install(plan.packages, release=plan.release)
    origin = f" from {plan.release}" if plan.release else ""
    report.add(
        "packages",
        changed=True,
        message="installed " + ", ".join([*wanted, *plan.packages]) + origin,
    )
    return plan.kind


def ensure_running(report: SetupReport, kind: dmn.DaemonKind, *, is_root: bool) -> None:
    """Start the daemon if it does not answer."""
    from coi.backend.client import IncusClient
    from coi.backend.connection import Endpoint
    from coi.errors import BackendError

    sock = dmn.socket_of(kind)
    if sock:
        try:
            with IncusClient(Endpoint(sock), timeout=5) as c:
                info = c.server
            report.add("daemon", changed=False, message=f"{info.display_name} running ({sock})")
            return
        except BackendError:
            pass
    if not is_root:
        raise _need_root(f"starting the {kind.name} daemon")
    how = dmn.start_daemon(kind)
    report.add("daemon", changed=True, message=how)


def _id_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def subid_lines(lines: list[str], uids: list[int]) -> tuple[list[str], list[str], list[str]]:
    """/etc/subuid (or subgid) with `root:UID:1` for each uid; returns (lines, added, removed).

    A second range for root of more than one id is removed: Debian's lxd package adds
    `root:1001000000:10000001` beside the usual `root:1000000:1000000000`, and Incus then
    maps container root twice, so no container starts ("newuidmap: write to uid_map failed").
    Both daemons use the first range.
    """
    out: list[str] = []
    removed: list[str] = []
    seen_range = False
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == "root" and parts[2].isdigit() and int(parts[2]) > 1:
            if seen_range:
                removed.append(line.strip())
                continue
            seen_range = True
        out.append(line)
    added = [f"root:{uid}:1" for uid in uids if f"root:{uid}:1" not in {x.strip() for x in out}]
    return out + added, added, removed


def ensure_subids(
    report: SetupReport, uids: list[int], *, is_root: bool, quiet: bool = False
) -> bool:
    """Let the daemon (root) map each user's uid/gid into containers (`raw.idmap`)."""
    changed = False
    notes: list[str] = []
    for fname in ("/etc/subuid", "/etc/subgid"):
        path = Path(fname)
        lines, added, removed = subid_lines(_id_lines(path), uids)
        if not (added or removed):
            continue
        if not is_root:
            raise _need_root(f"changing {fname} ({', '.join(added + removed)})")
        path.write_text("\n".join(lines) + "\n")
        changed = True
        notes += [f"removed {r} from {fname} (a second range for root)" for r in removed]
    if quiet and not changed:
        return False
    who = ", ".join(str(u) for u in sorted(uids)) or "none"
    report.add(
        "uid mapping",
        changed=changed,
        message=f"root:UID:1 for uid {who}" + "".join(f"; {n}" for n in notes),
    )
    return changed


def pick_subnet(in_use: list[ipaddress.IPv4Network]) -> str:
    for cand in BRIDGE_SUBNETS:
        net = ipaddress.ip_interface(cand).network
        if not any(net.overlaps(u) for u in in_use):
            return cand
    raise SetupError(
        "no free private subnet for the coi bridge", details="Tried: " + ", ".join(BRIDGE_SUBNETS)
    )


def _btrfs_usable() -> bool:
    fs = Path("/proc/filesystems").read_text() if Path("/proc/filesystems").exists() else ""
    return "btrfs" in fs and bool(shutil.which("mkfs.btrfs"))


def ensure_pool(report: SetupReport, client: IncusClient, opts: SetupOptions) -> None:
    pool = client.networks.pool(opts.pool)
    if pool:
        report.add("storage pool", changed=False, message=f"'{pool.name}' ({pool.driver})")
        return
    driver = opts.storage_driver
    if driver == "auto":
        driver = "btrfs" if _btrfs_usable() else "dir"
    config = {"size": f"{opts.pool_size_gib}GiB"} if driver == "btrfs" else {}
    client.networks.create_pool(opts.pool, driver=driver, config=config)
    why = (
        "btrfs loop file: instant copy-on-write clones"
        if driver == "btrfs"
        else ("dir: no btrfs on this kernel; instance creation is slower")
    )
    report.add("storage pool", changed=True, message=f"created '{opts.pool}' ({why})")


def ensure_bridge(report: SetupReport, client: IncusClient, opts: SetupOptions) -> None:
    net = client.networks.get(opts.network)
    if net:
        subnet = net.config.get("ipv4.address", "")
        if net.description == BRIDGE_DESCRIPTION and not net.config.get("ipv4.dhcp.ranges"):
            # Made by an older coi: keep DHCP to the lower half, sandboxes get the upper.
            client.networks.patch(net.name, dhcp_pool(subnet), description=net.description)
            report.add(
                "network",
                changed=True,
                message=f"bridge '{net.name}' {subnet}: DHCP now in the lower half, "
                "sandboxes get fixed addresses in the upper half",
            )
            return
        report.add("network", changed=False, message=f"bridge '{net.name}' {subnet}")
        return
    subnet = pick_subnet(host_networks())
    client.networks.create(
        opts.network,
        config={
            "ipv4.address": subnet,
            "ipv4.nat": "true",
            "ipv6.address": "none",
            # The upper half is for the fixed addresses coi gives sandboxes (network/address.py).
            **dhcp_pool(subnet),
        },
        description=BRIDGE_DESCRIPTION,
    )
    report.add("network", changed=True, message=f"created bridge '{opts.network}' {subnet}")


def ensure_tiny_image(report: SetupReport, client: IncusClient) -> None:
    from coi.images.tiny import (
        DESCRIPTION,
        TINY_ALIAS,
        TINY_VERSION,
        VERSION_PROPERTY,
        build_tarball,
    )

    old = client.images.by_alias(TINY_ALIAS)
    if old is not None and old.properties.get(VERSION_PROPERTY) == TINY_VERSION:
        report.add("tiny image", changed=False, message=f"'{TINY_ALIAS}' present")
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coi"
    tarball = build_tarball(cache / "coi-tiny.tar")
    client.images.import_tarball(
        tarball,
        aliases=(TINY_ALIAS,),
        properties={"description": DESCRIPTION, VERSION_PROPERTY: TINY_VERSION},
    )
    tarball.unlink(missing_ok=True)
    if old is not None:
        # Containers made from it keep their own copies; only the image goes.
        client.images.delete(old.fingerprint)
    verb = "rebuilt (newer version)" if old else "built and imported"
    report.add("tiny image", changed=True, message=f"{verb} '{TINY_ALIAS}'")


def users_to_map(names: list[str]) -> list[int]:
    """Uids that will run coi: the named users, the sudo caller, and a non-root caller."""
    uids: list[int] = []
    for name in names:
        try:
            uids.append(pwd.getpwnam(name).pw_uid if not name.isdigit() else int(name))
        except KeyError as err:
            raise SetupError(f"no such user: {name}") from err
    if os.environ.get("SUDO_UID", "").isdigit():
        uids.append(int(os.environ["SUDO_UID"]))
    if os.getuid() != 0:
        uids.append(os.getuid())
    return sorted({u for u in uids if u != 0})


def ensure_group_members(
    report: SetupReport, kind: dmn.DaemonKind, names: list[str], *, is_root: bool
) -> None:
    import grp

    added = []
    try:
        members = set(grp.getgrnam(kind.group).gr_mem)
    except KeyError:
        if names and is_root:
            subprocess.run(["groupadd", "--system", kind.group], check=True)
            members = set()
        else:
            return
    for name in names:
        if name.isdigit() or name in members:
            continue
        if not is_root:
            raise _need_root(f"adding {name} to group {kind.group}")
        subprocess.run(["usermod", "-aG", kind.group, name], check=True)
        added.append(name)
    if names:
        report.add(
            "socket access",
            changed=bool(added),
            message=(f"added {', '.join(added)} to" if added else "users already in")
            + f" group {kind.group}",
        )


def ensure_echo_limit(report: SetupReport, *, is_root: bool) -> None:
    """The host's rate limit on ICMP echo out of policy bridges (the daemon's ACLs have none).

    Firewall tables do not survive a reboot: `coi setup` after one puts it back (and starts
    the daemon, where no systemd does); `coi health` says when it is missing.
    """
    from coi.network import echolimit

    if echolimit.installed():
        report.add("echo limit", changed=False, message=f"in place ({echolimit.RATE})")
        return
    if not is_root:
        raise _need_root("loading coi's nftables table (the rate limit on ICMP echo)")
    echolimit.install()
    report.add(
        "echo limit",
        changed=True,
        message=f"nftables table inet {echolimit.TABLE}: ICMP echo out of sandboxes at most "
        f"{echolimit.RATE} per sandbox",
    )


def _restart(report: SetupReport, kind: dmn.DaemonKind, *, is_root: bool) -> None:
    if not is_root:
        raise _need_root(f"restarting {kind.name}")
    how = dmn.restart_daemon(kind)
    report.add("daemon", changed=True, message=f"restarted to load the uid mapping ({how})")


def probe_reowns(client: IncusClient, opts: SetupOptions, image: str) -> bool:
    """Start a throw-away container and see whether the daemon re-owned its files on disk.

    A daemon that shifts ownership with idmapped mounts leaves the files as the image had
    them and records an empty `volatile.last_state.idmap`; one that re-owns them (LXD 5.0)
    records the map it applied. Only the former can map host root into a container.
    """
    import secrets

    name = f"coi-probe-{secrets.token_hex(3)}"
    client.instances.create(
        name,
        image=image,
        devices={"root": {"type": "disk", "path": "/", "pool": opts.pool}},
        start=True,
    )
    try:
        inst = client.instances.get(name)
        return inst.config.get("volatile.last_state.idmap", "") not in ("", "[]")
    finally:
        client.instances.delete(name, force=True)


def ensure_root_verdict(report: SetupReport, client: IncusClient, opts: SetupOptions) -> bool:
    """Find out once whether root's own folders can be workspaces; kept on the pool."""
    from coi.errors import CoiError
    from coi.images.tiny import TINY_ALIAS

    pool = client.networks.pool(opts.pool)
    known = (pool.config if pool else {}).get(labels.MAP_ROOT)
    if known in ("true", "false"):
        report.add("root's folders", changed=False, message=_verdict_text(known == "true"))
        return known == "true"
    if client.images.by_alias(TINY_ALIAS) is None:
        report.add("root's folders", changed=False, message="not probed (no tiny image)")
        return False
    try:
        map_root = not probe_reowns(client, opts, TINY_ALIAS)
        client.networks.patch_pool(opts.pool, {labels.MAP_ROOT: "true" if map_root else "false"})
    except CoiError as err:
        report.add("root's folders", changed=False, message=f"not probed: {err.message}")
        return False
    report.add("root's folders", changed=True, message=_verdict_text(map_root))
    return map_root


def probe_mknod(client: IncusClient, pool: str, image: str) -> bool:
    """Start a throw-away container with the daemon's mknod interception on and see whether
    root inside can make a whiteout (c 0:0) and a null device (c 1:3), as Docker unpacking
    image layers does. On Incus 6.0.4 with kernel 6.18 neither works with the interception
    on (the whiteout does without it)."""
    import secrets

    from coi.backend.exec import ExecRequest

    name = f"coi-probe-{secrets.token_hex(3)}"
    client.instances.create(
        name,
        image=image,
        config={"security.syscalls.intercept.mknod": "true"},
        devices={"root": {"type": "disk", "path": "/", "pool": pool}},
        start=True,
    )
    try:
        script = "mknod /tmp/coi-w c 0 0 && mknod /tmp/coi-n c 1 3"
        return client.exec.quiet(name, ExecRequest(["sh", "-c", script])) == 0
    finally:
        client.instances.delete(name, force=True)


def ensure_mknod_verdict(report: SetupReport, client: IncusClient, opts: SetupOptions) -> None:
    """Find out once whether sessions may turn the daemon's mknod interception on (Docker
    inside); kept on the pool. Without a verdict, sessions leave it off."""
    from coi.errors import CoiError
    from coi.images.tiny import TINY_ALIAS

    if not client.has_extension("container_syscall_intercept"):
        return
    pool = client.networks.pool(opts.pool)
    known = (pool.config if pool else {}).get(labels.MKNOD_WORKS)
    if known in ("true", "false"):
        report.add("mknod interception", changed=False, message=_mknod_text(known == "true"))
        return
    if client.images.by_alias(TINY_ALIAS) is None:
        report.add("mknod interception", changed=False, message="not probed (no tiny image)")
        return
    try:
        works = probe_mknod(client, opts.pool, TINY_ALIAS)
        client.networks.patch_pool(opts.pool, {labels.MKNOD_WORKS: "true" if works else "false"})
    except CoiError as err:
        report.add("mknod interception", changed=False, message=f"not probed: {err.message}")
        return
    report.add("mknod interception", changed=True, message=_mknod_text(works))


def _mknod_text(works: bool) -> str:
    return (
        "works: sandboxes get security.syscalls.intercept.mknod (Docker's device nodes)"
        if works
        else "broken on this daemon and kernel (even whiteouts fail with it on): sandboxes "
        "do without it"
    )


def _verdict_text(map_root: bool) -> str:
    return (
        "the daemon starts containers without re-owning their files: root's folders can be "
        "workspaces (mapped to the agent)"
        if map_root
        else "the daemon re-owns a container's files at start: it cannot map host root, and "
        "coi refuses root's own folders as workspaces"
    )


def run_setup(
    opts: SetupOptions, *, progress: Callable[[StepResult], None] | None = None
) -> SetupReport:
    """Install, start and initialize the daemon; a second run changes nothing."""
    from coi.backend.client import IncusClient
    from coi.backend.connection import Endpoint

    report = SetupReport(on_step=progress)
    is_root = os.geteuid() == 0
    kind = ensure_packages(report, is_root=is_root, daemon=opts.daemon, backports=opts.backports)
    ensure_group_members(report, kind, opts.users, is_root=is_root)
    ensure_running(report, kind, is_root=is_root)
    sock = dmn.socket_of(kind)
    if not sock:
        raise SetupError(f"{kind.name} runs but its socket was not found")
    if ensure_subids(report, users_to_map(opts.users), is_root=is_root):
        _restart(report, kind, is_root=is_root)
    ensure_echo_limit(report, is_root=is_root)
    with IncusClient(Endpoint(sock), project=opts.project) as client:
        ensure_pool(report, client, opts)
        ensure_bridge(report, client, opts)
        if opts.build_tiny:
            ensure_tiny_image(report, client)
        map_root = ensure_root_verdict(report, client, opts)
        ensure_mknod_verdict(report, client, opts)
    if map_root and ensure_subids(report, [0], is_root=is_root, quiet=True):
        _restart(report, kind, is_root=is_root)
    return report
