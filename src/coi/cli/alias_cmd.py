"""`coi alias`: names people choose for sandboxes (set, list, remove)."""

from __future__ import annotations

import click

from coi.cli.app import CoiCommand
from coi.cli.completion import complete_containers
from coi.cli.context import daemon
from coi.cli.render import check_format, echo_json


@click.command(
    "alias",
    cls=CoiCommand,
    examples="  coi alias web coi-abc12345-1   # attach web, coi info web, coi kill web\n"
    "  coi alias --list\n  coi alias --remove web\n"
    "  coi shell --name web            # named when it is made",
)
@click.argument("name", required=False)
@click.argument("container", required=False, shell_complete=complete_containers)
@click.option("-l", "--list", "list_", is_flag=True, help="List the aliases (the default).")
@click.option("--remove", "remove", is_flag=True, help="Take the alias NAME off its container.")
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
def alias_cmd(name: str | None, container: str | None, list_: bool, remove: bool, fmt: str) -> None:
    """Give a container a name of your own; attach, info, shutdown and kill take it.

    The name is kept on the container (the daemon's user.coi.alias key) and goes with it;
    it is unique among the containers of the daemon project.
    """
    from coi.config.paths import coi_home
    from coi.errors import UsageError
    from coi.sessions import aliases

    check_format(fmt, ("text", "json"))
    if remove and (not name or container):
        raise UsageError("--remove takes one alias: coi alias --remove NAME")
    if name and not remove and not container:
        raise UsageError(
            "missing container: coi alias NAME CONTAINER",
            resolution="'coi list' shows the containers; 'coi alias --list' the aliases.",
        )
    _cfg, client = daemon()
    with client:
        if remove:
            assert name is not None
            target, old = aliases.remove_alias(client, name)
            click.echo(f"Removed alias {old} from {target}")
            return
        if name and container:
            target = aliases.set_alias(client, container, name, lock_dir=coi_home() / "locks")
            click.echo(f"{name} -> {target}")
            return
        found = sorted(aliases.all_aliases(client).items())
    if fmt == "json":
        echo_json([{"alias": a, "container": c} for a, c in found])
        return
    for a, c in found:
        click.echo(f"{a:<24} {c}")
    if not found:
        click.echo("No aliases (coi alias NAME CONTAINER, or coi shell --name NAME)")
