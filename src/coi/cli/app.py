"""The root `coi` command: cobra-style help, lazily loaded sub-commands, default to `shell`."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import click

from coi.cli.options import session_options, shell_options

SHORT_HELP = "Code on Incus - Run AI coding tools in isolated Incus containers"
LONG_HELP = (
    "code-on-incus (coi) is a CLI tool for running AI coding assistants in Incus containers "
    "with your workspace mounted, your host credentials kept out, and the network restricted."
)
ROOT_EXAMPLES = """\
  coi setup                      # install and initialize the container daemon
  coi build                      # build the 'coi' agent image
  coi                            # start an agent session in the current folder
  coi run -- make test           # run one command in a fresh sandbox
  coi shell --resume             # continue this workspace's last conversation
  coi list                       # show running sessions"""

# name -> (module, attribute). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "shell": ("coi.cli.session_cmds", "shell_cmd"),
    "run": ("coi.cli.session_cmds", "run_cmd"),
    "setup": ("coi.cli.setup_cmd", "setup_cmd"),
    "health": ("coi.cli.health_cmd", "health_cmd"),
    "build": ("coi.cli.build_cmd", "build_cmd"),
    "config": ("coi.cli.config_cmd", "config_cmd"),
    "trust": ("coi.cli.trust_cmd", "trust_cmd"),
    "untrust": ("coi.cli.trust_cmd", "untrust_cmd"),
    "version": ("coi.cli.version_cmd", "version_cmd"),
    "list": ("coi.cli.lifecycle_cmds", "list_cmd"),
    "info": ("coi.cli.lifecycle_cmds", "info_cmd"),
    "attach": ("coi.cli.lifecycle_cmds", "attach_cmd"),
    "persist": ("coi.cli.lifecycle_cmds", "persist_cmd"),
    "shutdown": ("coi.cli.lifecycle_cmds", "shutdown_cmd"),
    "kill": ("coi.cli.lifecycle_cmds", "kill_cmd"),
    "clean": ("coi.cli.lifecycle_cmds", "clean_cmd"),
    "resume": ("coi.cli.lifecycle_cmds", "resume_cmd"),
    "alias": ("coi.cli.alias_cmd", "alias_cmd"),
    "monitor": ("coi.cli.monitor_cmd", "monitor_cmd"),
    "container": ("coi.cli.container_cmds", "container_cmd"),
    "file": ("coi.cli.file_cmds", "file_cmd"),
    "image": ("coi.cli.image_cmds", "image_cmd"),
    "images": ("coi.cli.image_cmds", "images_cmd"),
    "snapshot": ("coi.cli.snapshot_cmds", "snapshot_cmd"),
    "tmux": ("coi.cli.tmux_cmds", "tmux_cmd"),
    "completion": ("coi.cli.completion", "completion_cmd"),
    "mcp": ("coi.cli.mcp_cmd", "mcp_cmd"),
    "profile": ("coi.cli.profile_cmds", "profile_cmd"),
    "schema": ("coi.cli.profile_cmds", "schema_cmd"),
    "logs": ("coi.cli.logs_cmds", "logs_cmd"),
    "audit": ("coi.cli.logs_cmds", "audit_cmd"),
    "top": ("coi.cli.logs_cmds", "top_cmd"),
    "diff": ("coi.cli.review_cmds", "diff_cmd"),
    "apply": ("coi.cli.review_cmds", "apply_cmd"),
    "discard": ("coi.cli.review_cmds", "discard_cmd"),
    "review": ("coi.cli.review_cmds", "review_cmd"),
    "bench": ("coi.cli.bench_cmd", "bench_cmd"),
    "remote": ("coi.cli.remote_cmds", "remote_cmd"),
}
# Upstream 0.8+'s names for commands coi has under their 0.7 names: both work, the help lists
# the 0.7 name with the other beside it.
ALIASES: dict[str, str] = {"unfreeze": "resume"}


