"""`coi image ...` and `coi images`: list, publish, check, delete and prune local images."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from coi.cli.app import CoiCommand, CoiGroup
from coi.cli.completion import complete_any_container, complete_images
from coi.cli.container_cmds import print_help_when_bare
from coi.cli.context import daemon
from coi.cli.options import stacked
from coi.cli.render import check_format, echo_json, human_size, local_time, table

if TYPE_CHECKING:
    from coi.backend.models import Image

# Images coi knows by name, with what they are for.
KNOWN = {
    "coi": ("coi image (agent CLIs, Node.js, Python, Docker, GitHub CLI, tmux)", "coi build"),
    "coi-tiny": ("tiny busybox + tmux image (tests, quick probes)", "coi build tiny"),
}


def _images() -> list[Image]:
    from coi.images import manage

    with daemon()[1] as client:
        return manage.local_images(client)


def _image_json(i: Image) -> dict[str, Any]:
    return {
        "fingerprint": i.fingerprint,
        "aliases": list(i.aliases),
        "size": i.size,
        "created_at": i.created_at,
        "description": i.description,
    }


def _list(all_: bool, prefix: str | None, fmt: str) -> None:
    check_format(fmt, ("table", "json"))
    images = _images()
    if prefix is not None:
        images = [i for i in images if any(a.startswith(prefix) for a in i.aliases)]
    if fmt == "json":
        echo_json([_image_json(i) for i in images])
        return
    if prefix is not None:
        _list_prefix(images, prefix)
        return
    aliases = {a for i in images for a in i.aliases}
    click.echo("Available Images:\n\nCOI Images:")
    for alias, (what, build) in KNOWN.items():
        if alias in aliases:
            click.echo(f"  ✓ {alias}\n    {what}")
        else:
            click.echo(f"  ✗ {alias} (not built)\n    {what}\n    Build with: {build}")
    click.echo("")
    if all_:
        click.echo("All Local Images:")
        rows = [["ALIAS", "SIZE", "UPLOAD DATE"]]
        for i in images:
            for a in i.aliases or ("(" + i.fingerprint[:12] + ")",):
                rows.append([a, human_size(i.size), local_time(i.uploaded_at, "%Y-%m-%d %H:%M")])
        click.echo(table(rows, indent="  ") if len(rows) > 1 else "  No local images found")
    else:
        click.echo("Tip: Use --all to see all local images")
    click.echo("\nCustom Images:\n  Build your own: coi build custom my-image --script setup.sh")


def _list_prefix(images: list[Image], prefix: str) -> None:
    rows = [["ALIAS", "SIZE", "CREATED"]]
    for i in images:
        for a in i.aliases:
            if a.startswith(prefix):
                rows.append([a, human_size(i.size), local_time(i.created_at, "%Y-%m-%d %H:%M")])
    if len(rows) == 1:
        click.echo(f"No images found with prefix '{prefix}'")
        return
    click.echo(f"Images with prefix '{prefix}':\n" + table(rows))


_list_options = stacked(
    click.option("-a", "--all", "all_", is_flag=True, help="Show every local image."),
    click.option("--prefix", default=None, help="Only aliases starting with this."),
    click.option("--format", "fmt", default="table", metavar="FORMAT", help="table or json."),
)


@click.group(
    "image",
    cls=CoiGroup,
    invoke_without_command=True,
    examples="  coi image list --all\n  coi image exists coi && echo built\n"
    "  coi image cleanup coi- --keep 2",
    short_help="Manage local images.",
)
@click.pass_context
def image_cmd(ctx: click.Context) -> None:
    """Manage local images: list, publish, exists, delete, cleanup."""
    print_help_when_bare(ctx)


@image_cmd.command("list", examples="  coi image list\n  coi image list --format json")
@_list_options
def image_list_cmd(all_: bool, prefix: str | None, fmt: str) -> None:
    """List images."""
    _list(all_, prefix, fmt)


@click.command("images", cls=CoiCommand, examples="  coi images --all")
@_list_options
def images_cmd(all_: bool, prefix: str | None, fmt: str) -> None:
    """List images (same as 'coi image list')."""
    _list(all_, prefix, fmt)


@image_cmd.command(
    "publish", examples="  coi image publish my-box my-image --description 'with tools'"
)
@click.argument("container", shell_complete=complete_any_container)
@click.argument("alias")
@click.option("--description", default="", help="Image description.")
def publish_cmd(container: str, alias: str, description: str) -> None:
    """Publish a container as an image (the container is stopped, then deleted)."""
    from coi.images import manage

    with daemon()[1] as client:
        done = manage.publish(client, container, alias, description=description)
    click.echo(json.dumps({"fingerprint": done.fingerprint, "alias": done.alias}))


@image_cmd.command("exists", examples="  coi image exists coi || coi build")
@click.argument("alias", shell_complete=complete_images)
@click.pass_context
def exists_cmd(ctx: click.Context, alias: str) -> None:
    """Exit 0 if the image alias exists, 1 if not (prints nothing)."""
    from coi.images import manage

    with daemon()[1] as client:
        ctx.exit(0 if manage.exists(client, alias) else 1)


@image_cmd.command("delete", examples="  coi image delete my-image")
@click.argument("alias", shell_complete=complete_images)
def delete_cmd(alias: str) -> None:
    """Delete the image an alias names."""
    from coi.images import manage

    with daemon()[1] as client:
        manage.delete(client, alias)
    click.echo(f"Deleted image {alias}", err=True)


@image_cmd.command("cleanup", examples="  coi image cleanup coi- --keep 3")
@click.argument("prefix")
@click.option("--keep", type=int, required=True, help="How many of the newest versions to keep.")
def cleanup_cmd(prefix: str, keep: int) -> None:
    """Delete old versions PREFIXYYYYMMDD-HHMMSS of an image, keeping the newest."""
    from coi.images.versions import cleanup

    with daemon()[1] as client:
        res = cleanup(client, prefix, keep)
    click.echo("Cleanup complete:", err=True)
    if res.deleted:
        click.echo(f"\nDeleted {len(res.deleted)} old version(s):", err=True)
        for a in res.deleted:
            click.echo(f"  - {a}", err=True)
    if res.kept:
        click.echo(f"\nKept {len(res.kept)} recent version(s):", err=True)
        for a in res.kept:
            click.echo(f"  - {a}", err=True)
