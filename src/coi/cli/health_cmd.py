"""`coi health`."""

from __future__ import annotations

import json

import click

from coi.cli.app import CoiCommand


@click.command(
    "health", cls=CoiCommand, examples="  coi health\n  coi health --format json | jq .status"
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format.",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Accepted for compatibility: every check always runs."
)
@click.pass_context
def health_cmd(ctx: click.Context, fmt: str, verbose: bool) -> None:
    """Check that coi can run sessions. Exit 0 healthy, 1 degraded, 2 unhealthy."""
    from coi.cli.context import connect, load_settings
    from coi.health.checks import render_text, run_checks

    cfg = load_settings()
    report = run_checks(cfg, lambda: connect(cfg))
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(render_text(report))
    ctx.exit(report.exit_code)
