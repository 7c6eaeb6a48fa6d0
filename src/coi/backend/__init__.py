"""The Incus/LXD REST backend: a typed client that knows nothing of sessions or tools."""

from coi.backend.client import IncusClient
from coi.backend.connection import Endpoint
from coi.backend.exec import ExecRequest, ExecSession
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
