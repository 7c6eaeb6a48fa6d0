"""What coi has made: its containers (with their session facts) and the sessions saved on disk."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from coi import labels
from coi.backend.client import IncusClient
from coi.backend.models import Instance
from coi.errors import NotFound, UsageError
from coi.sessions import forwards, naming

if TYPE_CHECKING:
    # The saved sessions' store is loaded where they are read: `coi list` reads none when
    # its containers carry their own facts.
    from coi.sessions.store import Metadata


@dataclass(frozen=True)
class ContainerInfo:
    """A coi container as `coi list` shows it."""

    name: str
    status: str  # Running, Stopped, Frozen
    created_at: str
    image: str
    persistent: bool
    ipv4: str | None
    workspace: str | None
    kind: str  # "shell", "run" or "" (made by something else, e.g. `coi container launch`)
    owner_host: str
    owner_pid: int
    # The name the user gave it, the ports it publishes and the host sockets it has.
    alias: str = ""
    review: str = ""  # the review (coi.review) it works on, in review mode
    ports: tuple[forwards.Published, ...] = ()
    sockets: tuple[tuple[str, str], ...] = ()
    location: str = ""  # the cluster member it runs on ('' off a cluster)
    spare_ready: bool = False  # a running spare (kind "spare") its maker is done with

    @property
    def running(self) -> bool:
        return self.status == "Running"

    @property
    def orphaned(self) -> bool:
        """A `coi run` sandbox or image build whose coi process died (kill -9), or a running
        spare whose maker died before it was ready: nobody will remove it."""
        if self.kind == "spare" and self.spare_ready:
            return False
        if self.kind not in ("run", "build", "spare") or self.persistent or not self.owner_pid:
            return False
        if self.owner_host != socket.gethostname():
            return False  # made on another machine: we cannot tell, so we keep it
        return not _is_coi_process(self.owner_pid)


def _is_coi_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"coi" in cmdline


@dataclass(frozen=True)
class SavedSession:
    """A session directory under ~/.coi/sessions-<tool>/."""

    id: str
    tool: str
    path: Path
    metadata: Metadata | None
    has_state: bool

    @property
    def saved_at(self) -> str:
        if self.metadata and self.metadata.saved_at:
            return self.metadata.saved_at
        mtime = datetime.fromtimestamp(self.path.stat().st_mtime, UTC)
        return mtime.isoformat(timespec="seconds").replace("+00:00", "Z")

    @property
    def workspace(self) -> str:
        return self.metadata.workspace if self.metadata else ""

    @property
    def container_name(self) -> str:
        return self.metadata.container_name if self.metadata else ""


def is_coi_name(name: str, env: Mapping[str, str] | None = None) -> bool:
    return name.startswith(naming.prefix(env))


def container_info(inst: Instance, metadata: Mapping[str, Metadata]) -> ContainerInfo:
    cfg = inst.config
    meta = metadata.get(inst.name)
    persistent = cfg.get(labels.PERSISTENT) == "true" or bool(meta and meta.persistent)
    state = inst.state
    try:
        pid = int(cfg.get(labels.OWNER_PID) or 0)
    except ValueError:
        pid = 0
    return ContainerInfo(
        name=inst.name,
        status=inst.status,
        created_at=inst.created_at,
        image=cfg.get("image.description", ""),
        persistent=persistent,
        ipv4=state.ipv4() if state else None,
        workspace=cfg.get(labels.WORKSPACE) or (meta.workspace if meta else None) or None,
        kind=cfg.get(labels.KIND, ""),
        owner_host=cfg.get(labels.OWNER_HOST, ""),
        owner_pid=pid,
        alias=cfg.get(labels.ALIAS, ""),
        review=cfg.get(labels.REVIEW, ""),
        ports=forwards.published_of(inst.devices),
        sockets=forwards.sockets_of(inst.devices),
        location=inst.location,
        spare_ready=cfg.get(labels.SPARE_READY) == "true",
    )


def _self_described(inst: Instance) -> bool:
    """coi writes a sandbox's facts into its config; older ones have them only in metadata."""
    return labels.PERSISTENT in inst.config and labels.WORKSPACE in inst.config


def containers(
    client: IncusClient,
    sessions: Iterable[SavedSession] | Callable[[], Iterable[SavedSession]] = (),
    *,
    with_state: bool = True,
) -> list[ContainerInfo]:
    """coi's containers (names with coi's prefix), sorted by name.

    `sessions` (or a function that lists them) is read only when a container does not carry
    its own facts: a user with hundreds of saved sessions should not wait for them to be read
    to list two containers. `with_state`: fill in the addresses of those that run (one
    request in all when coi reserved them, as it does on its own bridges).
    """
    insts = [i for i in client.instances.list() if is_coi_name(i.name)]
    latest: dict[str, Metadata] = {}
    if not all(_self_described(i) for i in insts):
        saved = sessions() if callable(sessions) else sessions
        for s in sorted(saved, key=lambda s: s.saved_at):  # the newest session wins
            if s.metadata:
                latest[s.metadata.container_name] = s.metadata
    infos = [container_info(i, latest) for i in insts]
    if with_state:
        found = _addresses(client, insts)
        infos = [replace(c, ipv4=found[c.name]) if c.name in found else c for c in infos]
    return sorted(infos, key=lambda c: c.name)


