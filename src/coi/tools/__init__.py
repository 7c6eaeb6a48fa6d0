"""Agent tools: what each CLI needs to start, resume and keep its state."""

from coi.tools.base import Tool
from coi.tools.registry import all_tools, get_tool

__all__ = ["Tool", "all_tools", "get_tool"]
