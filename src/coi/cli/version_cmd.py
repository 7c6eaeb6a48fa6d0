"""`coi version`."""

from __future__ import annotations

import click

from coi.cli.app import CoiCommand


@click.command(
    "version",
    cls=CoiCommand,
    examples="  coi version",
    context_settings={"ignore_unknown_options": True},
)
@click.argument("ignored", nargs=-1, type=click.UNPROCESSED)
def version_cmd(ignored: tuple[str, ...]) -> None:
    """Print the version of coi."""
    from coi import PROJECT_URL, __version__

    click.echo(f"code-on-incus (coi) v{__version__}")
    click.echo(PROJECT_URL)
