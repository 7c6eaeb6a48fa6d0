"""`coi trust` / `coi untrust`: pin a workspace config file's exact content, or drop the pin."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from coi.cli.app import CoiCommand

TRUST_EXAMPLES = """\
  coi trust                       # ./.coi.toml as it is now: all of its settings apply
  coi trust .coi/config.toml
  coi trust --list                # what you trust, and whether it changed since"""

UNTRUST_EXAMPLES = """\
  coi untrust                     # ./.coi.toml is untrusted again
  coi untrust ~/old/.coi.toml"""


def _target(path: Path | None) -> Path:
    path = Path(".coi.toml") if path is None else path
    if path.is_dir() and not path.is_symlink():
        path = path / ".coi.toml"
    return Path(os.path.abspath(path))


def _list(fmt: str) -> None:
    from coi.config.trust import TrustStore, Unreadable, read_nofollow

    rows = []
    for key, entry in sorted(TrustStore().load().items()):
        path = Path(key)
        try:
            read = read_nofollow(path.parent, path.name)
            state = "missing" if read is None else "ok"
            if read is not None and read.sha256 != entry.get("sha256"):
                state = "changed"
        except (Unreadable, OSError):
            state = "unreadable"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(entry.get("trusted_at", 0))))
        rows.append({"path": key, "sha256": entry.get("sha256", ""), "state": state, "at": when})
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No workspace config files are trusted.")
        return
    for r in rows:
        click.echo(f"{r['state']:<10} {r['sha256'][:12]}  {r['at']}  {r['path']}")


@click.command("trust", cls=CoiCommand, examples=TRUST_EXAMPLES)
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option(
    "--list", "list_", is_flag=True, help="List trusted files and whether they changed since."
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def trust_cmd(path: Path | None, list_: bool, fmt: str) -> None:
    """Trust a workspace config file (default ./.coi.toml) exactly as it is now.

    Settings in ./.coi.toml or ./.coi/config.toml that would weaken the sandbox (network,
    mounts, limits, protection, the tool, the image, ...) are dropped unless you trust the
    file. Trust pins the file's content (sha256): after any change it is untrusted again.
    """
    import tomllib

    from coi.config.loader import judge_file
    from coi.config.trust import TrustStore, Unreadable, read_nofollow
    from coi.errors import ConfigError, UsageError

    if list_:
        if path is not None:
            raise UsageError("--list takes no PATH")
        _list(fmt)
        return
    target = _target(path)
    try:
        read = read_nofollow(target.parent, target.name)
    except Unreadable as err:
        raise UsageError(
            f"cannot trust {target}: {err}",
            resolution="Trust the file itself by its own path, not a link to it.",
        ) from None
    if read is None:
        raise UsageError(f"cannot trust {target}: no such file")
    try:
        data = tomllib.loads(read.data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(
            f"cannot trust {target}: {err}", resolution="Fix the TOML syntax first."
        ) from None
    unlocked = judge_file(data, str(target), os.environ)
    TrustStore().trust(read)
    click.echo(f"Trusted {read.path} (sha256 {read.sha256[:12]}).")
    if unlocked:
        click.echo("These settings from it now apply, though they weaken the sandbox:")
        for d in unlocked:
            click.echo(f"  {d.key} = {json.dumps(d.value)}")
    else:
        click.echo("Nothing in it needed trust: it only tightens the sandbox.")
    click.echo("Any change to the file makes it untrusted again.")


@click.command("untrust", cls=CoiCommand, examples=UNTRUST_EXAMPLES)
@click.argument("path", required=False, type=click.Path(path_type=Path))
def untrust_cmd(path: Path | None) -> None:
    """Stop trusting a workspace config file (default ./.coi.toml)."""
    from coi.config.trust import TrustStore, pin_key

    key = pin_key(_target(path))
    if TrustStore().untrust(key):
        click.echo(f"No longer trusted: {key}")
    else:
        click.echo(f"Was not trusted: {key}")
