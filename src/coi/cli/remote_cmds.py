"""`coi remote add/list/remove/switch`: the daemons coi can work on besides the local one."""

from __future__ import annotations

import getpass
import json
import os

import click

from coi.cli.app import CoiCommand, CoiGroup

REMOTE_EXAMPLES = """\
  coi remote add build https://build.example:8443 --token eyJjbGllbnRf...
  coi remote list
  coi remote switch build          # every command now works there (coi remote switch local)
  coi --remote build run -- make   # one command on a remote
  coi remote remove build"""


def _default_project() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"coi-{user}"


@click.group("remote", cls=CoiGroup, examples=REMOTE_EXAMPLES, invoke_without_command=True)
@click.pass_context
def remote_cmd(ctx: click.Context) -> None:
    """Manage remote Incus daemons (HTTPS, client certificate, pinned server certificate)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@remote_cmd.command("add", cls=CoiCommand)
@click.argument("name")
@click.argument("url")
@click.option("--token", default=None, help="Trust token from 'incus config trust add' there.")
@click.option(
    "--accept-certificate",
    is_flag=True,
    help="Pin the certificate the server presents now (compare its fingerprint first).",
)
@click.option(
    "--project",
    "project",
    default=None,
    help="Incus project your sandboxes live in there (default: coi-USER; made if missing "
    "and allowed).",
)
@click.option(
    "--limit",
    "limits",
    multiple=True,
    metavar="limits.KEY=VALUE",
    help="A limit on your project there (repeatable), e.g. limits.instances=5, "
    "limits.memory=16GiB; set where the server lets you.",
)
def add_cmd(
    name: str,
    url: str,
    token: str | None,
    accept_certificate: bool,
    project: str | None,
    limits: tuple[str, ...],
) -> None:
    """Add a remote daemon and pin its certificate."""
    from coi.backend.remotes import add

    done = add(
        name,
        url,
        token=token,
        accept_certificate=accept_certificate,
        project=project or _default_project(),
        env=os.environ,
        log=lambda m: click.echo(m, err=True),
        limits=dict(item.partition("=")[::2] for item in limits),
    )
    how = "trusted with the token" if done.trusted_by == "token" else "already trusted"
    click.echo(f"Remote {done.name} added: {done.url} ({how})")
    click.echo(f"Server certificate fingerprint (pinned): {done.fingerprint}")
    made = " (made now)" if done.project_created else ""
    click.echo(f"Project: {done.project}{made}")
    click.echo(f"Use it with 'coi --remote {done.name} ...' or 'coi remote switch {done.name}'.")


@remote_cmd.command("list", cls=CoiCommand)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def list_cmd(fmt: str) -> None:
    """List coi's remotes and the incus client's."""
    from coi.backend.remotes import current, list_remotes

    rows = list_remotes(os.environ)
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "url": r.url,
                        "project": r.project,
                        "fingerprint": r.fingerprint,
                        "source": r.source,
                        "current": r.current,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    mark = "" if current(os.environ) else "*"
    click.echo(f"{mark:1} {'local':<16} unix socket")
    for r in rows:
        src = "" if r.source == "coi" else f"  (incus client: {r.source})"
        fp = r.fingerprint[:12] or "-"
        click.echo(
            f"{'*' if r.current else '':1} {r.name:<16} {r.url}  project {r.project or '-'}  "
            f"cert {fp}{src}"
        )


@remote_cmd.command("remove", cls=CoiCommand)
@click.argument("name")
def remove_cmd(name: str) -> None:
    """Forget a remote and its pinned certificate."""
    from coi.backend.remotes import remove

    was_current = remove(name, os.environ)
    again = " (coi uses the local daemon again)" if was_current else ""
    click.echo(f"Remote {name} removed{again}")


@remote_cmd.command("switch", cls=CoiCommand)
@click.argument("name")
def switch_cmd(name: str) -> None:
    """Make a remote (or 'local') the daemon coi uses by default."""
    from coi.backend.remotes import switch

    switch(name, os.environ)
    click.echo(f"coi now uses {'the local daemon' if name == 'local' else 'remote ' + name}")
    over = os.environ.get("COI_REMOTE")
    if over:
        click.echo(f"Note: COI_REMOTE={over} is set and wins over this.", err=True)
