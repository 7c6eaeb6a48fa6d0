"""Write docs/cli.md from the live command tree (`--check`: fail if it is out of date).

    .venv/bin/python scripts/cli_reference.py          # regenerate
    .venv/bin/python scripts/cli_reference.py --check  # CI: docs match `--help`
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from coi.cli.app import cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
HEADER = (
    "# CLI reference\n\n"
    "Generated from the command tree by `scripts/cli_reference.py`; a test fails when it\n"
    "differs from what `--help` prints. Do not edit by hand.\n"
)


def _walk(cmd: click.Command, ctx: click.Context) -> list[str]:
    out = [f"\n## `{ctx.command_path}`\n\n```\n{cmd.get_help(ctx).rstrip()}\n```\n"]
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += _walk(sub, click.Context(sub, info_name=name, parent=ctx,
                                                terminal_width=100, max_content_width=100))
    return out


def render() -> str:
    root = click.Context(cli, info_name="coi", terminal_width=100, max_content_width=100)
    return HEADER + "".join(_walk(cli, root))


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            sys.stderr.write("docs/cli.md is out of date: run scripts/cli_reference.py\n")
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
