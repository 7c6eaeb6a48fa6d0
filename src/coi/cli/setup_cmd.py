"""`coi setup`: install, start and initialize the container daemon."""

from __future__ import annotations

import click

from coi.cli.app import CoiCommand

EXAMPLES = """\
  sudo coi setup                    # as root, once per machine
  sudo coi setup --user alice       # also let alice use coi (socket group, uid mapping)
  sudo coi setup --daemon lxd       # LXD instead of Incus
  coi setup                         # later runs: check that everything is still in place"""


@click.command("setup", cls=CoiCommand, examples=EXAMPLES)
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="NAME",
    help="A user who will run coi: socket access and uid mapping (repeatable).",
)
@click.option(
    "--storage",
    type=click.Choice(["auto", "btrfs", "dir"]),
    default="auto",
    show_default=True,
    help="Storage driver for the coi pool.",
)
@click.option(
    "--pool-size",
    type=int,
    default=30,
    show_default=True,
    metavar="GIB",
    help="Size of a btrfs pool's sparse loop file.",
)
@click.option("--no-image", is_flag=True, help="Do not build the tiny test image.")
@click.option(
    "--daemon",
    type=click.Choice(["auto", "incus", "lxd"]),
    default="auto",
    show_default=True,
    help="The daemon to install and use: auto is Incus, or LXD where Incus cannot be had.",
)
@click.option(
    "--no-backports",
    is_flag=True,
    help="On Debian 12, do not enable bookworm-backports for Incus (LXD is installed instead).",
)
def setup_cmd(
    users: tuple[str, ...],
    storage: str,
    pool_size: int,
    no_image: bool,
    daemon: str,
    no_backports: bool,
) -> None:
    """Make this machine ready for coi (safe to run again).

    Installs Incus (on Debian 12 from bookworm-backports; LXD only where Incus cannot be had,
    or with --daemon lxd) and the host tools coi uses, starts
    the daemon (without systemd, coi starts it in the background), creates a storage pool
    (btrfs when the kernel has it), a bridge, the uid mapping entries, and the tiny image.
    """
    from coi.cli.context import load_settings
    from coi.host.provision import SetupOptions, StepResult, run_setup

    cfg = load_settings()
    if cfg.get_str("incus.remote"):
        from coi.errors import UsageError

        raise UsageError(
            f"coi setup prepares this machine, not the remote '{cfg.get_str('incus.remote')}'",
            details="It installs and starts a daemon here, with its pool, bridge and image.",
            resolution="Run 'coi setup' on the server itself (docs/remote.md), or drop "
            "--remote / COI_REMOTE / 'coi remote switch local' to set up this machine.",
        )

    def show(step: StepResult) -> None:
        mark = "[done]" if step.changed else "[ok]  "
        click.echo(f"{mark} {step.name}: {step.message}")

    opts = SetupOptions(
        pool=cfg.get_str("incus.pool"),
        pool_size_gib=pool_size,
        storage_driver=storage,
        network=cfg.get_str("incus.network"),
        users=list(users),
        project=cfg.get_str("incus.project"),
        build_tiny=not no_image,
        daemon="lxd" if daemon == "lxd" else "incus" if daemon == "incus" else "auto",
        backports=not no_backports,
    )
    report = run_setup(opts, progress=show)
    click.echo("Setup complete." if report.changed else "Nothing to do: this machine is ready.")
