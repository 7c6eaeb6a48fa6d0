"""`coi file push|pull`: copy files and directory trees in and out of containers, with modes;
what a pull brings out is data only."""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from coi.backend.intake import PullReport, check_destination
from coi.cli.app import CoiGroup
from coi.cli.container_cmds import print_help_when_bare
from coi.cli.context import daemon
from coi.errors import NotFound, UsageError

if TYPE_CHECKING:
    from coi.backend.client import IncusClient


def split_remote(value: str, what: str) -> tuple[str, str]:
    """`container:/path` -> (container, absolute path).

    :raises UsageError: no colon, an empty side, or a relative path.
    """
    name, sep, path = value.partition(":")
    if not sep or not name or not path:
        raise UsageError(
            f"{what} must be in format 'container:path'",
            details=f"got: {value}",
            resolution="For example: my-box:/workspace/file.txt",
        )
    if not path.startswith("/"):
        raise UsageError(f"container path must be absolute: {path}")
    return name, posixpath.normpath(path)


@click.group(
    "file",
    cls=CoiGroup,
    invoke_without_command=True,
    examples="  coi file push ./notes.txt my-box:/workspace/notes.txt\n"
    "  coi file pull -r my-box:/home/code/.claude ./claude-state",
    short_help="Copy files in and out of containers.",
)
@click.pass_context
def file_cmd(ctx: click.Context) -> None:
    """Copy files and directories in and out of containers (modes are kept)."""
    print_help_when_bare(ctx)


@file_cmd.command("push", examples="  coi file push -r ./src my-box:/workspace/src")
@click.argument("local", type=click.Path(path_type=Path))
@click.argument("dest")
@click.option("-r", "--recursive", is_flag=True, help="Copy a directory tree.")
@click.option("--uid", type=int, default=0, show_default=True, help="Owner inside.")
@click.option("--gid", type=int, default=0, show_default=True, help="Group inside.")
def push_cmd(local: Path, dest: str, recursive: bool, uid: int, gid: int) -> None:
    """Copy a local file (or with -r a directory) to CONTAINER:PATH (parents are created)."""
    name, path = split_remote(dest, "destination")
    if not local.exists() and not local.is_symlink():
        raise NotFound(f"source does not exist: {local}")
    if local.is_dir() and not recursive:
        raise UsageError("source is a directory, use -r flag")
    with daemon()[1] as client:
        if not client.instances.exists(name):
            raise NotFound(f"container {name} not found")
        parent = posixpath.dirname(path)
        if parent != "/" and client.files.stat(name, parent) is None:
            client.files.mkdir(name, parent, uid=uid, gid=gid, parents=True)
        if local.is_dir():
            client.files.push_tree(name, local, path, uid=uid, gid=gid)
            click.echo(f"Pushed directory {local} -> {name}:{path}", err=True)
        else:
            client.files.push_file(name, local, path, uid=uid, gid=gid)
            click.echo(f"Pushed file {local} -> {name}:{path}", err=True)


@file_cmd.command("pull", examples="  coi file pull -r my-box:/workspace/out ./out")
@click.argument("source")
@click.argument("local", type=click.Path(path_type=Path))
@click.option("-r", "--recursive", is_flag=True, help="Copy a directory tree.")
def pull_cmd(source: str, local: Path, recursive: bool) -> None:
    """Copy CONTAINER:PATH (or with -r a directory) to a local path.

    What comes out is data: plain files and directories only. Symbolic links, FIFOs,
    sockets and device nodes are not copied, and setuid, setgid, sticky and world-writable
    bits are removed; a warning names each. coi never writes through a symbolic link on
    the host: a destination that is or goes through one is refused.
    """
    name, path = split_remote(source, "source")
    # Links above the current and home folders are the user's own set-up (a home reached
    # through a link); below them, coi follows none.
    trusted = (Path.cwd(), Path.home())
    local = check_destination(local, trusted=trusted)
    with daemon()[1] as client:
        if not client.instances.exists(name):
            raise NotFound(f"container {name} not found")
        info = client.files.stat(name, path)
        if info is None:
            raise NotFound(f"source does not exist: {name}:{path}")
        if info.type == "directory":
            if not recursive:
                raise UsageError("source is a directory, use -r flag")
            _warn(_pull_dir(client, name, path, local))
            click.echo(f"Pulled directory {name}:{path} -> {local}", err=True)
            return
        target = local / posixpath.basename(path) if local.is_dir() else local
        target = check_destination(target, trusted=trusted)
        _warn(client.files.pull_file(name, path, target))
        click.echo(f"Pulled file {name}:{path} -> {target}", err=True)


def _warn(report: PullReport) -> None:
    for line in report.warnings():
        click.echo(f"Warning: {line}", err=True)


def _pull_dir(client: IncusClient, name: str, path: str, local: Path) -> PullReport:
    """Pull into a fresh directory beside `local`, then swap it in: a failed pull leaves the
    old `local` untouched, and nothing the container names can land outside it."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.pull-", dir=local.parent))
    try:
        report = client.files.pull_tree(name, path, tmp / "tree")
        if local.is_symlink():  # made meanwhile: replaced, not followed
            local.unlink()
        elif local.is_dir():
            shutil.rmtree(local)
        elif local.exists():
            local.unlink()
        (tmp / "tree").rename(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
