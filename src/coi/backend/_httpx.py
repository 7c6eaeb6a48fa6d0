"""httpx, imported without its optional command line: import it from here, not directly."""

from __future__ import annotations

import sys
from types import ModuleType


def _without_cli() -> None:
    """httpx's package imports `httpx._main` whenever click is installed; that module then
    loads pygments (pytest brings it into the README's venv) before it finds rich missing:
    5-8 ms of every coi command went on a syntax highlighter (`python -X importtime`,
    docs/performance.md). A placeholder makes
    the import fail at once, as where the extra is missing (httpx then defines a `main` that
    says so), and is taken out again, so a later `import httpx._main` loads the real one."""
    placeholder = ModuleType("httpx._main")
    if sys.modules.setdefault("httpx._main", placeholder) is not placeholder:
        return
    try:
        import httpx  # noqa: F401
    finally:
        if sys.modules.get("httpx._main") is placeholder:
            del sys.modules["httpx._main"]


if "httpx" not in sys.modules:  # a program that loaded httpx before coi keeps its own
    _without_cli()

import httpx  # noqa: E402

__all__ = ["httpx"]
