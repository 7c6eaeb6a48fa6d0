"""Flags shared by `coi`, `coi shell` and `coi run` (upstream's global flags)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from coi.config.schema import NETWORK_MODES

F = TypeVar("F", bound=Callable[..., Any])


def _apply(func: F, opts: list[Callable[[F], F]]) -> F:
    for opt in reversed(opts):
        func = opt(func)
    return func


def stacked(*opts: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator that applies several click options/arguments, top to bottom."""

    def decorate(func: F) -> F:
        return _apply(func, list(opts))

    return decorate


def session_options(func: F) -> F:
    """Workspace, slot, image, persistence, resume, env, mounts, network, limits."""
    opts: list[Callable[[F], F]] = [
        click.option(
            "-w",
            "--workspace",
            default=None,
            metavar="DIR",
            help="Workspace directory mounted at /workspace (default: .).",
        ),
        click.option("--slot", type=int, default=None, help="Slot number (default: first free)."),
        click.option("--image", default=None, help="Image alias (default: coi)."),
        click.option(
            "--persistent", is_flag=True, default=None, help="Keep the container after the session."
        ),
        click.option(
            "--resume",
            default=None,
            is_flag=False,
            flag_value="auto",
            metavar="[=ID]",
            help="Resume this workspace's latest session, or the given session ID.",
        ),
        click.option(
            "--continue",
            "continue_",
            default=None,
            is_flag=False,
            flag_value="auto",
            metavar="[=ID]",
            help="Alias of --resume.",
        ),
        click.option(
            "--profile",
            default=None,
            help="Apply a profile: hardened, ~/.coi/profiles/NAME, .coi/profiles/NAME or "
            "[profiles.NAME] (coi profile list).",
        ),
        click.option(
            "-e",
            "--env",
            "env",
            multiple=True,
            metavar="KEY=VALUE",
            help="Environment variable for the tool (repeatable).",
        ),
        click.option(
            "--mount",
            "mounts",
            multiple=True,
            metavar="HOST:CONTAINER",
            help="Extra mount (repeatable).",
        ),
        click.option(
            "--port",
            "ports",
            multiple=True,
            metavar="HOST:CONTAINER",
            help="Publish a container port on the host's 127.0.0.1 (repeatable; [ports] in "
            "the config publishes per slot).",
        ),
        click.option(
            "--name",
            "alias",
            default=None,
            metavar="ALIAS",
            help="A name for the sandbox: attach, info, shutdown and kill take it.",
        ),
        click.option(
            "--network",
            default=None,
            type=click.Choice(NETWORK_MODES),
            help="Network mode (default: restricted).",
        ),
        click.option(
            "--review",
            is_flag=True,
            default=None,
            help="The agent works on a copy of the workspace; see it with 'coi diff', bring it "
            "in with 'coi apply' ([workspace] mode = \"review\").",
        ),
        click.option(
            "--target",
            default=None,
            metavar="MEMBER",
            help="On an Incus cluster: the member to make the sandbox on (default: the "
            "cluster's scheduler chooses).",
        ),
        click.option(
            "--writable-git-hooks",
            is_flag=True,
            default=None,
            help="Do not protect .git/hooks and other protected paths.",
        ),
        click.option("--monitor", is_flag=True, default=None, help="Enable security monitoring."),
        click.option("--limit-cpu", default=None, help="CPUs: 2, 0-3 or 0,1."),
        click.option(
            "--limit-cpu-allowance", default=None, help="50% (share) or 25ms/100ms (cap)."
        ),
        click.option("--limit-cpu-priority", type=int, default=None, help="CPU priority 0-10."),
        click.option("--limit-memory", default=None, help="Memory limit, e.g. 2GiB or 50%."),
        click.option("--limit-memory-swap", default=None, help="true, false or a size."),
        click.option("--limit-memory-enforce", default=None, help="hard or soft."),
        click.option("--limit-disk-read", default=None, help="10MB/s or 1000iops."),
        click.option("--limit-disk-write", default=None, help="10MB/s or 1000iops."),
        click.option("--limit-disk-max", default=None, help="Combined read+write rate."),
        click.option("--limit-disk-priority", type=int, default=None, help="Disk priority 0-10."),
        click.option(
            "--limit-tmpfs", default=None, help="RAM-backed /tmp of this size, e.g. 1GiB."
        ),
        click.option("--limit-processes", type=int, default=None, help="Maximum processes."),
        click.option(
            "--limit-duration",
            default=None,
            help="Stop the container after this long: 30s, 2h, 1h30m.",
        ),
    ]
    return _apply(func, opts)


def shell_options(func: F) -> F:
    """Flags of `coi shell` (also accepted by bare `coi`)."""
    opts: list[Callable[[F], F]] = [
        click.option("--debug", is_flag=True, default=None, help="Start bash instead of the tool."),
        click.option(
            "--background",
            is_flag=True,
            default=None,
            help="Start the tool in a detached tmux session.",
        ),
        click.option(
            "--tmux",
            type=click.BOOL,
            default=None,
            help="Run inside tmux (default true; --tmux=false runs it directly).",
        ),
        click.option("--tool", default=None, help="Agent tool (claude, opencode, aider, ...)."),
        click.option("--container", default=None, help="Use this existing container."),
    ]
    return _apply(func, opts)


def merged_params(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """A sub-command's flags, falling back to flags given before it (`coi --slot 2 run`)."""
    parent = ctx.parent.obj if ctx.parent and isinstance(ctx.parent.obj, dict) else {}
    out = dict(parent)
    for k, v in params.items():
        if v not in (None, (), []) or k not in out:
            out[k] = v
    return out
