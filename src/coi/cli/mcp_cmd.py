"""`coi mcp`: serve coi's sandboxes to an MCP client (Claude Code, codex, opencode) on stdio."""

from __future__ import annotations

from pathlib import Path

import click

from coi.cli.app import CoiCommand

MCP_EXAMPLES = """\
  coi mcp                         # workspaces: the current folder and below
  coi mcp --root ~/src            # any folder under ~/src
  claude mcp add coi -- coi mcp --root ~/src"""


@click.command("mcp", cls=CoiCommand, examples=MCP_EXAMPLES)
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Only folders inside this one may be workspaces (default: the current folder).",
)
def mcp_cmd(root: Path | None) -> None:
    """Serve sandboxes to an MCP client over stdin/stdout.

    The client (an agent) gets tools to make sandboxes, run commands and read and write
    files in them. Every sandbox obeys your coi config: a client may not loosen its network
    mode or limits, nor use a folder outside the root. Sandboxes go when the client
    disconnects. See docs/mcp.md.
    """
    from coi.mcp import serve

    serve(root)
