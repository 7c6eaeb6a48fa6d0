"""`coi build`: the `coi` agent image, custom images, and the tiny test image."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from coi.cli.app import CoiCommand, CoiGroup

if TYPE_CHECKING:
    from coi.config.loader import Config
    from coi.images.builder import BuildOptions

BUILD_EXAMPLES = """\
  coi build                          # the 'coi' image (once; --force to rebuild)
  coi build --verbose                # show every line of the build
  coi build custom my-img --script setup.sh
  coi build tiny                     # the tiny busybox image used by tests"""


def _options(cfg: Config, alias: str, force: bool) -> BuildOptions:
    from coi.images.builder import BuildOptions

    return BuildOptions(
        alias=alias,
        force=force,
        base=cfg.get_str("build.base"),
        image_server=cfg.get_str("build.image_server"),
        image_server_alias=cfg.get_str("build.image_server_alias"),
        mirror=cfg.get_str("build.mirror"),
        host_ca_certificates=cfg.get_bool("build.host_ca_certificates"),
        tools=[str(t) for t in cfg.get_list("build.tools")],
        required_tool=cfg.get_str("tool.name"),
        pool=cfg.get_str("incus.pool"),
        network=cfg.get_str("incus.network"),
        remote=cfg.get_str("incus.remote") or None,
    )


def _log_path(name: str) -> Path:
    from coi.config.paths import coi_home

    return coi_home() / "logs" / f"build-{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


@click.group(
    "build",
    cls=CoiGroup,
    invoke_without_command=True,
    examples=BUILD_EXAMPLES,
    short_help="Build the 'coi' agent image (or a custom one).",
)
@click.option("--force", is_flag=True, help="Rebuild even if the image exists.")
@click.option("-v", "--verbose", is_flag=True, help="Show the build's full output.")
@click.pass_context
def build_cmd(ctx: click.Context, force: bool, verbose: bool) -> None:
    """Build the 'coi' image: Debian 12, systemd, Docker, Node.js, Python, git, tmux, and the
    agent CLIs (claude, opencode, codex, gemini, aider). The previous version is kept under its
    versioned alias (prune with 'coi image cleanup coi- --keep N')."""
    if ctx.invoked_subcommand is not None:
        return
    from coi.cli.context import connect, load_settings
    from coi.images.builder import Builder
    from coi.images.buildlog import BuildLog

    cfg = load_settings()
    opts = _options(cfg, "coi", force)
    click.echo("Building coi image...")
    log = BuildLog(_log_path("coi"), verbose=verbose)
    try:
        with connect(cfg) as client:
            res = Builder(client, log).build_coi(opts)
    finally:
        log.close()
    if res.skipped:
        log.path.unlink(missing_ok=True)
        click.echo("\nImage already exists. Use --force to rebuild.")
        return
    click.echo(f"\n Image 'coi' built successfully! ({log.elapsed():.0f}s)")
    click.echo(f"  Version: {res.version}")
    click.echo(f"  Fingerprint: {res.fingerprint}")
    for tool, status in res.tools.items():
        click.echo(f"  {tool}: {status}")
    click.echo(f"  Log: {log.path}")


@build_cmd.command(
    "custom",
    cls=CoiCommand,
    examples="  coi build custom my-img --script setup.sh\n"
    "  coi build custom my-img --script setup.sh --base coi-tiny --force",
)
@click.argument("name")
@click.option("--script", "script", required=True, type=click.Path(path_type=Path),
              help="Shell script run as root in the build container.")  # fmt: skip
@click.option("--base", default="coi", show_default=True, help="Image to start from.")
@click.option("--force", is_flag=True, help="Rebuild even if NAME exists.")
@click.option("-v", "--verbose", is_flag=True, help="Show the script's full output.")
def custom_cmd(name: str, script: Path, base: str, force: bool, verbose: bool) -> None:
    """Run your script as root on a base image and publish the result as NAME.

    Prints {"alias", "skipped", "fingerprint"} as JSON on stdout; progress goes to stderr.
    """
    from coi.cli.context import connect, load_settings
    from coi.images.builder import Builder
    from coi.images.buildlog import BuildLog

    cfg = load_settings()
    log = BuildLog(_log_path(name), verbose=verbose)
    try:
        with connect(cfg) as client:
            res = Builder(client, log).build_custom(_options(cfg, name, force), script, base)
    finally:
        log.close()
    if res.skipped:
        log.path.unlink(missing_ok=True)
    out = {"alias": res.alias, "skipped": res.skipped, "fingerprint": res.fingerprint}
    click.echo(json.dumps(out))


@build_cmd.command("tiny", cls=CoiCommand, examples="  coi build tiny --force")
@click.option("--force", is_flag=True, help="Rebuild even if the image exists.")
def tiny_cmd(force: bool) -> None:
    """Build the tiny busybox+tmux image (seconds; used by tests and probes)."""
    from coi.cli.context import connect, load_settings
    from coi.images import manage

    cfg = load_settings()
    with connect(cfg) as client:
        res = manage.build_tiny(client, force=force)
    if res.skipped:
        click.echo(f"Image '{res.alias}' already exists. Use --force to rebuild.", err=True)
        return
    click.echo(json.dumps({"alias": res.alias, "fingerprint": res.fingerprint}), nl=True)