class CoiCommand(click.Command):
    """A command whose help reads like upstream's: Usage, Flags, Examples."""

    def __init__(self, *args: Any, examples: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.examples = examples

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_flags(self, ctx, formatter)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_examples(self.examples, formatter)
        super().format_epilog(ctx, formatter)


class CoiGroup(click.Group):
    """A group with cobra-style help and lazily imported sub-commands."""

    command_class = CoiCommand

    def __init__(
        self,
        *args: Any,
        lazy: dict[str, tuple[str, str]] | None = None,
        aliases: dict[str, str] | None = None,
        examples: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})
        self.aliases = dict(aliases or {})
        self.examples = examples

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd_name = self.aliases.get(cmd_name, cmd_name)
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name]
            cmd = getattr(importlib.import_module(module), attr)
            assert isinstance(cmd, click.Command)
            return with_global_options(cmd)
        found = super().get_command(ctx, cmd_name)
        return with_global_options(found) if found is not None else None

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if self.get_command(ctx, name) is None and not name.startswith("-"):
            raise click.UsageError(f'unknown command "{name}" for "{ctx.command_path}"', ctx)
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            also = [a for a, target in self.aliases.items() if target == name]
            label = f"{name} ({', '.join(also)})" if also else name
            rows.append((label, cmd.get_short_help_str(limit=70)))
        if rows:
            with formatter.section("Available Commands"):
                formatter.write_dl(rows)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_flags(self, ctx, formatter)
        self.format_commands(ctx, formatter)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_examples(self.examples, formatter)
        super().format_epilog(ctx, formatter)


def _set_env(var: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    def store(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        # Through the environment: the config loader gives it precedence over the files, and
        # the helper processes a session starts inherit it.
        if value:
            os.environ[var] = value

    return store


def global_options() -> list[click.Option]:
    """`--remote` and `--project`, accepted by every command (before or after its name)."""
    return [
        click.Option(
            ["--remote"],
            metavar="NAME",
            expose_value=False,
            is_eager=True,
            callback=_set_env("COI_REMOTE"),
            help="Daemon to use: a remote name ('coi remote list'), an https:// URL, or "
            "'local' (COI_REMOTE, [incus] remote).",
        ),
        click.Option(
            ["--project"],
            metavar="NAME",
            expose_value=False,
            is_eager=True,
            callback=_set_env("COI_PROJECT"),
            help="Incus project to work in (COI_PROJECT, [incus] project).",
        ),
    ]


def with_global_options(cmd: click.Command) -> click.Command:
    """Give `cmd` the global flags once (it may be asked for several times)."""
    have = {name for p in cmd.params for name in getattr(p, "opts", ())}
    for opt in global_options():
        if not have.intersection(opt.opts):
            cmd.params.append(opt)
    return cmd


def _format_flags(cmd: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    rows = [rv for p in cmd.get_params(ctx) if (rv := p.get_help_record(ctx)) is not None]
    if rows:
        with formatter.section("Flags"):
            formatter.write_dl(rows)


def _format_examples(examples: str | None, formatter: click.HelpFormatter) -> None:
    if examples:
        formatter.write_paragraph()
        formatter.write_text("Examples:")
        for line in examples.splitlines():
            formatter.write(line + "\n")


def usage_error_text(err: click.UsageError) -> str:
    """Upstream's wording: `Error: ...` then a pointer to help."""
    path = err.ctx.command_path if err.ctx else "coi"
    msg = err.format_message()
    if isinstance(err, click.NoSuchOption):
        # cobra's wording, which users' scripts grep for; click's hint is kept after it.
        hint = f" ({msg.split('. ', 1)[1].rstrip('.')})" if ". " in msg else ""
        msg = f"unknown flag: {err.option_name}{hint}"
    return f"Error: {msg}\nRun '{path} --help' for usage.\n"


@click.group(
    cls=CoiGroup,
    lazy=COMMANDS,
    aliases=ALIASES,
    invoke_without_command=True,
    help=f"{SHORT_HELP}\n\n{LONG_HELP}",
    short_help=SHORT_HELP,
    examples=ROOT_EXAMPLES,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--version", is_flag=True, help="Print the version and exit.")
@session_options
@shell_options
@click.pass_context
def cli(ctx: click.Context, /, version: bool, **params: Any) -> None:
    """Code on Incus."""
    if version:
        from coi import __version__

        click.echo(f"coi version {__version__}")
        ctx.exit(0)
    if ctx.invoked_subcommand is None:
        # Like upstream, a bare `coi` starts a shell session with the given flags.
        from coi.cli.session_cmds import run_shell

        ctx.exit(run_shell(ctx, params))
    ctx.obj = params


with_global_options(cli)
