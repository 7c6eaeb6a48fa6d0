"""`coi build`: images coi sessions start from."""

from __future__ import annotations

import json

import click

from coi.cli.app import CoiCommand, CoiGroup


@click.group("build", cls=CoiGroup, invoke_without_command=True)
@click.option("--force", is_flag=True, help="Rebuild even if the image exists.")
@click.pass_context
def build_cmd(ctx: click.Context, force: bool) -> None:
    """Build the 'coi' agent image (or, with a sub-command, another image)."""
    if ctx.invoked_subcommand is not None:
        return
    raise click.UsageError(
        "building the full 'coi' image is not available yet; "
        "use 'coi build tiny' for the minimal image"
    )


@build_cmd.command("tiny", cls=CoiCommand, examples="  coi build tiny --force")
@click.option("--force", is_flag=True, help="Rebuild even if the image exists.")
def tiny_cmd(force: bool) -> None:
    """Build the tiny busybox+tmux image (seconds; used by tests and probes)."""
    import tempfile
    from pathlib import Path

    from coi.cli.context import connect, load_settings
    from coi.images.tiny import DESCRIPTION, TINY_ALIAS, build_tarball

    cfg = load_settings()
    with connect(cfg) as client:
        old = client.images.alias_target(TINY_ALIAS)
        if old and not force:
            click.echo(f"Image '{TINY_ALIAS}' already exists. Use --force to rebuild.", err=True)
            return
        with tempfile.TemporaryDirectory(prefix="coi-tiny-") as tmp:
            tarball = build_tarball(Path(tmp) / "tiny.tar")
            fp = client.images.import_tarball(tarball, properties={"description": DESCRIPTION})
        client.images.set_alias(TINY_ALIAS, fp)
        if old and old != fp:
            client.images.delete(old)
    click.echo(json.dumps({"alias": TINY_ALIAS, "fingerprint": fp}), nl=True)
