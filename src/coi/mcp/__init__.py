"""`coi mcp`: an MCP server (stdio) that lets an MCP client make and drive coi sandboxes.

The server lives in `coi.mcp.server` and is the only importer of the MCP library; the rules
for what a client may ask are in `coi.mcp.policy`. Importing this package loads neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn


def serve(root: str | Path | None = None) -> NoReturn:
    """Serve MCP on stdin/stdout with workspaces confined to `root` (default: the current
    folder); ends the process when the client goes or a signal comes.

    :raises UsageError: `root` is not a folder (before anything is served).
    """
    from coi.mcp.policy import check_root

    top = check_root(root if root is not None else Path.cwd())
    from coi.mcp.server import serve as run

    run(top)
