"""`coi bench`: time to first command on this machine, next to the daemon's own floors."""

from __future__ import annotations

import sys

import click

from coi.cli.app import CoiCommand
from coi.cli.render import check_format, echo_json

EXAMPLES = """\
  coi bench                         # 5 rounds on the configured image
  coi bench --runs 20 --image coi-tiny
  coi bench --list-containers 0     # no `coi list` rows
  coi bench --no-running-spare      # no rows of a session taking a running spare
  coi bench --format json | jq .ratios"""


@click.command("bench", cls=CoiCommand, examples=EXAMPLES)
@click.option("--runs", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Rounds; each round times every row once.")  # fmt: skip
@click.option("--image", default=None, metavar="IMAGE",
              help="Image to start sandboxes from (default: [defaults] image).")  # fmt: skip
@click.option("--list-containers", "listed", type=click.IntRange(0, 100), default=10,
              show_default=True, metavar="N",
              help="Running containers made for the `coi list` rows (0: none).")  # fmt: skip
@click.option("--running-spare/--no-running-spare", "spare", default=True, show_default=True,
              help="Time `coi run -- true` taking a running spare, next to the daemon's "
              "`exec` into a running container.")  # fmt: skip
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
def bench_cmd(runs: int, image: str | None, listed: int, spare: bool, fmt: str) -> None:
    """Time `coi run -- true` against the daemon doing the least it must, in the same run.

    Prints p50 and p95 of: the whole `coi run -- true` (a new sandbox from the image, its
    network proven, the command, the return), the cold floor (create from the image, start,
    exec `true`, delete: what any client asks of the daemon) and the warm floor (start a
    container made beforehand, exec `true`), with the server and the storage pool's driver;
    and `coi list` next to the daemon's own CLI's `list`, with N running containers made for
    them (where that CLI is installed and the daemon is the local one); and `coi run -- true`
    taking a booted spare ([sandbox] running_spares) next to that CLI's `exec CT -- true`
    into a running container.
    Rounds are interleaved; everything the bench makes is removed, also on Ctrl-C.
    """
    from coi.cli.context import daemon
    from coi.perf.bench import Setup, run

    check_format(fmt, ("text", "json"))
    cfg, client = daemon()
    setup = Setup(
        image=image or cfg.get_str("defaults.image"),
        pool=cfg.get_str("incus.pool"),
        network=cfg.get_str("incus.network"),
        runs=runs,
        listed=listed,
        spare=spare,
    )

    def progress(text: str) -> None:
        sys.stderr.write(f"[bench] {text}\n")
        sys.stderr.flush()

    with client:
        report = run(client, setup, progress=progress)
    if fmt == "json":
        echo_json(report.as_json())
        return
    click.echo(
        f"{report.server}, pool {report.pool} ({report.driver}), image {report.image}, "
        f"{report.runs} runs, {report.cpus} CPUs, load average {report.load:.1f}\n"
    )
    width = max(len(r.label) for r in report.rows)
    click.echo(f"{'':{width}}  {'p50':>8}  {'p95':>8}")
    for r in report.rows:
        click.echo(f"{r.label:{width}}  {r.p50 * 1000:6.0f} ms  {r.p95 * 1000:6.0f} ms")
    click.echo("")
    for name, ratio in report.ratios.items():
        click.echo(f"{name}: {ratio:.2f}")
