"""`coi snapshot ...`: checkpoints of a session container, and going back to them."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from coi.cli.app import CoiGroup
from coi.cli.completion import complete_any_container
from coi.cli.container_cmds import print_help_when_bare
from coi.cli.context import daemon
from coi.cli.options import stacked
from coi.cli.render import check_format, confirm, echo_json, local_time, table

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.backend.models import Snapshot


_container_options = stacked(
    click.option(
        "-c",
        "--container",
        default=None,
        shell_complete=complete_any_container,
        help="Container (default: $COI_CONTAINER, else the workspace's one).",
    ),
    click.option("-w", "--workspace", default=None, metavar="DIR", help="Workspace (default: .)."),
)


def _target(client: IncusClient, container: str | None, workspace: str | None) -> str:
    from coi.sessions.inventory import resolve_container
    from coi.sessions.workspace import resolve_workspace

    return resolve_container(client, container, str(resolve_workspace(workspace)))


def _snap_json(s: Snapshot) -> dict[str, Any]:
    out: dict[str, Any] = {"name": s.name, "created_at": s.created_at, "stateful": s.stateful}
    if s.expires_at:
        out["expires_at"] = s.expires_at
    if s.description:
        out["description"] = s.description
    return out


def _find(client: IncusClient, container: str, name: str) -> Snapshot:
    from coi.errors import NotFound

    for s in client.instances.snapshots(container):
        if s.name == name:
            return s
    raise NotFound(
        f"snapshot '{name}' not found for container '{container}'",
        resolution=f"See its snapshots with 'coi snapshot list -c {container}'.",
    )


@click.group(
    "snapshot",
    cls=CoiGroup,
    invoke_without_command=True,
    examples="  coi snapshot create before-refactor\n  coi snapshot list\n"
    "  coi snapshot restore before-refactor -f",
    short_help="Create, list, restore and delete container snapshots.",
)
@click.pass_context
def snapshot_cmd(ctx: click.Context) -> None:
    """Checkpoints of a container: create, list, restore, delete, info."""
    print_help_when_bare(ctx)


@snapshot_cmd.command(
    "create", examples="  coi snapshot create\n  coi snapshot create -c my-box ok"
)
@click.argument("name", required=False)
@_container_options
@click.option("--stateful", is_flag=True, help="Include process memory (needs CRIU).")
def create_cmd(
    name: str | None, container: str | None, workspace: str | None, stateful: bool
) -> None:
    """Snapshot a container (default name snap-YYYYMMDD-HHMMSS)."""
    from coi.errors import Conflict

    name = name or datetime.now().strftime("snap-%Y%m%d-%H%M%S")
    with daemon()[1] as client:
        c = _target(client, container, workspace)
        if any(s.name == name for s in client.instances.snapshots(c)):
            raise Conflict(f"snapshot '{name}' already exists for container '{c}'")
        client.instances.create_snapshot(c, name, stateful=stateful)
    kind = "stateful snapshot" if stateful else "snapshot"
    click.echo(f"Created {kind} '{name}' for container '{c}'", err=True)


@snapshot_cmd.command("list", examples="  coi snapshot list --all --format json")
@_container_options
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
@click.option("-a", "--all", "all_", is_flag=True, help="Every coi container's snapshots.")
def list_cmd(container: str | None, workspace: str | None, fmt: str, all_: bool) -> None:
    """List a container's snapshots."""
    from coi.sessions.inventory import containers

    check_format(fmt, ("text", "json"))
    with daemon()[1] as client:
        if all_:
            names = [c.name for c in containers(client, with_state=False)]
            snaps = {n: client.instances.snapshots(n) for n in names}
        else:
            c = _target(client, container, workspace)
            snaps = {c: client.instances.snapshots(c)}
    if all_:
        if fmt == "json":
            echo_json({n: [_snap_json(s) for s in ss] for n, ss in snaps.items()})
            return
        if not snaps:
            click.echo("No COI containers found", err=True)
        for n, ss in snaps.items():
            click.echo(f"\nSnapshots for {n}:")
            click.echo(_snap_table(ss, indent="  ") if ss else "  (none)")
        return
    ((c, ss),) = snaps.items()
    if fmt == "json":
        echo_json({"container": c, "snapshots": [_snap_json(s) for s in ss]})
        return
    click.echo(f"Snapshots for {c}:\n")
    click.echo(_snap_table(ss) if ss else "(none)")
    click.echo(f"\nTotal: {len(ss)} snapshot{'' if len(ss) == 1 else 's'}")


