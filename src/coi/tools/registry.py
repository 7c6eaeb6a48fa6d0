"""Find tools by name: the built-in ones, then plugins from the `coi.tools` entry points."""

from __future__ import annotations

import importlib
from functools import cache

from coi.errors import UsageError
from coi.tools.base import Tool

BUILTIN = ("claude", "opencode", "aider", "codex", "gemini")
ENTRY_POINT_GROUP = "coi.tools"


@cache
def all_tools() -> dict[str, Tool]:
    """Every known tool by name. A plugin's entry point names a Tool object."""
    # Here, not at the top: scanning the installed packages costs a session 7 ms of CPU, and
    # a session with a built-in tool needs no plugin.
    from importlib.metadata import entry_points

    tools: dict[str, Tool] = {t.name: t for t in map(_builtin, BUILTIN)}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, Tool):
            tools.setdefault(obj.name, obj)
    return tools


def _builtin(name: str) -> Tool:
    tool: Tool = importlib.import_module(f"coi.tools.builtin.{name}").TOOL
    return tool


def get_tool(name: str) -> Tool:
    """:raises UsageError: no tool has that name."""
    if name in BUILTIN:  # built-ins win over plugins of the same name
        return _builtin(name)
    tools = all_tools()
    if name not in tools:
        raise UsageError(
            f"unknown tool: {name} (supported: {', '.join(tools)})",
            resolution="Pick one with --tool or [tool] name, or install its plugin.",
        )
    return tools[name]
