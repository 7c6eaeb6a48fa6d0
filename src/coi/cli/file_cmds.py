"""`coi file push|pull`: copy files and directory trees in and out of containers, with modes;
what a pull brings out is data only."""

from __future__ import annotations

import posixpath
from pathlib import Path

import click

from coi.cli.app import CoiGroup
from coi.cli.container_cmds import print_help_when_bare
from coi.cli.context import daemon
from coi.errors import UsageError


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
    from coi.sessions import files

    name, path = split_remote(dest, "destination")
    files.check_push_source(local, recursive=recursive)
    with daemon()[1] as client:
        done = files.push(client, local, name, path, uid=uid, gid=gid)
    click.echo(f"Pushed {done.kind} {done.local} -> {done.container}:{done.path}", err=True)


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
    from coi.sessions import files

    name, path = split_remote(source, "source")
    local = files.pull_destination(local)
    with daemon()[1] as client:
        done = files.pull(client, name, path, local, recursive=recursive)
    for line in done.warnings:
        click.echo(f"Warning: {line}", err=True)
    click.echo(f"Pulled {done.kind} {done.container}:{done.path} -> {done.target}", err=True)