def _snap_table(snaps: list[Snapshot], indent: str = "") -> str:
    rows = [["NAME", "CREATED", "STATEFUL"]]
    rows += [[s.name, local_time(s.created_at), "yes" if s.stateful else "no"] for s in snaps]
    return table(rows, indent=indent)


@snapshot_cmd.command(
    "restore", examples="  coi snapshot restore before-refactor\n  coi snapshot restore ok -f"
)
@click.argument("name")
@_container_options
@click.option("-f", "--force", is_flag=True, help="No questions; stop a running container.")
@click.option("--stateful", is_flag=True, help="Restore process memory too.")
def restore_cmd(
    name: str, container: str | None, workspace: str | None, force: bool, stateful: bool
) -> None:
    """Bring a container back to a snapshot (a running one is stopped and started again)."""
    from coi.errors import Conflict

    with daemon()[1] as client:
        c = _target(client, container, workspace)
        _find(client, c, name)
        was_running = client.instances.get(c).active
        if not force:
            click.echo(
                f"WARNING: This will restore container '{c}' to snapshot '{name}'.", err=True
            )
            click.echo("All changes since the snapshot will be lost.", err=True)
            if was_running:
                click.echo(f"Container '{c}' is running: it will be stopped first.", err=True)
            if not confirm("Continue?", err=True):
                if was_running:
                    raise Conflict(
                        f"container '{c}' must be stopped before restore "
                        f"(use 'coi container stop {c}')"
                    )
                click.echo("Aborted", err=True)
                return
        if was_running:
            client.instances.stop(c, force=True)
        client.instances.restore_snapshot(c, name, stateful=stateful)
        if was_running:
            client.instances.start(c)
    click.echo(f"Restored container '{c}' from snapshot '{name}'", err=True)


@snapshot_cmd.command(
    "delete", examples="  coi snapshot delete old\n  coi snapshot delete --all -f"
)
@click.argument("name", required=False)
@_container_options
@click.option("-a", "--all", "all_", is_flag=True, help="Delete every snapshot.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def delete_cmd(
    name: str | None, container: str | None, workspace: str | None, all_: bool, force: bool
) -> None:
    """Delete a snapshot (or, with --all, every snapshot of the container)."""
    from coi.errors import UsageError

    if not name and not all_:
        raise UsageError("snapshot name required (or use --all to delete all snapshots)")
    with daemon()[1] as client:
        c = _target(client, container, workspace)
        if not all_:
            assert name is not None
            _find(client, c, name)
            client.instances.delete_snapshot(c, name)
            click.echo(f"Deleted snapshot '{name}' from container '{c}'", err=True)
            return
        snaps = client.instances.snapshots(c)
        if not snaps:
            click.echo(f"No snapshots to delete for container '{c}'", err=True)
            return
        if not force:
            click.echo(f"WARNING: This will delete {len(snaps)} snapshot(s) of '{c}':", err=True)
            for s in snaps:
                click.echo(f"  - {s.name}", err=True)
            if not confirm("Continue?", err=True):
                click.echo("Aborted", err=True)
                return
        for s in snaps:
            client.instances.delete_snapshot(c, s.name)
            click.echo(f"Deleted snapshot '{s.name}'", err=True)


@snapshot_cmd.command("info", examples="  coi snapshot info before-refactor --format json")
@click.argument("name")
@_container_options
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
def info_cmd(name: str, container: str | None, workspace: str | None, fmt: str) -> None:
    """Show one snapshot."""
    check_format(fmt, ("text", "json"))
    with daemon()[1] as client:
        c = _target(client, container, workspace)
        s = _find(client, c, name)
    if fmt == "json":
        echo_json({"container": c, "snapshot": _snap_json(s)})
        return
    lines = [f"Snapshot: {s.name}", f"Container: {c}", f"Created: {local_time(s.created_at)}"]
    if s.expires_at:
        lines.append(f"Expires: {local_time(s.expires_at)}")
    lines.append("Stateful: yes (includes process memory)" if s.stateful else "Stateful: no")
    if s.description:
        lines.append(f"Description: {s.description}")
    click.echo("\n".join(lines))
