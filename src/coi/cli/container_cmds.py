"""`coi container ...`: low-level, scriptable container commands with stable exit codes."""

from __future__ import annotations

import sys

import click

from coi.cli.app import CoiGroup
from coi.cli.completion import complete_any_container, complete_images
from coi.cli.context import daemon
from coi.cli.render import check_format, echo_json, local_time, table

GROUP_EXAMPLES = """\
  coi container launch coi my-box
  coi container exec my-box -- ls /
  coi container exec my-box --capture -- sh -c 'exit 3'; echo $?
  coi container exists my-box && echo yes
  coi container delete my-box --force"""


def print_help_when_bare(ctx: click.Context) -> None:
    """A group called without a sub-command prints its help and succeeds (as upstream)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(0)


@click.group(
    "container",
    cls=CoiGroup,
    invoke_without_command=True,
    examples=GROUP_EXAMPLES,
    short_help="Low-level container commands for scripts.",
)
@click.pass_context
def container_cmd(ctx: click.Context) -> None:
    """Low-level container commands for scripts: launch, exec, stop, delete, ..."""
    print_help_when_bare(ctx)


@container_cmd.command("launch", examples="  coi container launch coi my-box --ephemeral")
@click.argument("image", shell_complete=complete_images)
@click.argument("name")
@click.option("--ephemeral", is_flag=True, help="Delete the container when it stops.")
@click.option(
    "--target",
    default=None,
    metavar="MEMBER",
    help="On an Incus cluster: the member to make it on (default: the scheduler chooses).",
)
def launch_cmd(image: str, name: str, ephemeral: bool, target: str | None) -> None:
    """Create and start a container from an image (Docker-ready settings)."""
    from coi.sessions import containers

    cfg, client = daemon()
    with client:
        containers.launch(
            client,
            image,
            name,
            pool=cfg.get_str("incus.pool"),
            network=cfg.get_str("incus.network"),
            ephemeral=ephemeral,
            target=target or "",
            setxattr=cfg.get_bool("incus.intercept_setxattr"),
        )
    click.echo(f"Container {name} launched from {image}", err=True)


@container_cmd.command("start")
@click.argument("name", shell_complete=complete_any_container)
def start_cmd(name: str) -> None:
    """Start a stopped container."""
    from coi.sessions import containers

    _cfg, client = daemon()
    with client:
        containers.start(client, name)
    click.echo(f"Container {name} started", err=True)


@container_cmd.command("stop")
@click.argument("name", shell_complete=complete_any_container)
@click.option("--force", is_flag=True, help="Kill it instead of a clean shutdown.")
def stop_cmd(name: str, force: bool) -> None:
    """Stop a running container."""
    from coi.sessions import containers

    _cfg, client = daemon()
    with client:
        containers.stop(client, name, force=force)
    click.echo(f"Container {name} stopped", err=True)


@container_cmd.command("delete")
@click.argument("name", shell_complete=complete_any_container)
@click.option("--force", is_flag=True, help="Delete it even if it is running.")
def delete_cmd(name: str, force: bool) -> None:
    """Delete a container."""
    from coi.sessions import containers

    _cfg, client = daemon()
    with client:
        containers.delete(client, name, force=force)
    click.echo(f"Container {name} deleted", err=True)


@container_cmd.command("exists")
@click.argument("name", shell_complete=complete_any_container)
@click.pass_context
def exists_cmd(ctx: click.Context, name: str) -> None:
    """Exit 0 if the container exists, 1 if not (prints nothing)."""
    from coi.sessions import containers

    _cfg, client = daemon()
    with client:
        ctx.exit(0 if containers.exists(client, name) else 1)


@container_cmd.command("running")
@click.argument("name", shell_complete=complete_any_container)
@click.pass_context
def running_cmd(ctx: click.Context, name: str) -> None:
    """Exit 0 if the container is running, 1 if not (prints nothing)."""
    from coi.sessions import containers

    _cfg, client = daemon()
    with client:
        running = containers.running(client, name)
    ctx.exit(0 if running else 1)


@container_cmd.command(
    "exec",
    examples="  coi container exec my-box -- make test\n"
    "  coi container exec my-box --user 1000 --env FOO=bar -- sh -c 'echo $FOO'\n"
    "  coi container exec my-box --capture --format raw -- cat /etc/os-release\n"
    "  coi container exec my-box -t -- bash",
)
@click.argument("name", shell_complete=complete_any_container)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--user", type=int, default=None, help="Run as this uid (default: root).")
@click.option("--group", type=int, default=None, help="Run with this gid (default: --user).")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable.")
@click.option("--cwd", default=None, help="Working directory (default: the workspace).")
@click.option("--capture", is_flag=True, help="Collect the output; print it at the end.")
@click.option("--format", "fmt", default=None, metavar="FORMAT", help="json (default) or raw.")
@click.option("-t", "--tty", is_flag=True, help="Run on a terminal (interactive programs).")
@click.pass_context
def exec_cmd(
    ctx: click.Context,
    name: str,
    command: tuple[str, ...],
    user: int | None,
    group: int | None,
    env: tuple[str, ...],
    cwd: str | None,
    capture: bool,
    fmt: str | None,
    tty: bool,
) -> None:
    """Run a command in a container; its exit code is coi's exit code."""
    from coi.errors import UsageError
    from coi.sessions import containers
    from coi.sessions.runner import print_capture, stream_writer

    if not command:
        raise UsageError("no command specified (use -- before command)")
    if fmt is not None and not capture:
        raise UsageError("--format flag requires --capture flag")
    if capture:
        check_format(fmt or "json", ("json", "raw"))
    if tty and capture:
        raise UsageError("--tty and --capture cannot be used together")
    stream = not (tty or capture)
    _cfg, client = daemon()
    with client:
        res = containers.run_command(
            client,
            name,
            command,
            env=env,
            cwd=cwd,
            user=user,
            group=group,
            mode="tty" if tty else "capture" if capture else "stream",
            on_stdout=stream_writer(sys.stdout) if stream else None,
            on_stderr=stream_writer(sys.stderr) if stream else None,
        )
    if tty:
        ctx.exit(res.exit_code)
    if capture:
        # Unlike upstream, a failed command's exit code is passed on in JSON mode too.
        print_capture(fmt or "json", res.stdout, res.stderr, res.exit_code)
        ctx.exit(res.exit_code)
    if res.exit_code != 0:
        click.echo(f"Error: command failed: exit status {res.exit_code}", err=True)
    ctx.exit(res.exit_code)