def reserved_ipv4(inst: Instance) -> str | None:
    """The address coi reserved for the sandbox's NIC (`ipv4.address`), or None.

    The daemon's DHCP hands that address to this NIC only, the sandbox sets it at boot, and
    where the daemon has NIC filtering (coi turns it on wherever it can) every other source
    address is dropped: it is the address the sandbox is reached at. Reading it from the
    listing spares the daemon gathering every container's runtime state (`recursion=2`),
    which was most of `coi list`'s time.
    """
    nic = inst.devices.get("eth0") or inst.expanded_devices.get("eth0") or {}
    return (nic.get("ipv4.address") or None) if nic.get("type") == "nic" else None


def _addresses(client: IncusClient, insts: Sequence[Instance]) -> dict[str, str | None]:
    """The IPv4 address of each of `insts` that runs: the reserved one, else (a container on
    a network coi reserves nothing on) the one its runtime state reports, asked for that
    container alone, or for all at once (`recursion=2`) when several need it."""
    active = [i for i in insts if i.active]
    found = {i.name: reserved_ipv4(i) for i in active}
    missing = [name for name, ip in found.items() if ip is None]
    if len(missing) == 1:
        try:
            found[missing[0]] = client.instances.state(missing[0]).ipv4()
        except NotFound:  # removed since the listing
            pass
    elif missing:
        for inst in client.instances.list(with_state=True):
            if inst.name in found and found[inst.name] is None and inst.state:
                found[inst.name] = inst.state.ipv4()
    return found


def saved_sessions(home: Path, state_dirs: Mapping[str, str]) -> list[SavedSession]:
    """Every session directory of every tool, oldest first.

    `state_dirs` maps tool name -> its state directory (from the tool registry); a tool
    without one counts as having state when its metadata exists.
    """
    from coi.sessions import store

    out: list[SavedSession] = []
    if not home.is_dir():
        return out
    for tool_dir in sorted(home.glob("sessions-*")):
        tool = tool_dir.name.removeprefix("sessions-")
        if not tool_dir.is_dir():
            continue
        for d in tool_dir.iterdir():
            if not d.is_dir() or d.name.startswith("."):
                continue
            meta = store.read_metadata(d)
            state = state_dirs.get(tool, "")
            has_state = (d / state).is_dir() if state else meta is not None
            out.append(SavedSession(d.name, tool, d, meta, has_state))
    return sorted(out, key=lambda s: s.saved_at)


def mark_persistent(client: IncusClient, name: str, sessions: Iterable[SavedSession]) -> int:
    """Make a container persistent in the daemon and in its sessions' metadata.

    :returns: how many session metadata files were updated.
    """
    client.instances.set_config(name, {labels.PERSISTENT: "true"})
    inst = client.instances.get(name)
    if inst.ephemeral:
        client.instances.patch(name, {"ephemeral": False})
    from coi.sessions import store

    updated = 0
    for s in sessions:
        if s.metadata and s.metadata.container_name == name:
            store.update_metadata(s.path, persistent=True)
            updated += 1
    return updated


def resolve_container(
    client: IncusClient,
    explicit: str | None,
    workspace: str,
    env: Mapping[str, str] | None = None,
) -> str:
    """The container a command means: `--container`, else $COI_CONTAINER, else the one
    coi container of the workspace.

    :raises NotFound: the named container does not exist.
    :raises UsageError: the workspace has none, or several.
    """
    env = os.environ if env is None else env
    if explicit:
        if not client.instances.exists(explicit):
            raise NotFound(f"container '{explicit}' not found")
        return explicit
    if env.get("COI_CONTAINER"):
        name = env["COI_CONTAINER"]
        if not client.instances.exists(name):
            raise NotFound(f"container '{name}' from COI_CONTAINER not found")
        return name
    ws_hash = naming.workspace_hash(workspace)
    mine = sorted(
        n for n in client.instances.names() if (naming.parse_name(n, env) or ("",))[0] == ws_hash
    )
    if not mine:
        raise UsageError(
            "no COI containers found for current workspace - use --container to specify"
        )
    if len(mine) > 1:
        raise UsageError(
            "multiple COI containers found for workspace, use --container to specify: "
            + ", ".join(mine)
        )
    return mine[0]


def find_container(client: IncusClient, name: str) -> ContainerInfo | None:
    """The container `name` (its own name or its alias) as `coi list` shows it; None when
    there is none."""
    from coi.sessions.aliases import resolve

    try:
        inst = client.instances.get(resolve(client, name))
        info = container_info(inst, {})
        return replace(info, ipv4=_addresses(client, [inst]).get(inst.name))
    except NotFound:
        return None
