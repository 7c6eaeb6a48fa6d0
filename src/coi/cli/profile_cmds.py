"""`coi profile list/show` and `coi schema config`: profiles and the config's JSON Schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from coi.cli.app import CoiCommand, CoiGroup
from coi.cli.render import echo_json


@click.group("profile", cls=CoiGroup, invoke_without_command=True)
@click.pass_context
def profile_cmd(ctx: click.Context) -> None:
    """Named profiles: built in (hardened), ~/.coi/profiles, .coi/profiles, [profiles.NAME]."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@profile_cmd.command(
    "list", cls=CoiCommand, examples="  coi profile list\n  coi profile list --format json"
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def list_cmd(fmt: str) -> None:
    """Every profile coi can apply here, where each is defined and what it inherits."""
    from coi.cli.context import load_settings
    from coi.config.profiles import describe

    cfg = load_settings()
    rows = describe(cfg, Path.cwd(), os.environ)
    if fmt == "json":
        echo_json(rows)
        return
    for row in rows:
        head = row["name"] + (f"  (inherits {row['inherits']})" if row["inherits"] else "")
        click.echo(head + (f"  {row['description']}" if row["description"] else ""))
        for src in row["sources"]:
            trust = "" if src["trusted"] else f"  [{src.get('trust', 'untrusted')}]"
            err = f"  ({src['error']})" if "error" in src else ""
            click.echo(f"  {src['kind']:<9} {src['where']}{trust}{err}")


@profile_cmd.command(
    "show",
    cls=CoiCommand,
    examples="  coi profile show hardened\n  coi profile show ci --all --format json",
)
@click.argument("name")
@click.option("--all", "all_", is_flag=True, help="Every key, not only what the profile sets.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def show_cmd(name: str, all_: bool, fmt: str) -> None:
    """The config with profile NAME applied: each value and where it came from."""
    from coi.cli.context import load_settings
    from coi.config.profiles import from_profile

    cfg = load_settings(profile=name)
    keys = sorted(k for k in cfg.values if all_ or from_profile(cfg.origins[k]))
    dropped = [d for d in cfg.dropped if "profile" in d.key or "/profiles/" in d.file]
    if fmt == "json":
        echo_json(
            {
                "profile": name,
                "chain": cfg.profile_chain,
                "settings": {k: {"value": cfg.values[k], "origin": cfg.origins[k]} for k in keys},
                "guaranteed": {k: {"value": v, "by": o} for k, (v, o) in cfg.floors.items()},
                "dropped": [
                    {"key": d.key, "value": d.value, "file": d.file, "reason": d.reason}
                    for d in dropped
                ],
            }
        )
        return
    click.echo(f"Profile {name}: " + " -> ".join(cfg.profile_chain))
    for key in keys:
        click.echo(f"{key} = {json.dumps(cfg.values[key])}  ({cfg.origins[key]})")
    for d in dropped:
        click.echo(f"DROPPED {d.key} = {json.dumps(d.value)} from {d.file}: {d.reason}")
    if cfg.floors:
        click.echo("No later setting may loosen: " + ", ".join(sorted(cfg.floors)))


@click.group("schema", cls=CoiGroup, invoke_without_command=True)
@click.pass_context
def schema_cmd(ctx: click.Context) -> None:
    """Machine-readable schemas."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@schema_cmd.command(
    "config", cls=CoiCommand, examples="  coi schema config > ~/.coi/config.schema.json"
)
def schema_config_cmd() -> None:
    """The JSON Schema of config.toml (from the schema the loader uses), for editors."""
    from coi.config.jsonschema import config_schema

    echo_json(config_schema())
