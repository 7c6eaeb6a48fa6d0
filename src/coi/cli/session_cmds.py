"""`coi shell` and `coi run`: thin wrappers that turn flags into session requests."""

from __future__ import annotations

import os
from typing import Any

import click

from coi.cli.app import CoiCommand
from coi.cli.options import LIMIT_FLAGS, merged_params, session_options, shell_options

RUN_EXAMPLES = """\
  coi run -- make test
  coi run --workspace ~/project -e FOO=bar -- sh -c 'echo $FOO'
  coi run --capture --format json -- ls /workspace"""

SHELL_EXAMPLES = """\
  coi shell                       # Claude Code in tmux, workspace = current folder
  coi shell --tool opencode       # another agent
  coi shell --resume              # continue this workspace's last conversation
  coi shell --background          # start detached; 'coi attach' later
  coi shell --persistent --slot 2 # keep the container (and what you installed)"""


def _config_overrides(p: dict[str, Any]) -> dict[str, Any]:
    cli: dict[str, Any] = {
        "defaults.image": p.get("image"),
        "defaults.persistent": p.get("persistent"),
        "network.mode": p.get("network"),
        "tool.name": p.get("tool"),
        "monitoring.enabled": p.get("monitor"),
        "git.writable_hooks": p.get("writable_git_hooks"),
    }
    for flag, key in LIMIT_FLAGS.items():
        if p.get(flag) is not None:
            cli[key] = str(p[flag]) if not isinstance(p[flag], int) else p[flag]
    return cli


def _prepare(p: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Config, workspace and sandbox spec from the flags."""
    from coi.cli.context import load_settings
    from coi.config.paths import coi_home
    from coi.limits import limits_from_config
    from coi.network.manager import policy_from_config
    from coi.protection.paths import configured_paths, plan
    from coi.sessions.sandbox import build_spec, parse_env
    from coi.sessions.workspace import check_no_credentials, merge_mounts, resolve_workspace

    cfg = load_settings(profile=p.get("profile"), cli=_config_overrides(p))
    workspace = resolve_workspace(p.get("workspace"))
    limits = limits_from_config(cfg)  # validated before anything is created
    protected = configured_paths(cfg)
    target = str(workspace) if cfg.get_bool("paths.preserve_workspace_path") else "/workspace"
    mounts = merge_mounts(cfg.get("mounts.default"), p.get("mounts") or (), target)
    check_no_credentials([workspace, *(m.host for m in mounts)])
    env = {k: os.environ[k] for k in cfg.get_list("tool.forward_env") if k in os.environ}
    env.update(parse_env(p.get("env") or ()))
    spec = build_spec(cfg, workspace, mounts=mounts, env=env)
    spec.limits = limits
    if cfg.get_bool("monitoring.enabled"):
        from coi.monitor.monitor import Settings as MonitorSettings

        spec.monitor = MonitorSettings.from_config(cfg, target)
    for note in limits.notes:
        click.echo(f"Note: {note}", err=True)
    if p.get("container") is None:
        spec.protection = plan(workspace, protected)
    spec.policy, warnings = policy_from_config(cfg, cache_dir=coi_home() / "network-cache")
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)
    return cfg, workspace, spec


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
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
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
    """
    from coi.cli.context import connect
    from coi.sessions.runner import RunRequest, run_command

    if fmt and not capture:
        raise click.UsageError("--format flag requires --capture flag")
    p = merged_params(ctx, params)
    cfg, _ws, spec = _prepare(p)
    spec.kind = "run"
    with connect(cfg) as client:
        code = run_command(
            client,
            spec,
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
    cfg, _ws, spec = _prepare(p)
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