@container_cmd.command(
    "mount", examples="  coi container mount my-box data /srv/data /data --readonly"
)
@click.argument("name", shell_complete=complete_any_container)
@click.argument("device")
@click.argument("source", type=click.Path(exists=True, file_okay=False, resolve_path=True))
@click.argument("path")
@click.option(
    "--shift/--no-shift",
    default=None,
    help="Shift owners with an idmapped mount, so host owners stay owners inside "
    "(default: on where the daemon can, as upstream; --no-shift: a plain mount).",
)
@click.option("--readonly", is_flag=True, help="Mount read-only.")
def mount_cmd(
    name: str, device: str, source: str, path: str, shift: bool | None, readonly: bool
) -> None:
    """Add a host directory to a container as a disk device."""
    from coi.sessions import containers

    spec = containers.disk_device(source, path, shift=shift is not False, readonly=readonly)
    _cfg, client = daemon()
    with client:
        note = containers.mount(client, name, device, spec, shift_auto=shift is None)
    if note:
        click.echo(f"Note: {note}", err=True)
    click.echo(f"Disk mounted: {source} -> {name}:{path}", err=True)


@container_cmd.command("list", examples="  coi container list\n  coi container list --format json")
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
def list_cmd(fmt: str) -> None:
    """List every container of the project (not only coi's)."""
    from coi.sessions import containers

    check_format(fmt, ("json", "text"))
    _cfg, client = daemon()
    with client:
        instances = containers.every_container(client)
    if fmt == "json":
        echo_json([dict(i.raw) for i in instances])
        return
    rows = [["NAME", "STATE", "IPV4", "EPHEMERAL", "CREATED"]]
    for i in sorted(instances, key=lambda i: i.name):
        st = i.state
        rows.append(
            [
                i.name,
                i.status.upper(),
                (st.ipv4() if st else None) or "-",
                "yes" if i.ephemeral else "no",
                local_time(i.created_at),
            ]
        )
    click.echo(table(rows))
