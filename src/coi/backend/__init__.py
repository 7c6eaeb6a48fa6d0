"""The Incus/LXD REST backend: a typed client that knows nothing of sessions or tools."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coi.backend.client import IncusClient
from coi.backend.connection import Endpoint
from coi.backend.models import (
    ExecResult,
    Image,
    Instance,
    InstanceState,
    Network,
    NetworkACL,
    ServerInfo,
    Snapshot,
    StoragePool,
)

if TYPE_CHECKING:
    from coi.backend.exec import ExecRequest, ExecSession

__all__ = [
    "Endpoint",
    "ExecRequest",
    "ExecResult",
    "ExecSession",
    "Image",
    "IncusClient",
    "Instance",
    "InstanceState",
    "Network",
    "NetworkACL",
    "ServerInfo",
    "Snapshot",
    "StoragePool",
]


def __getattr__(name: str) -> Any:
    # The exec API (4 ms to import) is loaded on first use: `coi list` and the other
    # commands that never run a command in a container do not pay for it.
    if name in ("ExecRequest", "ExecSession"):
        from coi.backend import exec as exec_api

        return getattr(exec_api, name)
    raise AttributeError(f"module 'coi.backend' has no attribute {name!r}")
