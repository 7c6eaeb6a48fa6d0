"""Snapshots of a session container: checkpoints, and going back to them.

Each function finds the container the way `coi snapshot` names it (`--container`, else
$COI_CONTAINER, else the workspace's one) and returns what it found or did for the caller
to show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from coi import checkpoint
from coi.backend.client import IncusClient
from coi.backend.models import Snapshot
from coi.errors import Conflict, NotFound
from coi.sessions.inventory import containers, resolve_container
from coi.sessions.workspace import resolve_workspace

Log = Callable[[str], None]


@dataclass(frozen=True)
class Snapshots:
    """A container's snapshots, oldest first (as the daemon lists them)."""

    container: str
    snapshots: tuple[Snapshot, ...]


@dataclass(frozen=True)
class Found:
    """One snapshot of a container."""

    container: str
    snapshot: Snapshot


@dataclass(frozen=True)
class Created:
    container: str
    name: str
    stateful: bool


@dataclass(frozen=True)
class Restore:
    """A restore about to happen: the container is stopped first when it runs."""

    container: str
    name: str
    was_running: bool


def target(client: IncusClient, container: str | None, workspace: str | None) -> str:
    """The container meant: `container`, else $COI_CONTAINER, else the workspace's one.

    :raises NotFound: the named container does not exist.
    :raises UsageError: the workspace has none, or several.
    """
    return resolve_container(client, container, str(resolve_workspace(workspace)))


def _find(client: IncusClient, container: str, name: str) -> Snapshot:
    for s in client.instances.snapshots(container):
        if s.name == name:
            return s
    raise NotFound(
        f"snapshot '{name}' not found for container '{container}'",
        resolution=f"See its snapshots with 'coi snapshot list -c {container}'.",
    )


def create(
    client: IncusClient,
    name: str | None,
    *,
    container: str | None,
    workspace: str | None,
    stateful: bool,
) -> Created:
    """Snapshot a container (default name snap-YYYYMMDD-HHMMSS).

    :raises Conflict: the container has a snapshot of that name.
    """
    name = name or datetime.now().strftime("snap-%Y%m%d-%H%M%S")
    c = target(client, container, workspace)
    if any(s.name == name for s in client.instances.snapshots(c)):
        raise Conflict(f"snapshot '{name}' already exists for container '{c}'")
    client.instances.create_snapshot(c, name, stateful=stateful)
    return Created(c, name, stateful)


def of_container(client: IncusClient, container: str | None, workspace: str | None) -> Snapshots:
    """The snapshots of the container meant."""
    c = target(client, container, workspace)
    return Snapshots(c, tuple(client.instances.snapshots(c)))


def of_every_container(client: IncusClient) -> tuple[Snapshots, ...]:
    """The snapshots of every coi container, by container name."""
    names = [c.name for c in containers(client, with_state=False)]
    return tuple(Snapshots(n, tuple(client.instances.snapshots(n))) for n in names)


def info(client: IncusClient, name: str, *, container: str | None, workspace: str | None) -> Found:
    """:raises NotFound: no such snapshot."""
    c = target(client, container, workspace)
    return Found(c, _find(client, c, name))


def prepare_restore(
    client: IncusClient, name: str, *, container: str | None, workspace: str | None
) -> Restore:
    """What restoring would do, for the caller to confirm.

    :raises NotFound: no such snapshot.
    """
    c = target(client, container, workspace)
    _find(client, c, name)
    return Restore(c, name, client.instances.get(c).active)


def restore(client: IncusClient, plan: Restore, *, stateful: bool) -> None:
    """Bring the container back to the snapshot; one that ran is stopped and started again."""
    if plan.was_running:
        client.instances.stop(plan.container, force=True)
        checkpoint.step("snapshot-stopped")  # stopped; the restore not asked for yet
    client.instances.restore_snapshot(plan.container, plan.name, stateful=stateful)
    if plan.was_running:
        client.instances.start(plan.container)


def delete(
    client: IncusClient, name: str, *, container: str | None, workspace: str | None
) -> Found:
    """Delete one snapshot; the snapshot that went.

    :raises NotFound: no such snapshot.
    """
    c = target(client, container, workspace)
    s = _find(client, c, name)
    client.instances.delete_snapshot(c, name)
    return Found(c, s)


def delete_all(client: IncusClient, snaps: Snapshots, *, log: Log) -> int:
    """Delete the snapshots listed, logging each as it goes; how many went."""
    for s in snaps.snapshots:
        client.instances.delete_snapshot(snaps.container, s.name)
        log(f"Deleted snapshot '{s.name}'")
    return len(snaps.snapshots)
