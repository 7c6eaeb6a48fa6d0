"""Find tools by name: the built-in ones, then plugins from the `coi.tools` entry points."""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

from coi.errors import UsageError
from coi.tools.base import Tool

BUILTIN = ("claude", "opencode", "aider", "codex", "gemini")
ENTRY_POINT_GROUP = "coi.tools"


@cache
def all_tools() -> dict[str, Tool]:
    """Every known tool by name. A plugin's entry point names a Tool object."""
    tools: dict[str, Tool] = {}
    for name in BUILTIN:
        tool = importlib.import_module(f"coi.tools.builtin.{name}").TOOL
        tools[tool.name] = tool
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, Tool):
            tools.setdefault(obj.name, obj)
    return tools


def get_tool(name: str) -> Tool:
    """:raises UsageError: no tool has that name."""
    tools = all_tools()
    if name not in tools:
        raise UsageError(
            f"unknown tool: {name} (supported: {', '.join(tools)})",
            resolution="Pick one with --tool or [tool] name, or install its plugin.",
        )
    return tools[name]
