"""Find tools by name: the built-in ones, then plugins from the `coi.tools` entry points.

A built-in tool is a module of `coi.tools.builtin` named after the tool, whose `TOOL` is a
`Tool`; the modules are found by scanning the package, so adding a tool is adding a file.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

from coi.errors import UsageError
from coi.tools.base import Tool

if TYPE_CHECKING:
    from collections.abc import Iterable

BUILTIN_PACKAGE = "coi.tools.builtin"
ENTRY_POINT_GROUP = "coi.tools"
# `[build] tools` entry that stands for every built-in tool marked for the default image.
DEFAULT_BUILD = "default"


def discover(package: str) -> dict[str, Tool]:
    """The tools in `package`: each module (not starting with "_") whose `TOOL` is a Tool,
    by tool name, in module-name order."""
    # Here, not at the top: pkgutil costs a session ~1 ms and get_tool() does not need it.
    import pkgutil

    pkg = importlib.import_module(package)
    tools: dict[str, Tool] = {}
    for mod in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        if mod.ispkg or mod.name.rpartition(".")[2].startswith("_"):
            continue
        tool = getattr(importlib.import_module(mod.name), "TOOL", None)
        if isinstance(tool, Tool):
            tools.setdefault(tool.name, tool)
    return tools


@cache
def builtin_tools() -> dict[str, Tool]:
    """The tools that ship with coi (every module of coi.tools.builtin is imported)."""
    return discover(BUILTIN_PACKAGE)


@cache
def all_tools() -> dict[str, Tool]:
    """Every known tool by name. A plugin's entry point names a Tool object."""
    # Here, not at the top: scanning the installed packages costs a session 7 ms of CPU, and
    # a session with a built-in tool needs no plugin.
    from importlib.metadata import entry_points

    tools = dict(builtin_tools())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, Tool):
            tools.setdefault(obj.name, obj)
    return tools


def _builtin(name: str) -> Tool | None:
    """The built-in tool `name`, importing its module alone (the path of every session)."""
    if not name.isidentifier() or name.startswith("_"):
        return None
    module = f"{BUILTIN_PACKAGE}.{name}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            return None
        raise
    tool = getattr(mod, "TOOL", None)
    return tool if isinstance(tool, Tool) and tool.name == name else None


def find_tool(name: str) -> Tool | None:
    """The tool called `name`, or None. Built-ins win over plugins of the same name."""
    return _builtin(name) or all_tools().get(name)


def get_tool(name: str) -> Tool:
    """:raises UsageError: no tool has that name."""
    tool = find_tool(name)
    if tool is None:
        raise UsageError(
            f"unknown tool: {name} (supported: {', '.join(all_tools())})",
            resolution="Pick one with --tool or [tool] name, or install its plugin.",
        )
    return tool


def default_build_tools() -> list[str]:
    """The built-in tools the `coi` image carries unless `[build] tools` names others."""
    return [n for n, t in builtin_tools().items() if t.install and t.install.default]


def build_tools(requested: Iterable[str], required: str = "") -> list[str]:
    """What `coi build` installs: `requested` (`[build] tools`) with "default" (or nothing at
    all) standing for `default_build_tools()`, then the configured tool `required` when it is
    not among them and coi knows how to install it; each once, in that order."""
    out: list[str] = []
    for name in list(requested) or [DEFAULT_BUILD]:
        for n in default_build_tools() if name == DEFAULT_BUILD else [name]:
            if n and n not in out:
                out.append(n)
    if required and required not in out:
        tool = find_tool(required)
        if tool is not None and tool.install is not None:
            out.append(required)
    return out


def install_recipes(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """The install recipe of each named tool coi knows how to install (see Install.recipe)."""
    recipes: dict[str, dict[str, str]] = {}
    for name in names:
        tool = find_tool(name)
        if tool is not None and tool.install is not None:
            recipes[name] = tool.install.recipe(tool.binary)
    return recipes
