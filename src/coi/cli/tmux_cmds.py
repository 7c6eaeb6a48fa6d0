"""`coi tmux send|capture|list`: drive an agent's tmux session from scripts (as the agent user)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from coi.cli.app import CoiGroup
from coi.cli.completion import complete_containers
from coi.cli.container_cmds import print_help_when_bare
from coi.cli.render import check_format, echo_json

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.config.loader import Config
    from coi.sessions.access import Agent


def _agent(client: IncusClient, cfg: Config, name: str) -> Agent:
    from coi.errors import SessionError
    from coi.sessions import access

    try:
        inst = access.running_instance(client, name)
    except SessionError:
        raise SessionError(
            f"container {name} is not running", resolution="See sessions with 'coi list'."
        ) from None
    return access.agent_of(
        inst, uid=cfg.get_int("incus.code_uid"), user=cfg.get_str("incus.code_user")
    )


@click.group(
    "tmux",
    cls=CoiGroup,
    invoke_without_command=True,
    examples="  coi tmux list\n  coi tmux send coi-abc12345-1 'run the tests'\n"
    "  coi tmux capture coi-abc12345-1",
    short_help="Send keys to and read an agent's tmux session.",
)
@click.pass_context
def tmux_cmd(ctx: click.Context) -> None:
    """Talk to the tmux session an agent runs in (as the agent user, where it lives)."""
    print_help_when_bare(ctx)


@tmux_cmd.command("send", examples="  coi tmux send coi-abc12345-1 'explain this repo'")
@click.argument("container", shell_complete=complete_containers)
@click.argument("command")
def send_cmd(container: str, command: str) -> None:
    """Type COMMAND and Enter into the session."""
    from coi.cli.context import connect, load_settings
    from coi.sessions import access, naming

    cfg = load_settings()
    with connect(cfg) as client:
        agent = _agent(client, cfg, container)
        access.tmux_send(client, agent, command)
    click.echo(f"Sent command to session {naming.tmux_session(agent.container)}")


@tmux_cmd.command("capture", examples="  coi tmux capture coi-abc12345-1 | tail -5")
@click.argument("container", shell_complete=complete_containers)
def capture_cmd(container: str) -> None:
    """Print the text visible in the session's pane."""
    from coi.cli.context import connect, load_settings
    from coi.sessions import access

    cfg = load_settings()
    with connect(cfg) as client:
        text = access.tmux_capture(client, _agent(client, cfg, container))
    click.echo(text, nl=False)


@tmux_cmd.command("list", examples="  coi tmux list --format json")
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
def list_cmd(fmt: str) -> None:
    """List running coi containers that have an agent tmux session."""
    from coi.cli.context import connect, load_settings
    from coi.sessions import access, naming
    from coi.sessions.inventory import containers

    check_format(fmt, ("text", "json"))
    cfg = load_settings()
    with connect(cfg) as client:
        found = [
            c.name
            for c in containers(client, with_state=False)
            if c.running and access.has_tmux_session(client, _agent(client, cfg, c.name))
        ]
    if fmt == "json":
        echo_json([{"container": n, "tmux_session": naming.tmux_session(n)} for n in found])
        return
    if not found:
        click.echo("No active sessions")
        return
    click.echo("Active sessions:")
    for n in found:
        click.echo(f"  - {n} (tmux session: {naming.tmux_session(n)})")
