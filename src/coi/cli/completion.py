"""Shell completion: `coi completion bash|zsh|fish|powershell`, and the values it completes."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click
from click.shell_completion import (
    CompletionItem,
    ShellComplete,
    add_completion_class,
    get_completion_class,
    split_arg_string,
)

from coi.cli.app import CoiCommand

SHELLS = ("bash", "zsh", "fish", "powershell")


class PowerShellComplete(ShellComplete):
    """PowerShell, which click does not ship and upstream (cobra) does: the script asks coi
    for the values of the word being typed and offers them."""

    name = "powershell"
    source_template = r"""Register-ArgumentCompleter -Native -CommandName %(prog_name)s `
  -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)
    $env:COMP_WORDS = $commandAst.ToString()
    $env:COMP_CWORD = $wordToComplete
    $env:%(complete_var)s = "powershell_complete"
    %(prog_name)s | ForEach-Object {
        [System.Management.Automation.CompletionResult]::new($_, $_, 'ParameterValue', $_)
    }
    Remove-Item Env:%(complete_var)s, Env:COMP_WORDS, Env:COMP_CWORD
}
"""

    def get_completion_args(self) -> tuple[list[str], str]:
        words = split_arg_string(os.environ.get("COMP_WORDS", ""))
        incomplete = os.environ.get("COMP_CWORD", "")
        args = words[1:]
        if incomplete and args and args[-1] == incomplete:
            args = args[:-1]
        return args, incomplete

    def format_completion(self, item: CompletionItem) -> str:
        return str(item.value)


add_completion_class(PowerShellComplete)


def _safely(fetch: Callable[[], list[str]], incomplete: str) -> list[CompletionItem]:
    # A completion must never print an error into the user's prompt: no daemon, no values.
    try:
        values = fetch()
    except Exception:
        return []
    return [CompletionItem(v) for v in sorted(values) if v.startswith(incomplete)]


def _container_names() -> list[str]:
    from coi.cli.context import connect, load_settings
    from coi.sessions import containers

    with connect(load_settings()) as client:
        return containers.names(client, coi_only=True)


def _all_container_names() -> list[str]:
    from coi.cli.context import connect, load_settings
    from coi.sessions import containers

    with connect(load_settings()) as client:
        return containers.names(client)


def _session_ids() -> list[str]:
    from coi.config.paths import coi_home
    from coi.sessions.inventory import saved_sessions

    return [s.id for s in saved_sessions(coi_home(), {})]


def _image_aliases() -> list[str]:
    from coi.cli.context import connect, load_settings
    from coi.images import manage

    with connect(load_settings()) as client:
        return manage.aliases(client)


def _completer(fetch: Callable[[], list[str]]) -> Callable[..., list[CompletionItem]]:
    """A click `shell_complete` callback offering what `fetch` returns."""

    def complete(
        _ctx: click.Context, _param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        return _safely(fetch, incomplete)

    return complete


complete_containers = _completer(_container_names)
complete_any_container = _completer(_all_container_names)
complete_sessions = _completer(_session_ids)
complete_images = _completer(_image_aliases)


COMPLETION_HELP = """Print a completion script for your shell.

\b
Load it for the current shell:
  bash:  source <(coi completion bash)
  zsh:   source <(coi completion zsh)
  fish:  coi completion fish | source
  powershell:  coi completion powershell | Out-String | Invoke-Expression
\b
Or install it for good:
  bash:  coi completion bash > ~/.local/share/bash-completion/completions/coi
  zsh:   coi completion zsh > "${fpath[1]}/_coi"
  fish:  coi completion fish > ~/.config/fish/completions/coi.fish"""


@click.command(
    "completion",
    cls=CoiCommand,
    help=COMPLETION_HELP,
    short_help="Print a shell completion script (bash, zsh, fish, powershell).",
    examples="  source <(coi completion bash)",
)
@click.argument("shell", type=click.Choice(SHELLS))
def completion_cmd(shell: str) -> None:
    from coi.cli.app import cli

    cls: Any = get_completion_class(shell)
    click.echo(cls(cli, {}, "coi", "_COI_COMPLETE").source(), nl=False)
