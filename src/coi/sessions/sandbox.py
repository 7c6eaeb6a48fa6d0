"""One sandbox: the container a session runs in, how it is made, entered and removed."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from coi import labels
from coi.audit import session_log
from coi.backend.client import IncusClient
from coi.backend.connection import Endpoint
from coi.backend.exec import ExecRequest
from coi.backend.models import Instance, Network
from coi.config.loader import Config
from coi.config.paths import coi_home
from coi.errors import BackendError, ConfigError, NotFound, SessionError, UsageError
from coi.limits import Limits
from coi.limits.watchdog import spawn as spawn_watchdog
from coi.locks import tried
from coi.network import address
from coi.network.address import Address
from coi.network.manager import ensure_network, gateway_of, prove_enforced, wait_for_network
from coi.network.policy import Policy
from coi.protection import masks
from coi.protection import paths as protected
from coi.protection.guard import Guard, settle
from coi.protection.masks import MaskPlan
from coi.sessions import aliases, forwards, naming, template, warm
from coi.sessions.slots import SlotClaims, SlotsFull
from coi.sessions.workspace import (
    Mount,
    host_owner_gid,
    host_owner_uid,
    owner_mapping_problem,
    root_mapping_problem,
)

if TYPE_CHECKING:
    from coi.monitor.monitor import Settings as MonitorSettings

Log = Callable[[str], None]

_TERM_FALLBACK = {
    "xterm-ghostty",
    "wezterm",
    "alacritty",
    "xterm-kitty",
    "tmux-256color",
    "screen-256color",
    "foot",
    "contour",
}


def sanitize_term(term: str | None) -> str:
    """A TERM the container surely knows (exotic terminals become xterm-256color)."""
    if not term or term in _TERM_FALLBACK or not re.fullmatch(r"[A-Za-z0-9._+-]+", term):
        return "xterm-256color"
    return term


def stderr_log(prefix: str) -> Log:
    def log(msg: str) -> None:
        sys.stderr.write(f"{prefix}{msg}\n")
        sys.stderr.flush()

    return log


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to create a session's container, fixed before it is made: what
    changes while the sandbox lives (its network, the monitor's view of it) is `Sandbox`'s."""

    workspace: Path
    image: str
    persistent: bool
    mounts: list[Mount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    code_uid: int = 1000
    code_user: str = "code"
    workspace_target: str = "/workspace"
    pool: str = "coi"
    network: str = "coibr0"
    # "run" sandboxes live as long as their coi process; "shell" ones outlive it (detach).
    kind: Literal["run", "shell"] = "shell"
    # The network policy; None keeps the plain bridge (`network`) with no rules.
    policy: Policy | None = None
    # Protected paths (None or empty: protection off) and resource/time limits.
    protection: protected.ProtectionPlan | None = None
    limits: Limits = field(default_factory=Limits)
    # Where the daemon is, for the max_duration watchdog (a separate process).
    project: str = "default"
    remote: str | None = None
    # Seconds between checks of the protected paths while coi runs (0: start and end only).
    verify_interval: float = 5.0
    # The security monitor's settings (None or not enabled: no monitor).
    monitor: MonitorSettings | None = None
    # Start from a pre-shifted copy of the image, and keep this many spare copies ready
    # (see sessions/template.py).
    templates: bool | None = True
    spares: int = 2
    # Booted sandboxes kept waiting for the next session in this workspace (sessions/warm.py).
    running_spares: int = 0
    intercept_setxattr: bool = False  # `incus.intercept_setxattr`
    # Most sessions at once on one workspace.
    max_slots: int = naming.MAX_SLOTS
    # Workspace files masked (read as empty inside: `security.mask_secrets`); None: none.
    masks: MaskPlan | None = None
    # Of `env`, the names whose values come from the host's environment (`tool.forward_env`):
    # a credential among them stays out when the session brokers it.
    host_env: tuple[str, ...] = ()
    # Shell run as root inside at each start, with the network proof (coi.sessions.environment:
    # the timezone's files, the agent's git identity).
    setup: str = ""
    # Published ports (per slot: `forwards.PortRequest.for_slot`), forwarded host sockets,
    # and the name the user gave the sandbox ('' for none): see coi.sessions.forwards/aliases.
    ports: forwards.PortRequest = field(default_factory=forwards.PortRequest)
    sockets: tuple[forwards.SocketForward, ...] = ()
    alias: str = ""
    # `security.agent_root = false`: the agent loses sudo and the docker group at each start
    # (checked: the session does not start while it could still become root).
    drop_root: bool = False
    # Review mode (coi.review): the copy mounted instead of `workspace`, and its id. The
    # sandbox is still the workspace's (its name, slots, saved sessions).
    source: Path | None = None
    review: str = ""
    # The cluster member to make it on ('': the cluster's scheduler chooses; coi.sessions.
    # placement checks it).
    target: str = ""

    @property
    def home(self) -> str:
        return f"/home/{self.code_user}"


def parse_env(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`KEY=VALUE` items -> dict. The value is everything after the first `=`, exactly as
    given: upstream's splitting at commas cut values holding `,` and `=` (its bug, not kept);
    repeat `-e` for several variables."""
    env: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SessionError(
                f"invalid environment variable '{item}': expected KEY=VALUE",
                resolution="Give one variable per -e, e.g. -e A=1 -e B=2.",
            )
        env[key] = value
    return env


def session_env(spec: SandboxSpec, extra: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment: nothing from the host unless the user put it there."""
    env = {
        "HOME": spec.home,
        "USER": spec.code_user,
        "LOGNAME": spec.code_user,
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SHELL": "/bin/bash",
        "LANG": "C.UTF-8",
        "TERM": sanitize_term(os.environ.get("TERM")),
        "IS_SANDBOX": "1",
    }
    env.update(spec.env)
    env.update(extra)
    return env


# What Docker inside needs besides nesting, as upstream sets it: the daemon does mknod (the
# device nodes in image layers) and setxattr (trusted.* overlay attributes) on the
# container's behalf. Both came with the `container_syscall_intercept` API extension.
MKNOD_INTERCEPT = "security.syscalls.intercept.mknod"
SETXATTR_INTERCEPT = "security.syscalls.intercept.setxattr"


def docker_ready_config(
    has_extension: Callable[[str], bool], *, mknod_works: bool = False, setxattr: bool = False
) -> dict[str, str]:
    """What Docker inside a container needs, as far as this daemon can give it: asked by
    API extension, never by the daemon's name or version.

    mknod interception only where `coi setup` saw it work (`labels.MKNOD_WORKS` on the
    pool): on Incus 6.0.4 with kernel 6.18 a container with it on cannot even make the
    whiteouts (c 0:0) that the kernel lets it make without it, and Docker's image layers
    hold whiteouts (measured; docs/images.md). setxattr interception only when asked
    (`incus.intercept_setxattr`): any interception puts a seccomp notifier on each exec's
    attach, and under parallel load Incus 6.0 (liblxc 5.0.2) then fails about 1 exec in 50
    ("Failed to retrieve PID of executing child process") while the command runs on
    (measured: every such command had run); Docker's overlay needs no trusted.* attribute
    on a kernel that has `userxattr` (5.11 and later).
    """
    config = {"security.nesting": "true"}
    if has_extension("container_syscall_intercept"):
        if mknod_works:
            config[MKNOD_INTERCEPT] = "true"
        if setxattr:
            config[SETXATTR_INTERCEPT] = "true"
    return config


def mknod_works(pool_config: Mapping[str, str]) -> bool:
    """`coi setup`'s verdict on the daemon's mknod interception, kept on the pool."""
    return pool_config.get(labels.MKNOD_WORKS) == "true"


# Never started by the daemon itself (after a power loss or a host reboot it would start what
# was running): a sandbox runs only with a coi that watches it, its network proven, its
# time limit and monitor in place. Without this, what the agent left to run at boot (a cron
# @reboot, a unit) would run unwatched; a persistent sandbox comes back at its next session.
NO_AUTOSTART = {"boot.autostart": "false"}


def instance_config(
    spec: SandboxSpec,
    has_extension: Callable[[str], bool] = lambda _name: False,
    *,
    mknod: bool = False,
) -> dict[str, str]:
    owner = host_owner_uid(spec.workspace)
    gid = host_owner_gid(spec.workspace, owner)
    config = {
        **docker_ready_config(has_extension, mknod_works=mknod, setxattr=spec.intercept_setxattr),
        **NO_AUTOSTART,
        labels.WORKSPACE: str(spec.workspace),
        labels.PERSISTENT: "true" if spec.persistent else "false",
        # Who made it: `coi clean` removes a `coi run` sandbox whose coi process died.
        **labels.owner_config(spec.kind),
        **spec.limits.config,
    }
    if spec.alias:
        config[labels.ALIAS] = spec.alias
    if spec.review:
        config[labels.REVIEW] = spec.review  # `coi clean --reviews` keeps a review in use
    if spec.limits.tmpfs_size:
        config["raw.lxc"] = spec.limits.raw_lxc()
    if spec.remote:
        return config  # the workspace is a copy there, owned by the agent: no mapping
    # The agent's uid inside *is* the user's uid outside, for the whole container: files it
    # creates in the workspace belong to the user who ran coi (root too, where the daemon can
    # map it: Sandbox.check_owner refuses first where it cannot).
    config["raw.idmap"] = (
        f"both {owner} {spec.code_uid}"
        if owner == gid
        else f"uid {owner} {spec.code_uid}\ngid {gid} {spec.code_uid}"
    )
    return config


# The daemon's own anti-spoofing on the sandbox's NIC, enforced host-side on the bridge where
# root inside cannot undo it: frames only from the NIC's own MAC, IPv4 only from its own
# address (no second address, no neighbour's), and no IPv6 at all on coi's IPv4-only bridges
# (the daemon drops every IPv6 frame when the bridge has no IPv6 of its own), whatever
# sysctls root inside changes. Needs the `container_nic_ipfilter` API extension.
NIC_FILTERING = {
    "security.mac_filtering": "true",
    "security.ipv4_filtering": "true",
    "security.ipv6_filtering": "true",
}


def _nic(
    spec: SandboxSpec, addr: Address | None, *, filtering: bool, network: str | None = None
) -> dict[str, str]:
    nic = {"type": "nic", "network": network or spec.network, "name": "eth0"}
    if addr is not None:
        nic["ipv4.address"] = addr.ip
    if filtering:
        nic.update(NIC_FILTERING)
    if spec.policy is not None and spec.policy.mode != "open":
        # Sandboxes sharing a policy bridge cannot talk to each other even where the host
        # does not pass bridged traffic through the firewall (no br_netfilter).
        nic["security.port_isolation"] = "true"
    return nic


def instance_devices(
    spec: SandboxSpec,
    addr: Address | None = None,
    *,
    filtering: bool = True,
    network: str | None = None,
    forwarded: Mapping[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, str]]:
    """The sandbox's devices; `network`: the bridge it is on (default: the spec's);
    `forwarded`: its published ports and sockets (`forwards.forward_devices`)."""
    devices: dict[str, dict[str, str]] = {
        "root": {"type": "disk", "path": "/", "pool": spec.pool, **spec.limits.root_disk},
        "eth0": _nic(spec, addr, filtering=filtering, network=network),
    }
    if spec.remote:
        # A remote daemon cannot mount this machine's folders: the workspace is copied in
        # (coi.sessions.remote), masked files left out.
        devices.update(forwarded or {})
        return devices
    devices["workspace"] = {
        "type": "disk",
        "source": str(spec.source or spec.workspace),
        "path": spec.workspace_target,
    }
    if spec.protection is not None:
        devices.update(protected.devices(spec.protection, spec.workspace_target))
    if spec.masks is not None:
        devices.update(masks.devices(spec.masks, spec.workspace_target, coi_home()))
    for i, m in enumerate(spec.mounts):
        dev = {"type": "disk", "source": str(m.host), "path": m.container}
        if m.readonly:
            dev["readonly"] = "true"
        devices[f"mount-{i}"] = dev
    devices.update(forwarded or {})
    return devices


# Commands start a fraction of a second after the container: on a systemd image, wait until
# its sockets listen, so the system bus and socket-activated services (Docker) answer the very
# first command. Polling cost CPU when it counts most (ten sandboxes booting at once on two
# cores ran 22 `sleep` and 5 `systemctl` per sandbox, most of them this wait's, counted with
# process accounting), so the wait blocks in systemd instead: once systemd's own socket is
# there (some 0.1 s into the boot), one `systemctl start sockets.target` joins the boot's job
# for that target and returns when it is done; in a booted system it changes nothing, the
# target being active. Bounded: 10 s for systemd's socket, 10 s for the target.
BOOTED = r"""
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  i=0
  while [ $i -lt 500 ] && [ ! -e /run/systemd/private ]; do sleep 0.02; i=$((i+1)); done
  timeout 10 systemctl start sockets.target 2>/dev/null || true
fi
"""


class Sandbox:
    """A session's container: created (or reused), entered as the agent user, removed."""

    def __init__(self, client: IncusClient, spec: SandboxSpec, *, log: Log) -> None:
        self.client = client
        self.spec = spec
        self.log = self.teed(log)
        self.name = ""
        self.slot = 0
        self.created = False
        self.guard: Guard | None = None
        self.deadline = 0.0
        self.fingerprint = ""
        # The sandbox's reserved address (None: it gets one by DHCP).
        self.address: Address | None = None
        # The template it was made from (None: from the image, or reused).
        self.template: str | None = None
        # The bridge it is on: the policy's (see `_attach_network`), else the spec's.
        self.network = spec.network
        # The monitor's settings, with its view of this sandbox's network once known.
        self.monitor = replace(spec.monitor) if spec.monitor is not None else None
        self._claims = SlotClaims(coi_home() / "locks")
        self._starting = template.Starting(coi_home() / "locks")
        self._known_absent = False  # choose_slot saw that the slot has no container
        # The ports this sandbox publishes (known once its slot is) and their devices with
        # its sockets' (see `_plan_forwards`).
        self.published: tuple[forwards.Published, ...] = ()
        self._forwarded: dict[str, dict[str, str]] = {}
        self._ws_hash = naming.workspace_hash(str(spec.workspace))
        # Running spares (coi.sessions.warm): the one this session's slot holds, listed under
        # its claim; whether this sandbox booted before its session (no boot wait, no set-up
        # then); whether this process is making a spare (no session log, no monitor).
        self._spare: Instance | None = None
        self._booted = False
        self._proven = False  # its network proven as the spare was made, and that still holds
        self._wanted_key = ""
        self._net: Network | None = None
        self._net_attached = False
        self.making_spare = False

    # -- coi's own log of the session (`coi logs`) -----------------------------------------

    def record(self, event: str, text: str, **facts: Any) -> None:
        """An event of this session in its log (nothing before the container has a name, and
        nothing of a spare: its session has not begun)."""
        if self.name and not self.making_spare:
            session_log.record(self.name, event, text, **facts)

    def teed(self, log: Log, event: str = "note") -> Log:
        """`log`, and each line recorded in the session's log too."""

        def both(msg: str) -> None:
            log(msg)
            self.record(event, msg.strip())

        return both

    def _record_start(self) -> None:
        spec = self.spec
        if spec.review:
            from coi.review.copy import bind

            # `coi diff --slot N` finds it by its sandbox, `coi review fetch` its daemon.
            bind(spec.review, self.name, remote=spec.remote or "", project=self.client.project)
        self.record(
            "start",
            f"{'took the booted spare' if self._booted else 'made' if self.created else 'reused'}"
            f" {self.name} from {spec.image} for "
            f"{spec.workspace}",
            image=spec.image,
            workspace=str(spec.workspace),
            kind=spec.kind,
            persistent=spec.persistent,
            network=spec.policy.mode if spec.policy else "open",
            monitor=bool(spec.monitor is not None and spec.monitor.enabled),
            masked=[m.rel for m in spec.masks.paths] if spec.masks else [],
            pid=os.getpid(),
        )

    # -- naming ---------------------------------------------------------------------------

    def choose_slot(self, slot: int | None) -> None:
        """Pick the container: the given slot (or the next free after it), else the first free."""
        ws = str(self.spec.workspace)
        existing: set[str] = set()
        listed = False

        def taken(n: int) -> bool:
            # Listed under the claim lock, at the first slot looked at: a list taken before
            # it would miss the container of a coi that claimed a slot, made its container
            # and ended (releasing the claim) while this one waited for the lock.
            nonlocal listed
            if not listed:
                existing.update(self.client.instances.names())
                listed = True
            return naming.container_name(ws, n) in existing

        if slot:
            try:
                inst = self.client.instances.get(naming.container_name(ws, slot))
                # A running spare in the slot asked for is this session's to take (or remove).
                running = inst.running and not warm.is_spare(inst)
            except NotFound:
                running = False
            if running and not self.spec.persistent:
                new = self._claims.allocate(
                    self._ws_hash, taken, start=slot + 1, most=self.spec.max_slots
                )
                self.log(f"Slot {slot} is occupied, using slot {new} instead")
                slot = new
        elif (found := self._claim_spare()) is not None:
            slot = found
            self.log(f"Auto-allocated slot {slot} (a booted spare waits there)")
        else:
            slot = self._claims.allocate(self._ws_hash, taken, most=self.spec.max_slots)
            self.log(f"Auto-allocated slot {slot}")
        self.slot = slot
        self.name = naming.container_name(ws, slot)
        # Listed under this slot's claim: no other coi makes its container meanwhile.
        self._known_absent = listed and self.name not in existing

    def _claim_spare(self) -> int | None:
        """Claim a slot whose container is a ready running spare of this workspace; None
        when there is none (or this session does not use them). The spares are listed under
        the claim lock, as `taken` lists: a spare another coi took meanwhile is a session's
        sandbox now, and its slot is that coi's."""
        if self.making_spare or not warm.wanted(self.spec):
            return None
        ws = str(self.spec.workspace)
        # Only one made for exactly this session's sandbox: one made for other settings (a
        # shell's, where this is a run) is left in its slot, for the maker this session
        # starts at its end to replace, not removed while this session waits.
        want = self.wanted_key()
        spares: dict[str, Instance] = {}
        listed = False

        def not_a_spare(n: int) -> bool:
            nonlocal listed
            if not listed:
                ready = warm.ready_for(self.client.instances.list(), ws)
                spares.update(
                    {k: i for k, i in ready.items() if i.config.get(labels.SPARE_KEY) == want}
                )
                listed = True
            return naming.container_name(ws, n) not in spares

        try:
            slot = self._claims.allocate(self._ws_hash, not_a_spare, most=self.spec.max_slots)
        except SlotsFull:
            return None  # no spare free to take: the usual slot, made the usual way
        self._spare = spares[naming.container_name(ws, slot)]
        return slot

    def use_container(self, name: str) -> None:
        """Use an existing container by name (`--container`)."""
        if not self.client.instances.exists(name):
            raise SessionError(f"container '{name}' not found")
        self.name = name

    # -- lifecycle --------------------------------------------------------------------------

    def ensure_image(self) -> None:
        image = self.spec.image
        if len(image) == 64 and all(c in "0123456789abcdef" for c in image):
            self.fingerprint = image if self.client.images.exists_fingerprint(image) else ""
        else:
            self.fingerprint = self.client.images.alias_target(image) or ""
        if not self.fingerprint:
            raise SessionError(
                f"image '{self.spec.image}' not found - run 'coi build' first",
                resolution="Build it with 'coi build', or pass --image coi-tiny for a minimal one.",
            )

    @cached_property
    def _pool_config(self) -> dict[str, str]:
        """The storage pool's config, read once: `coi setup`'s verdicts are kept on it."""
        pool = self.client.networks.pool(self.spec.pool)
        return dict(pool.config) if pool else {}

    @cached_property
    def _mknod_works(self) -> bool:
        """Whether the daemon's mknod interception works (`coi setup`'s verdict)."""
        return mknod_works(self._pool_config)

    @cached_property
    def _shifts(self) -> bool:
        """Whether the daemon shifts ownership on the fly (one read of the pool, then kept):
        it can map host root, and templates do not pay off there."""
        return not template.pay_off(self.client, self.spec.pool, self._pool_config)

    def check_owner(self) -> None:
        """Refuse, before anything is made, a workspace the agent could not write: one owned
        by root where the daemon cannot map host root to the agent's uid."""
        if self.spec.remote:
            return
        owner = host_owner_uid(self.spec.workspace)
        if owner != 0:
            self._check_owner_delegated(owner)
            return
        problem = root_mapping_problem(self._shifts, local=self.client.endpoint.is_local)
        if problem is None:
            return
        raise SessionError(
            f"the workspace {self.spec.workspace} belongs to root and {problem}: the agent "
            f"(uid {self.spec.code_uid}) could not write it",
            resolution="Run coi as the user who owns the folder (or with sudo from that user), "
            "or chown the folder to a regular user. On Incus, 'sudo coi setup' adds "
            "'root:0:1' to /etc/subuid and /etc/subgid so root's own folders can be mapped.",
        )

    def _check_owner_delegated(self, owner: int) -> None:
        """The daemon maps the folder's owner to the agent: refuse, before anything is
        made, an owner it may not map (the daemon would fail the start with no reason)."""
        if not self.client.endpoint.is_local:
            return
        gid = host_owner_gid(self.spec.workspace, owner)
        problem = owner_mapping_problem(owner, gid)
        if problem is not None:
            raise SessionError(
                f"the workspace {self.spec.workspace} cannot be mapped into a sandbox: {problem}",
                resolution="Run coi on a folder of your own, or let the daemon map that "
                f"owner: add 'root:{owner}:1' to /etc/subuid and 'root:{gid}:1' to "
                "/etc/subgid ('sudo coi setup' does it for the users it knows), then "
                "restart the daemon.",
            )

    def create_or_reuse(self, then: Callable[[], None] | None = None) -> None:
        """Create the container, or reuse this slot's persistent one (`ensure_image` first).

        `then` runs as soon as the container runs, before its network is proven: work that
        can overlap the proof (the credential broker's device takes the daemon a second)."""
        if not self.spec.alias:
            self._made_or_said(then)
            self._record_start()
            return
        # Held until the container carries it: no other coi of this user takes the name.
        with aliases.reserved(coi_home() / "locks", self.spec.alias):
            aliases.check_free(self.client, self.spec.alias, container=self.name)
            self._made_or_said(then)
        self._record_start()

    def _made_or_said(self, then: Callable[[], None] | None) -> None:
        """`_create_or_reuse`; when the daemon cannot start the ports' device, the port
        taken since coi's check is named (the daemon's words depend on its helper's timing,
        and "Failed to receive fd from listener process" names no port)."""
        try:
            self._create_or_reuse(then)
        except BackendError as err:
            if not self.published or "proxy device" not in err.message:
                raise
            inst = self.instance()
            held = forwards.published_of(inst.devices) if inst and inst.running else ()
            try:
                forwards.check_free(self.published, skip=held)
            except SessionError as taken:
                taken.details = f"the daemon said: {err.message}"
                raise taken from err
            raise

    def _plan_forwards(self, inst: Instance | None) -> None:
        """This slot's published ports and the sockets' devices, checked before anything
        starts: the daemon has what they need, and every host port is free (those the
        reused container `inst` publishes already are its own)."""
        spec = self.spec
        if not spec.ports and not spec.sockets:
            return
        if not self.client.endpoint.is_local:
            raise SessionError(
                "published ports and forwarded sockets need the local daemon",
                details=f"the daemon is {self.client.endpoint.describe()}",
                resolution="Remove [ports], [[sockets]], [ssh] forward_agent and --port for "
                "a remote daemon.",
            )
        missing = forwards.missing_extensions(
            self.client.has_extension, ports=bool(spec.ports), sockets=bool(spec.sockets)
        )
        if missing:
            raise SessionError(
                f"this daemon cannot publish ports or forward sockets: it lacks the API "
                f"extension(s) {', '.join(missing)}",
                resolution="Upgrade the daemon, or remove [ports], [[sockets]] and --port.",
            )
        self.published = spec.ports.for_slot(self.slot)
        self._forwarded = forwards.forward_devices(
            self.published, spec.sockets, agent_uid=spec.code_uid
        )
        held = forwards.published_of(inst.devices) if inst is not None and inst.running else ()
        forwards.check_free(self.published, skip=held)
        if self.published:
            self.log(
                "Publishing ports: " + ", ".join(p.text() for p in self.published)
                + (f" (slot {self.slot})" if self.slot else "")
            )  # fmt: skip

    def _refresh_forwards(self, inst: Instance) -> None:
        """A reused container publishes this session's ports and sockets, no others."""
        current = {k: dict(v) for k, v in inst.devices.items() if forwards.is_forward(k)}
        for name in current:
            if name not in self._forwarded:
                self.client.instances.remove_device(self.name, name)
        for name, dev in self._forwarded.items():
            if current.get(name) != dev:
                self.client.instances.add_device(self.name, name, dev)

    def _create_or_reuse(self, then: Callable[[], None] | None) -> None:
        self.check_owner()
        self.begin()
        inst = self._spare
        try:
            if inst is None and not self._known_absent:
                inst = self.client.instances.get(self.name)
        except NotFound:
            pass
        if inst is not None and warm.is_spare(inst):
            if self._take_spare(inst):
                self._after_made(then)
                return
            inst = None  # removed: made afresh below
        reused = inst is not None and (
            self.spec.persistent or inst.config.get(labels.PERSISTENT) == "true"
        )
        self._plan_forwards(inst if reused else None)
        if inst is not None:
            if self.spec.persistent or inst.config.get(labels.PERSISTENT) == "true":
                nic = inst.expanded_devices.get("eth0") or {}
                self.address = address.of_nic(self.client.networks.get(nic.get("network", "")), nic)
                self._protect()
                self._harden_nic(inst)
                if inst.config.get("boot.autostart") != "false":
                    self.client.instances.set_config(self.name, NO_AUTOSTART)
                self._fit_workspace(inst)
                if self.spec.target and inst.location != self.spec.target:
                    # Kept where it is (moving it is `incus move`'s job): said, not hidden.
                    self.log(
                        f"Note: the persistent sandbox {self.name} is on member "
                        f"{inst.location}, not {self.spec.target} (--target places a new one)"
                    )
                self._refresh_limits(inst.expanded_devices, running=inst.running)
                self._refresh_forwards(inst)
                if self.spec.alias and inst.config.get(labels.ALIAS) != self.spec.alias:
                    self.client.instances.set_config(self.name, {labels.ALIAS: self.spec.alias})
                if inst.status == "Frozen":
                    self.client.instances.unfreeze(self.name)
                elif not inst.running:
                    self.log("Restarting existing persistent container...")
                    self.client.instances.start(self.name)
                    self.wait_ready()
                else:
                    self.log("Container already running, reusing...")
                if then is not None:
                    then()
                self.verify_network()
                self._start_clock()
                return
            self.log("Found stopped leftover container from previous session, deleting...")
            self.client.instances.delete(self.name, force=True)
        # The protected paths are recorded (scanned, copied, written and synced) while the
        # daemon makes and starts the sandbox: nothing of the agent runs in it before the
        # first exec, which comes after the record is complete (joined below).
        recording = Meanwhile(self._protect)
        try:
            self._make()
        except BaseException:
            recording.join(quiet=True)
            raise
        recording.join()
        self._after_made(then)

    def _take_spare(self, inst: Instance) -> bool:
        """Make this slot's running spare (coi.sessions.warm) this session's sandbox. False,
        with the spare removed, when it is not one this session would make: other settings,
        an image rebuilt since, a spare still being made (its maker died, or was overtaken
        by a `--slot` asking for it), or stopped (the daemon restarted)."""
        net = self._network() or self.client.networks.get(self.network)
        if not (
            warm.is_ready(inst)
            and warm.wanted(self.spec)
            and inst.config.get(labels.SPARE_KEY) == self.wanted_key()
        ):
            self.log("Removing a booted spare made for other settings...")
            self.client.instances.delete(self.name, force=True)
            return False
        self.log("Taking a booted spare sandbox")
        # From here it is this session's: a coi killed now leaves it to the keeper and to
        # `coi clean` as any session's sandbox, never as a spare for another session.
        try:
            self.client.instances.set_config(
                self.name,
                {
                    **labels.owner_config(self.spec.kind),
                    **dict.fromkeys((labels.SPARE_KEY, labels.SPARE_READY, labels.SPARE_PROOF), ""),
                },
            )
        except NotFound:
            return False  # gone meanwhile (`coi kill --all`): made afresh
        nic = inst.expanded_devices.get("eth0") or {}
        self.address = address.of_nic(net, nic)
        self.created = self._booted = True
        self._proven = warm.proof_holds(inst, self.client.server.pid)
        self._protect()
        return True

    def wanted_key(self) -> str:
        """The key (`warm.key`) of the sandbox this session would make, read once."""
        if not self._wanted_key:
            self._network()
            config = instance_config(self.spec, self.client.has_extension, mknod=self._mknod_works)
            self._wanted_key = self._spare_key(config)
        return self._wanted_key

    def _network(self) -> Network | None:
        """`_attach_network`, once: the policy's bridge made or updated, as read."""
        if not self._net_attached:
            self._net = self._attach_network()
            self._net_attached = True
        return self._net

    def _spare_key(self, config: Mapping[str, str]) -> str:
        """What this session's sandbox is made of (`warm.key`), once its network is known."""
        devices = instance_devices(
            self.spec, None, filtering=self._filtering, network=self.network,
            forwarded=self._forwarded,
        )  # fmt: skip
        return warm.key(
            config,
            devices,
            fingerprint=self.fingerprint,
            ephemeral=self._ephemeral(),
            setup=self.spec.setup,
            drop_root=self.spec.drop_root,
        )

    def make_spare(self) -> None:
        """Make a running spare for this spec's workspace in its first free slot: created,
        started, booted, its set-up run and its network proven, then marked ready. The slot
        stays claimed by this process until then, so no session takes it half-made."""
        self.making_spare = True
        self.monitor = None
        self.ensure_image()
        self.choose_slot(None)
        try:
            self._make()
            self.verify_network()
            made = self.client.instances.get(self.name)
            self.client.instances.set_config(
                self.name,
                {
                    labels.SPARE_READY: "true",
                    labels.SPARE_PROOF: warm.proof_mark(made, self.client.server.pid),
                },
            )
        except BaseException:
            with contextlib.suppress(BackendError):  # not made at all: the error says why
                self.client.instances.delete(self.name, force=True)
            raise
        finally:
            self.release()

    def _fit_workspace(self, inst: Instance) -> None:
        """A reused persistent sandbox mounts what this session works on: your folder, or
        this session's review copy. Switched while it is stopped; a running one that works
        on something else is refused (its session is still going on)."""
        want = str(self.spec.source or self.spec.workspace)
        dev = inst.devices.get("workspace")
        if self.spec.remote or dev is None or dev.get("source") == want:
            return
        if inst.status != "Stopped":
            on = inst.config.get(labels.REVIEW)
            if self.spec.review:
                from coi.review.copy import discard, find

                discard(find(self.spec.review, None))  # made for this session: not wanted
            raise UsageError(
                f"the persistent sandbox {self.name} is running on "
                + (f"review {on}" if on else "your folder itself")
                + (", not on a new review copy" if self.spec.review else ", not on it"),
                resolution=f"Stop it first ('coi shutdown {self.name}'), then start again; "
                "or attach to its session ('coi attach').",
            )
        self.client.instances.patch(
            self.name,
            {
                "devices": {"workspace": {**dev, "source": want}},
                "config": {labels.REVIEW: self.spec.review},
            },
        )

    def _make(self) -> None:
        """Create and start a new sandbox (from a spare, a template copy or the image)."""
        net = self._network()
        self.log(f"Creating container from {self.spec.image}...")
        config = instance_config(self.spec, self.client.has_extension, mknod=self._mknod_works)
        if self.making_spare:
            config |= {labels.KIND: warm.KIND, labels.SPARE_KEY: self._spare_key(config)}
        # A spare lies on whichever member made it: one asked for (`--target`) is made there.
        self.template = None if self.spec.target else self._template(config)
        net = net or self.client.networks.get(self.network)
        if not (self.template and self._from_spare(self.template, config, net)):
            source = {"type": "copy", "source": self.template} if self.template else None
            self._with_address(
                net,
                lambda devices, boot: self.client.instances.create(
                    self.name,
                    image=self.spec.image,
                    source=source,
                    config={**config, **boot},
                    devices=devices,
                    ephemeral=self._ephemeral(),
                    start=True,
                    description=self._description(),
                    target=self.spec.target,
                ),
            )
        self.created = True

    def _after_made(self, then: Callable[[], None] | None) -> None:
        """The new sandbox runs: what overlaps its proof (`then`), the proof, the clock."""
        if then is not None:
            then()
        try:
            # A started container takes exec at once; no separate readiness round trip.
            self.verify_network()
        except BackendError:
            self.wait_ready()
            self.verify_network()
        if self.spec.remote:
            # Once it has booted (the proof waited for that): the workspace copy goes in.
            from coi.sessions.remote import push_workspace

            push_workspace(self.client, self.name, self.spec, self.log)
        self._start_clock()

    def _ephemeral(self) -> bool:
        # A `coi run` sandbox is ephemeral: stopping it is enough to leave nothing behind. A
        # shell's is not, so that the conversation can still be saved when the agent powers
        # the container off (upstream's choice too); `coi clean` removes it later.
        return not self.spec.persistent and self.spec.kind == "run"

    def _description(self) -> str:
        return f"coi session for {self.spec.workspace}"

    def _with_address(
        self,
        net: Network | None,
        make: Callable[[dict[str, dict[str, str]], dict[str, str]], object],
    ) -> None:
        """`make` creates and starts the sandbox (or readies a spare and starts it), given its
        devices, the NIC holding a reserved address, and the config that hands that address
        to the container's init. The daemon checks the address when the container starts: if
        a sandbox made at the same moment holds it, move to another."""
        self.address = address.choose(net) if net is not None else None
        taken: set[str] = set()
        while True:
            boot = self.address.config() if self.address else {}
            try:
                if taken and self.client.instances.exists(self.name):  # made, start refused
                    nic = _nic(
                        self.spec, self.address, filtering=self._filtering, network=self.network
                    )
                    self.client.instances.patch(
                        self.name, {"config": boot, "devices": {"eth0": nic}}
                    )
                    self.client.instances.start(self.name)
                else:
                    devices = instance_devices(
                        self.spec,
                        self.address,
                        filtering=self._filtering,
                        network=self.network,
                        forwarded=self._forwarded,
                    )
                    make(devices, boot)
                return
            except BackendError as err:
                if net is None or self.address is None or not address.is_taken(err):
                    raise
                taken.add(self.address.ip)
                self.address = address.choose(net, avoid=taken) if len(taken) < 16 else None
                if self.address is None:
                    raise

    @property
    def _filtering(self) -> bool:
        return self.client.has_extension("container_nic_ipfilter")

    def _harden_nic(self, inst: Instance) -> None:
        """A persistent container made before coi filtered NICs gets the filtering now,
        before the agent's next boot or command (the daemon applies it to a running one)."""
        nic = dict(inst.devices.get("eth0") or {})
        if not nic or not self._filtering or all(nic.get(k) == v for k, v in NIC_FILTERING.items()):
            return
        self.client.instances.patch(self.name, {"devices": {"eth0": {**nic, **NIC_FILTERING}}})

    def _template(self, config: Mapping[str, str]) -> str | None:
        """The pre-shifted template to copy instead of unpacking the image (None: none)."""
        if self.spec.templates is False or not self.fingerprint:
            return None
        if self.spec.templates is None and self._shifts:
            return None
        return template.ready(
            self.client,
            self.fingerprint,
            config,
            pool=self.spec.pool,
            lock_dir=coi_home() / "locks",
            log=self.log,
        )

    def _from_spare(self, tmpl: str, config: Mapping[str, str], net: Network | None) -> bool:
        """Take a spare copy of the template: rename, configure, start. False: none ready."""
        if self.spec.spares <= 0 or not template.claim(self.client, tmpl, self.name):
            return False
        self.log("Taking a ready spare copy of the image")

        def configure_and_start(devices: dict[str, dict[str, str]], boot: dict[str, str]) -> None:
            body = {
                "config": {**dict.fromkeys(template.TEMPLATE_KEYS, ""), **config, **boot},
                "devices": devices,
                "ephemeral": self._ephemeral(),
                "description": self._description(),
            }
            self.client.instances.patch(self.name, body)
            self.client.instances.start(self.name)

        try:
            self._with_address(net, configure_and_start)
        except BackendError:
            # Leave nothing half-made behind; the error itself comes again from a plain copy.
            self.client.instances.delete(self.name, force=True)
            return False
        return True

    def begin(self) -> None:
        """This process is about to make its sandbox: sandboxes started together are not
        slowed by copies of spares (see `template.replenish`) until each is `up`."""
        self._starting.enter()

    def up(self) -> None:
        """The agent or command runs: copying spares no longer slows this sandbox's start."""
        self._starting.leave()

    def replenish(self) -> None:
        """Have the spares this sandbox used up replaced, without waiting: the requests go
        from a detached child (with 2 CPUs busy they take the daemon up to a second)."""
        self.up()
        if warm.wanted(self.spec) and not self.making_spare:
            self._boot_spares()
        if not self.template or self.spec.spares <= 0:
            return
        tmpl, want, own = self.template, self.spec.spares, self.name
        endpoint, project = self.client.endpoint, self.client.project

        def refill() -> None:
            try:
                with IncusClient(endpoint, project=project) as client:
                    template.replenish(client, tmpl, want, lock_dir=coi_home() / "locks", own=own)
            except (BackendError, OSError) as err:
                # Nobody waits for this child: a failed refill only means the next sandbox
                # is copied from the template, so it is noted, not shown.
                _note_spares(f"spares of {tmpl}: {err}")

        detached(refill)

    def _boot_spares(self) -> None:
        """Have running spares (coi.sessions.warm) made for this workspace until it has
        `running_spares` of them, from a detached child: after this session's sandbox has
        gone (an ended `coi run`'s slot is the one the next session would take), each once
        no other sandbox of this user is starting (it would slow that one's start)."""
        # An ended `coi run` is being removed: its slot is free once it is gone.
        ended = self.name if self._ephemeral() else ""
        # The child runs a new interpreter (coi.sessions.warm), not this one's fork: a fork
        # shares this process's memory until one of them writes it, and this process's
        # exit then copied page after page (25 ms more to `coi run`'s return, measured).
        # What it is to make goes in a file only this user can read (its own ~/.coi).
        import pickle

        job = coi_home() / "locks" / f"spare-{os.urandom(6).hex()}.job"
        try:
            job.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(job, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                pickle.dump((self.spec, ended, self.client.endpoint, self.client.project), f)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as err:
            # The session itself is done and fine: no spare is only a slower next start.
            job.unlink(missing_ok=True)
            _note_spares(f"running spares of {self.spec.workspace}: {err}")
            return
        # The workspace on the command line too: `ps` says what the child is for.
        argv = [sys.executable, "-m", "coi.sessions.warm", str(job), str(self.spec.workspace)]
        detached(lambda: os.execv(sys.executable, argv))

    # -- protection and limits ------------------------------------------------------------

    def _protect(self) -> None:
        """Record and copy the protected paths before the agent can touch them."""
        plan = self.spec.protection
        if plan is None or not plan.enabled:
            return
        guard = Guard(self.name)
        if guard.exists():
            # A record left by an earlier session in this slot that was never verified at
            # its end (detached, then removed by other means): settle it first.
            guard.enforce(self.log)
        for note in [*plan.notes, *guard.record(plan)]:
            self.log(note)
        self.log(protected.summary(plan))
        self.guard = guard

    def _refresh_limits(self, devices: Mapping[str, Mapping[str, str]], *, running: bool) -> None:
        """A reused container gets this session's limits (and protection mounts if stopped)."""
        if self.spec.limits.config:
            self.client.instances.set_config(self.name, self.spec.limits.config)
        if self.spec.masks is not None:
            # A mask may be hot-plugged: nothing of the workspace is mounted over it later.
            hide = masks.devices(self.spec.masks, self.spec.workspace_target, coi_home())
            for dev, body in hide.items():
                if dict(devices.get(dev) or {}) != body:
                    self.client.instances.add_device(self.name, dev, body)
        plan = self.spec.protection
        if plan is None:
            return
        wanted = protected.devices(plan, self.spec.workspace_target)
        missing = {k: v for k, v in wanted.items() if dict(devices.get(k) or {}) != v}
        if not missing:
            return
        if running:
            # Hot-plugging could mount `.git` over the read-only mounts inside it.
            self.log(
                "Warning: this running container lacks read-only mounts for protected "
                "paths; they are still verified and restored from the host"
            )
            return
        for dev, spec in missing.items():
            self.client.instances.add_device(self.name, dev, spec)

    def _start_clock(self) -> None:
        """max_duration: a watchdog on the host stops the container when time is up."""
        limits = self.spec.limits
        if not limits.max_duration or not limits.auto_stop:
            return
        self.deadline = time.time() + limits.max_duration
        self.client.instances.set_config(self.name, {labels.DEADLINE: f"{self.deadline:.3f}"})
        spawn_watchdog(
            self.name,
            self.deadline,
            project=self.spec.project,
            remote=self.spec.remote,
            graceful=limits.stop_graceful,
        )
        sys.stderr.write(f"[limits] Container will auto-stop after {limits.duration_text}\n")

    def out_of_time(self) -> bool:
        return bool(self.deadline) and time.time() >= self.deadline - 0.5

    def settle_protection(self, *, removed: bool) -> None:
        """Verify the protected paths once more; forget the record if the container is gone."""
        if self.guard is not None:
            settle(self.name, removed=removed, log=self.log)

    def _attach_network(self) -> Network | None:
        """Make or update the policy's network; the network as read, when still current."""
        if self.spec.policy is None:
            return None
        self.network, net = ensure_network(
            self.client,
            self.spec.policy,
            default_network=self.spec.network,
            lock_dir=coi_home() / "locks",
            log=self.log,
        )
        return net

    def _take_root(self) -> None:
        """Take from the agent user every way to root the images give it (passwordless sudo,
        the docker group), then check it as that user: a sandbox where it can still become
        root is refused, never started as if it could not.

        :raises SessionError: the agent can still run sudo.
        """
        user = self.spec.code_user
        # The user out of those groups' member lists, edited in place (gpasswd is not in
        # every image: busybox has none): ":user," / ":user" / ",user," / ",user" each.
        groups = "|".join(ROOT_GROUPS)
        edit = f"/^({groups}):/ {{ s/:{user}(,|$)/:/; s/,{user}(,|$)/\\1/; }}"
        script = (
            f"rm -f /etc/sudoers.d/{user}; "
            f"for f in /etc/group /etc/gshadow; do [ -f $f ] && sed -i -r '{edit}' $f; done; true"
        )
        self.client.exec.capture(self.name, ExecRequest(["sh", "-c", script]))
        check = self.client.exec.capture(self.name, self.request(["sh", "-c", _ROOT_CHECK], {}))
        if check.exit_code != 0:
            raise SessionError(
                "could not take root from the agent in this sandbox (security.agent_root = "
                "false): " + check.stdout.decode(errors="replace").strip(),
                resolution="Use an image whose agent user gets root only through sudo and "
                "the docker group (coi build's does), or allow it: security.agent_root = true.",
            )
        self.record("policy", "the agent has no way to root (no sudo, no docker group)")

    def verify_network(self) -> None:
        """Refuse to go on unless the policy is in force, checked from inside."""
        policy = self.spec.policy
        network = self.network
        gateway = ""
        # A running spare booted and ran its set-up before its session.
        then = "" if self._booted else BOOTED + self.spec.setup
        if self._proven:
            # Proven as the spare was made, on this very NIC, by this very daemon, with the
            # rules this session asks for (`warm.proof_holds`): not proven a second time.
            mode = policy.mode if policy else "open"
            self.record("policy", f"network {mode}: in force (proven as the spare was made)")
        elif policy is None or policy.mode == "open":
            wait_for_network(self.client, self.name, self.address, then=then)
        else:
            if not self.created:
                # A reused container keeps the bridge it was made with.
                inst = self.client.instances.get(self.name)
                network = (inst.expanded_devices.get("eth0") or {}).get("network", network)
            gateway = prove_enforced(
                self.client, self.name, network, self.log, self.address,
                then=then,
                tidy=self.lasting,
                remote=not self.client.endpoint.is_local,
            )  # fmt: skip
        if not self._proven:
            mode = policy.mode if policy else "open"
            self.record("policy", f"network {mode}: in force", mode=mode, gateway=gateway)
        if self.spec.drop_root and not self._booted:
            self._take_root()
        elif self.spec.drop_root:
            self.record("policy", "the agent has no way to root (checked as the spare was made)")
        mon = self.monitor
        if mon is not None and mon.enabled:
            from coi.monitor.monitor import net_context

            # The monitor judges connections against this sandbox's own policy.
            mon.net = net_context(
                policy.mode if policy else "open",
                gateway or gateway_of(self.client, network),
                policy.allow_local if policy else True,
                [t.cidr for t in policy.allowed] if policy else [],
            )

    @property
    def lasting(self) -> bool:
        """The container outlives this session (persistent, or not made by it): the daemon's
        records of the execs coi makes in it are removed, not left to pile up there."""
        return self.spec.persistent or not self.created

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client.exec.quiet(self.name, ExecRequest(["true"])) == 0:
                    return
            except BackendError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise SessionError("container failed to become ready")
            time.sleep(0.1)

    def request(
        self,
        command: list[str],
        env: Mapping[str, str],
        *,
        cwd: str | None = None,
        once: bool = False,
    ) -> ExecRequest:
        """Run `command` as the agent user, in the workspace, with the session environment;
        `once`: a user's command, never run twice (see `ExecRequest`)."""
        return ExecRequest(
            command=command,
            env=session_env(self.spec, env),
            cwd=cwd or self.spec.workspace_target,
            user=self.spec.code_uid,
            group=self.spec.code_uid,
            once=once,
        )

    def running(self) -> bool:
        inst = self.instance()
        return inst is not None and inst.running

    def instance(self) -> Instance | None:
        """The container as the daemon has it now; None if it is gone."""
        try:
            return self.client.instances.get(self.name)
        except NotFound:
            return None

    def remove(self) -> None:
        """Delete the container, whatever state it is in."""
        self.client.instances.delete(self.name, force=True)

    def discard(self) -> str:
        """Remove the sandbox; the id of the daemon's operation still finishing it, or "".

        Stopping an ephemeral container deletes it; the daemon completes the operation after
        coi has exited, so `coi run` returns without the 0.8 s a forced stop takes (not when
        it publishes ports: they are free when coi returns).
        """
        if self.created and self._ephemeral() and not self.published:
            # Made by this session, ephemeral: stopped without first asking what it is (one
            # round trip less). Refused when it is not running (the command powered it
            # off): then it is looked at below.
            try:
                return self.client.instances.stop(self.name, force=True, wait=False) or "-"
            except NotFound:
                return ""
            except BackendError:
                pass
        try:
            inst = self.client.instances.get(self.name)
        except NotFound:
            return ""
        if inst.ephemeral and inst.active and not self.published:
            try:
                return self.client.instances.stop(self.name, force=True, wait=False) or "-"
            except BackendError:
                pass
        # A sandbox that publishes ports is gone before coi returns: the next session may
        # publish them at once (its check would otherwise find them still held).
        self.client.instances.delete(self.name, force=True)
        return ""

    def stop(self) -> None:
        """Stop gracefully, forcing it after 10 s; nothing to do when it is not running."""
        if not self.running():
            return
        try:
            self.client.instances.stop(self.name, timeout=10)
        except BackendError:
            self.client.instances.stop(self.name, force=True)

    @property
    def claim_path(self) -> Path | None:
        """The file claiming this sandbox's slot (None: no slot claimed)."""
        return self._claims.path(self._ws_hash, self.slot) if self.slot else None

    def release(self) -> None:
        self.up()
        if self.slot:
            self._claims.release(self._ws_hash, self.slot)


# Groups that give their members root, or root's equal (a container runtime's socket).
ROOT_GROUPS = ("sudo", "wheel", "admin", "docker", "incus", "incus-admin", "lxd")
# Run as the agent: fails, saying how, while it can still become root.
_ROOT_CHECK = (
    "if sudo -n true 2>/dev/null; then echo 'sudo works'; exit 1; fi; "
    'for g in $(id -Gn "$(id -un)"); do case $g in docker|sudo|wheel|admin|incus*|lxd) '
    'echo "in group $g"; exit 1;; esac; done; exit 0'
)


class Meanwhile:
    """`fn` run in a thread while the caller goes on; `join` waits for it and raises what it
    raised (`quiet`: not, when the caller is raising an error of its own already)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fn()
            except BaseException as err:  # handed to the caller by join
                self._error = err

        self._thread = threading.Thread(target=run, name="coi meanwhile", daemon=True)
        self._thread.start()

    def join(self, *, quiet: bool = False) -> None:
        self._thread.join()
        if self._error is not None and not quiet:
            raise self._error


def make_spares(spec: SandboxSpec, ended: str, endpoint: Endpoint, project: str) -> None:
    """The detached child of `Sandbox._boot_spares` (`python -m coi.sessions.warm`)."""
    try:
        with IncusClient(endpoint, project=project) as client:
            _make_spares(client, spec, ended)
    except (BackendError, SessionError, OSError) as err:
        # Nobody waits for this child: without a spare the next session is made the usual
        # way, so a failure is noted, not shown.
        _note_spares(f"running spares of {spec.workspace}: {err}")


def _make_spares(client: IncusClient, spec: SandboxSpec, ended: str) -> None:
    lock_dir = coi_home() / "locks"
    deadline = time.monotonic() + 30.0
    while ended and time.monotonic() < deadline and client.instances.exists(ended):
        time.sleep(0.1)
    # Of two sessions of one workspace ending together, one makes its spares.
    ws = str(spec.workspace)
    with tried(lock_dir / f"running-spares-{naming.workspace_hash(ws)}.lock") as mine:
        if not mine:
            return
        want = Sandbox(client, spec, log=lambda _msg: None)
        want.ensure_image()
        have = _drop_stale_spares(client, ws, want.wanted_key(), lock_dir)
        # Each holds a slot of the workspace's `max_slots`.
        for _ in range(min(spec.running_spares, spec.max_slots) - len(have)):
            # Made once no sandbox of this user is starting: it would slow that one's start.
            wait = time.monotonic() + 120.0
            while template.someone_starting(lock_dir) and time.monotonic() < wait:
                time.sleep(0.1)
            try:
                Sandbox(client, spec, log=lambda _msg: None).make_spare()
            except SlotsFull:
                return  # the workspace's sessions hold every slot: nothing to note


def _drop_stale_spares(client: IncusClient, ws: str, key: str, lock_dir: Path) -> list[Instance]:
    """The workspace's running spares worth keeping: ready ones made for `key`, and those
    a coi holds the slot of (being made, or being taken by a session). The others, one its
    maker left half-made or one made for other settings than the last session had, are
    removed, each under its slot's claim: a session taking it at that moment holds the
    claim, so what it is taking is never removed from under it."""
    claims, ws_hash = SlotClaims(lock_dir), naming.workspace_hash(ws)
    keep = []
    for inst in warm.of_workspace(client.instances.list(), ws):
        parsed = naming.parse_name(inst.name)
        if (warm.is_ready(inst) and inst.config.get(labels.SPARE_KEY) == key) or not parsed:
            keep.append(inst)
            continue
        slot = parsed[1]
        try:
            claims.allocate(ws_hash, lambda _n: False, start=slot, most=slot)
        except SlotsFull:
            keep.append(inst)  # a coi holds it
            continue
        try:
            now = client.instances.get(inst.name)  # read again, under the claim
            if not warm.is_spare(now):
                pass  # a session's now: not a spare to count or remove
            elif warm.is_ready(now) and now.config.get(labels.SPARE_KEY) == key:
                keep.append(now)
            else:
                client.instances.delete(inst.name, force=True)
        except NotFound:
            pass
        finally:
            claims.release(ws_hash, slot)
    return keep


def _note_spares(text: str) -> None:
    log = coi_home() / "logs" / "spares.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def detached(fn: Callable[[], None]) -> None:
    """Run `fn` in a grandchild of this process that outlives it and holds none of its files.

    Its descriptors are closed first: a slot lock or the reading end of a pipe kept open by
    the child would hold the slot, or keep a caller reading coi's output, until it ends.
    """
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)  # the first child ends at once: no zombie is left
        return
    try:
        if os.fork() == 0:
            os.setsid()
            os.closerange(0, os.sysconf("SC_OPEN_MAX"))
            for _ in range(3):
                os.open(os.devnull, os.O_RDWR)  # 0, 1 and 2, so stray writes go nowhere
            fn()
    finally:
        os._exit(0)


def build_spec(
    cfg: Config,
    workspace: Path,
    *,
    mounts: list[Mount],
    env: dict[str, str],
    kind: Literal["run", "shell"] = "shell",
    limits: Limits | None = None,
    monitor: MonitorSettings | None = None,
    policy: Policy | None = None,
    protection: protected.ProtectionPlan | None = None,
    host_env: tuple[str, ...] = (),
) -> SandboxSpec:
    """The sandbox a config describes (see `coi.sessions.prepare` for the whole of it)."""
    from coi.sessions.environment import workspace_target

    target = workspace_target(cfg, workspace)
    return SandboxSpec(
        workspace=workspace,
        image=cfg.get_str("defaults.image"),
        persistent=cfg.get_bool("defaults.persistent"),
        mounts=mounts,
        env={**cfg.get_table("defaults.environment"), **env},
        code_uid=cfg.get_int("incus.code_uid"),
        code_user=cfg.get_str("incus.code_user"),
        workspace_target=target,
        pool=cfg.get_str("incus.pool"),
        network=cfg.get_str("incus.network"),
        project=cfg.get_str("incus.project"),
        remote=cfg.get_str("incus.remote") or None,
        verify_interval=float(cfg.get_int("security.verify_interval_seconds")),
        templates=_templates(cfg.get_str("incus.templates")),
        spares=_spares(cfg),
        running_spares=_bounded(
            cfg, "sandbox.running_spares", 0, 64, "how many sessions you start at once (0: none)"
        ),
        intercept_setxattr=cfg.get_bool("incus.intercept_setxattr"),
        max_slots=_bounded(cfg, "defaults.max_slots", 1, 99, "how many sessions you run at once"),
        kind=kind,
        limits=limits if limits is not None else Limits(),
        monitor=monitor,
        policy=policy,
        protection=protection,
        host_env=host_env,
    )


def _templates(value: str) -> bool | None:
    """`incus.templates` for the spec: None is "where they pay off" (`template.pay_off`)."""
    return {"always": True, "never": False, "false": False}.get(value)


def _spares(cfg: Config) -> int:
    advice = "how many sessions you start at once (default 2); 0 turns it off"
    return _bounded(cfg, "incus.spares", 0, 64, advice)


def _bounded(cfg: Config, key: str, low: int, high: int, advice: str) -> int:
    n = cfg.get_int(key)
    if not low <= n <= high:
        raise ConfigError(
            f"{key} must be between {low} and {high}, got {n}",
            details=f"set in {cfg.origins.get(key, 'the defaults')}",
            resolution=f"Use {advice}.",
        )
    return n
