"""`coi config show`: the merged configuration and where each value came from."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from coi.cli.app import CoiCommand, CoiGroup

if TYPE_CHECKING:
    from coi.config.untrusted import Dropped


@click.group("config", cls=CoiGroup, invoke_without_command=True)
@click.pass_context
def config_cmd(ctx: click.Context) -> None:
    """Inspect coi's configuration."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@config_cmd.command(
    "show", cls=CoiCommand, examples="  coi config show\n  coi config show --format json"
)
@click.option("--profile", default=None, help="Apply this profile (coi profile list).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def show_cmd(profile: str | None, fmt: str) -> None:
    """Print every key with its value and origin (default, a file, env or profile).

    Values an untrusted workspace file asked for and did not get are shown as DROPPED under
    the key, with the reason.
    """
    from coi.cli.context import load_settings

    cfg = load_settings(profile=profile)
    dropped: dict[str, list[Dropped]] = {}
    for d in cfg.dropped:
        dropped.setdefault(d.key, []).append(d)
    if fmt == "json":
        data = {k: {"value": cfg.values[k], "origin": cfg.origins[k]} for k in sorted(cfg.values)}
        out = {
            "files": [str(f) for f in cfg.files_read],
            "workspace_files": [
                {"path": str(w.path), "trust": w.status, "sha256": w.sha256} for w in cfg.workspace
            ],
            "settings": data,
            "dropped": [
                {"key": d.key, "value": d.value, "file": d.file, "reason": d.reason}
                for d in cfg.dropped
            ],
        }
        click.echo(json.dumps(out, indent=2))
        return
    click.echo("Config files read: " + (", ".join(str(f) for f in cfg.files_read) or "(none)"))
    for w in cfg.workspace:
        click.echo(f"Workspace file {w.path}: {_TRUST_WORDS.get(w.status, w.status)}")
    for key in sorted(cfg.values):
        click.echo(f"{key} = {json.dumps(cfg.values[key])}  ({cfg.origins[key]})")
        for d in dropped.pop(key, []):
            click.echo(f"  DROPPED {json.dumps(d.value)} from {d.file}: {d.reason}")
    for rest in dropped.values():  # unknown keys, profile entries, a whole file
        for d in rest:
            click.echo(f"DROPPED {d.key} = {json.dumps(d.value)} from {d.file}: {d.reason}")
    if cfg.profiles:
        click.echo("Profiles: " + ", ".join(sorted(cfg.profiles)))


_TRUST_WORDS = {
    "untrusted": "not trusted (only settings that tighten the sandbox apply; see 'coi trust')",
    "changed": "CHANGED since you trusted it (only settings that tighten the sandbox apply)",
    "trusted": "trusted (pinned by 'coi trust')",
    "trust-all": "trusted because COI_TRUST_ALL is set",
    "unreadable": "not read (a link or not a regular file)",
}
