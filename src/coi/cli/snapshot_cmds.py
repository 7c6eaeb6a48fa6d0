"""`coi snapshot ...`: checkpoints of a session container, and going back to them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from coi.cli.app import CoiGroup
from coi.cli.completion import complete_any_container
from coi.cli.container_cmds import print_help_when_bare
from coi.cli.context import daemon
from coi.cli.options import stacked
from coi.cli.render import check_format, confirm, echo_json, local_time, table

if TYPE_CHECKING:
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


def _snap_json(s: Snapshot) -> dict[str, Any]:
    out: dict[str, Any] = {"name": s.name, "created_at": s.created_at, "stateful": s.stateful}
    if s.expires_at:
        out["expires_at"] = s.expires_at
    if s.description:
        out["description"] = s.description
    return out


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
    from coi.sessions import snapshots

    with daemon()[1] as client:
        made = snapshots.create(
            client, name, container=container, workspace=workspace, stateful=stateful
        )
    kind = "stateful snapshot" if made.stateful else "snapshot"
    click.echo(f"Created {kind} '{made.name}' for container '{made.container}'", err=True)


@snapshot_cmd.command("list", examples="  coi snapshot list --all --format json")
@_container_options
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
@click.option("-a", "--all", "all_", is_flag=True, help="Every coi container's snapshots.")
def list_cmd(container: str | None, workspace: str | None, fmt: str, all_: bool) -> None:
    """List a container's snapshots."""
    from coi.sessions import snapshots

    check_format(fmt, ("text", "json"))
    with daemon()[1] as client:
        if all_:
            every = snapshots.of_every_container(client)
        else:
            one = snapshots.of_container(client, container, workspace)
    if all_:
        if fmt == "json":
            echo_json({n.container: [_snap_json(s) for s in n.snapshots] for n in every})
            return
        if not every:
            click.echo("No COI containers found", err=True)
        for n in every:
            click.echo(f"\nSnapshots for {n.container}:")
            click.echo(_snap_table(n.snapshots, indent="  ") if n.snapshots else "  (none)")
        return
    c, ss = one.container, one.snapshots
    if fmt == "json":
        echo_json({"container": c, "snapshots": [_snap_json(s) for s in ss]})
        return
    click.echo(f"Snapshots for {c}:\n")
    click.echo(_snap_table(ss) if ss else "(none)")
    click.echo(f"\nTotal: {len(ss)} snapshot{'' if len(ss) == 1 else 's'}")


def _snap_table(snaps: Sequence[Snapshot], indent: str = "") -> str:
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
    from coi.sessions import snapshots

    with daemon()[1] as client:
        plan = snapshots.prepare_restore(client, name, container=container, workspace=workspace)
        c, was_running = plan.container, plan.was_running
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
        snapshots.restore(client, plan, stateful=stateful)
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
    from coi.sessions import snapshots

    if not name and not all_:
        raise UsageError("snapshot name required (or use --all to delete all snapshots)")
    with daemon()[1] as client:
        if not all_:
            assert name is not None
            gone = snapshots.delete(client, name, container=container, workspace=workspace)
            click.echo(
                f"Deleted snapshot '{gone.snapshot.name}' from container '{gone.container}'",
                err=True,
            )
            return
        listed = snapshots.of_container(client, container, workspace)
        c, snaps = listed.container, listed.snapshots
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
        snapshots.delete_all(client, listed, log=_log)


def _log(message: str) -> None:
    click.echo(message, err=True)


@snapshot_cmd.command("info", examples="  coi snapshot info before-refactor --format json")
@click.argument("name")
@_container_options
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
def info_cmd(name: str, container: str | None, workspace: str | None, fmt: str) -> None:
    """Show one snapshot."""
    from coi.sessions import snapshots

    check_format(fmt, ("text", "json"))
    with daemon()[1] as client:
        found = snapshots.info(client, name, container=container, workspace=workspace)
    c, s = found.container, found.snapshot
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
