"""`coi config show`: the merged configuration and where each value came from."""

from __future__ import annotations

import json

import click

from coi.cli.app import CoiCommand, CoiGroup


@click.group("config", cls=CoiGroup, invoke_without_command=True)
@click.pass_context
def config_cmd(ctx: click.Context) -> None:
    """Inspect coi's configuration."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@config_cmd.command(
    "show", cls=CoiCommand, examples="  coi config show\n  coi config show --format json"
)
@click.option("--profile", default=None, help="Apply this [profiles.NAME] first.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def show_cmd(profile: str | None, fmt: str) -> None:
    """Print every key with its value and origin (default, a file, env or profile)."""
    from coi.cli.context import load_settings

    cfg = load_settings(profile=profile)
    if fmt == "json":
        data = {k: {"value": cfg.values[k], "origin": cfg.origins[k]} for k in sorted(cfg.values)}
        click.echo(json.dumps({"files": [str(f) for f in cfg.files], "settings": data}, indent=2))
        return
    click.echo("Config files read: " + (", ".join(str(f) for f in cfg.files) or "(none)"))
    for key in sorted(cfg.values):
        click.echo(f"{key} = {json.dumps(cfg.values[key])}  ({cfg.origins[key]})")
    if cfg.profiles:
        click.echo("Profiles: " + ", ".join(sorted(cfg.profiles)))
