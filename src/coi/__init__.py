"""coi: run AI coding agents in isolated Incus system containers; the public Python API.

Everything a program may use is named in `__all__` (see docs/sdk.md); the rest of the
package is coi's own and may change. The names are loaded on first use, so `coi --version`
and the command line do not pay for what they do not touch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
PROJECT_URL = "https://github.com/mensfeld/code-on-incus"

if TYPE_CHECKING:
    from coi.config.schema import NetworkMode
    from coi.errors import (
        BackendError,
        CoiError,
        ConfigError,
        Conflict,
        DaemonUnreachable,
        IncusTimeout,
        NotFound,
        OperationFailed,
        PermissionDenied,
        SessionError,
        UsageError,
    )
    from coi.sdk import Client, FileEntry, Output, Result, Sandbox, Stream, connect
    from coi.sessions.inventory import ContainerInfo

# public name -> the module that defines it
_WHERE = {
    "connect": "coi.sdk",
    "Client": "coi.sdk",
    "Sandbox": "coi.sdk",
    "Result": "coi.sdk",
    "Output": "coi.sdk",
    "Stream": "coi.sdk",
    "FileEntry": "coi.sdk",
    "ContainerInfo": "coi.sessions.inventory",
    "NetworkMode": "coi.config.schema",
    "CoiError": "coi.errors",
    "UsageError": "coi.errors",
    "ConfigError": "coi.errors",
    "SessionError": "coi.errors",
    "BackendError": "coi.errors",
    "DaemonUnreachable": "coi.errors",
    "PermissionDenied": "coi.errors",
    "NotFound": "coi.errors",
    "Conflict": "coi.errors",
    "OperationFailed": "coi.errors",
    "IncusTimeout": "coi.errors",
}

__all__ = [
    "BackendError",
    "Client",
    "CoiError",
    "ConfigError",
    "Conflict",
    "ContainerInfo",
    "DaemonUnreachable",
    "FileEntry",
    "IncusTimeout",
    "NetworkMode",
    "NotFound",
    "OperationFailed",
    "Output",
    "PermissionDenied",
    "Result",
    "Sandbox",
    "SessionError",
    "Stream",
    "UsageError",
    "__version__",
    "connect",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'coi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
