"""`coi shell` and `coi run`: thin wrappers that turn flags into session requests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

from coi.cli.app import CoiCommand
from coi.cli.options import merged_params, session_options, shell_options

if TYPE_CHECKING:
    from coi.sessions.prepare import Prepared, SessionOptions

RUN_EXAMPLES = """\
  coi run -- make test
  coi run                         # the workspace's executable ./coi-run, in the sandbox
  coi run --workspace ~/project -e FOO=bar -- sh -c 'echo $FOO'
  coi run --capture --format json -- ls /workspace"""

SHELL_EXAMPLES = """\
  coi shell                       # Claude Code in tmux, workspace = current folder
  coi shell --tool opencode       # another agent
  coi shell --resume              # continue this workspace's last conversation
  coi shell --background          # start detached; 'coi attach' later
  coi shell --persistent --slot 2 # keep the container (and what you installed)"""


def _options(p: dict[str, Any], kind: Literal["run", "shell"]) -> SessionOptions:
    """The session the flags ask for."""
    from coi.sessions.prepare import LIMIT_NAMES, SessionOptions
    from coi.sessions.sandbox import parse_env

    limits = {n: p[f"limit_{n}"] for n in LIMIT_NAMES if p.get(f"limit_{n}") is not None}
    return SessionOptions(
        workspace=p.get("workspace"),
        image=p.get("image"),
        persistent=p.get("persistent"),
        network=p.get("network"),
        tool=p.get("tool"),
        monitor=p.get("monitor"),
        writable_git_hooks=p.get("writable_git_hooks"),
        limits=limits,
        mounts=tuple(p.get("mounts") or ()),
        env=parse_env(p.get("env") or ()),
        profile=p.get("profile"),
        container=p.get("container"),
        kind=kind,
        ports=tuple(p.get("ports") or ()),
        alias=p.get("alias"),
        review=p.get("review"),
        target=p.get("target"),
    )


def _prepare(p: dict[str, Any], kind: Literal["run", "shell"]) -> Prepared:
    """The prepared session, its warnings and notes shown."""
    from coi.sessions.prepare import load, prepare

    options = _options(p, kind)
    cfg = load(options, cwd=Path.cwd())
    for warning in cfg.warnings:  # shown first: they may explain an error that follows
        click.echo(f"Warning: {warning}", err=True)
    prepared = prepare(options, config=cfg)
    for line in prepared.messages:
        click.echo(line, err=True)
    return prepared


@click.command(
    "run",
    cls=CoiCommand,
    examples=RUN_EXAMPLES,
    context_settings={"allow_interspersed_args": False},
)
@session_options
@click.option("--capture", is_flag=True, help="Collect the output and print it at the end.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "raw"]),
    default=None,
    help="With --capture: json ({stdout, stderr, exit_code}) or raw.",
)
@click.option("--timeout", type=int, default=None, help="Accepted for compatibility.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_cmd(
    ctx: click.Context,
    /,
    command: tuple[str, ...],
    capture: bool,
    fmt: str | None,
    timeout: int | None,
    **params: Any,
) -> None:
    """Run one command in a fresh sandbox; its exit code is coi's exit code.

    The container is ephemeral: it is removed when the command ends (also on Ctrl-C, and
    when coi itself is killed), unless --persistent keeps it, stopped, for the next run.

    With no command, the workspace's executable coi-run runs (inside the sandbox, from the
    workspace mount; its shebang picks the interpreter).
    """
    from coi.cli.context import connect
    from coi.sessions.runner import RunRequest, run_command

    if fmt and not capture:
        from coi.errors import UsageError

        raise UsageError("--format flag requires --capture flag")
    p = merged_params(ctx, params)
    prepared = _prepare(p, "run")
    if not command:
        from coi.sessions.environment import run_script

        command = tuple(run_script(prepared.workspace, prepared.spec.workspace_target))
    with connect(prepared.config) as client:
        code = run_command(
            client,
            prepared.spec,
            RunRequest(
                command=list(command),
                slot=p.get("slot") or None,
                capture=(fmt or "json") if capture else None,
            ),
        )
    ctx.exit(code)


def run_shell(ctx: click.Context, params: dict[str, Any]) -> int:
    """Start (or resume) an agent session with the given flags; return the exit code."""
    from coi.cli.context import connect
    from coi.sessions.runner import ShellRequest, ShellSession
    from coi.tools.registry import get_tool

    p = merged_params(ctx, params)
    prepared = _prepare(p, "shell")
    cfg, spec = prepared.config, prepared.spec
    tool = get_tool(cfg.get_str("tool.name"))
    resume = p.get("continue_") or p.get("resume")
    req = ShellRequest(
        tool=tool,
        slot=p.get("slot") or None,
        resume=resume,
        container=p.get("container"),
        background=bool(p.get("background")),
        tmux=p.get("tmux") is not False,
        debug=bool(p.get("debug")),
        bypass=cfg.get_str("tool.permission_mode") == "bypass",
        binary=cfg.get_str("tool.binary") or None,
        persistent_explicit=p.get("persistent") is not None,
    )
    with connect(cfg) as client:
        return ShellSession(client, cfg, spec, req).run()


@click.command("shell", cls=CoiCommand, examples=SHELL_EXAMPLES)
@session_options
@shell_options
@click.argument("extra", nargs=-1)
@click.pass_context
def shell_cmd(ctx: click.Context, /, extra: tuple[str, ...], **params: Any) -> None:
    """Start an interactive agent session in a sandbox (the default command)."""
    if extra:
        raise click.UsageError(
            f"unexpected argument '{extra[0]}' - did you mean "
            f"--resume={extra[0]}? (note: use = when specifying session ID)"
        )
    ctx.exit(run_shell(ctx, params))
