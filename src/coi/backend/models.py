"""Typed views of the daemon's JSON objects, parsed at the boundary and tolerant of new fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


@dataclass(frozen=True)
class ServerInfo:
    """What `GET /1.0` says about the daemon."""

    kind: str  # "incus" or "lxd"
    version: str
    api_extensions: frozenset[str]
    storage_driver: str
    firewall: str
    kernel_version: str
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, d: JSON) -> ServerInfo:
        env = d.get("environment") or {}
        return cls(
            kind=str(env.get("server") or "lxd"),
            version=str(env.get("server_version") or ""),
            api_extensions=frozenset(d.get("api_extensions") or ()),
            storage_driver=str(env.get("storage") or ""),
            firewall=str(env.get("firewall") or ""),
            kernel_version=str(env.get("kernel_version") or ""),
            raw=d,
        )

    def has(self, extension: str) -> bool:
        return extension in self.api_extensions

    @property
    def pid(self) -> int:
        """The daemon's process id (0: not said): another one means it restarted."""
        pid = (self.raw.get("environment") or {}).get("server_pid")
        return pid if isinstance(pid, int) else 0

    @property
    def clustered(self) -> bool:
        """Whether the daemon is a member of a cluster (it says so; never guessed from names)."""
        env = self.raw.get("environment") or {}
        return self.has("clustering") and env.get("server_clustered") is True

    @property
    def display_name(self) -> str:
        return ("Incus" if self.kind == "incus" else "LXD") + f" {self.version}"

    @property
    def idmapped_mounts(self) -> bool:
        """Whether the daemon's container runtime shifts ownership with idmapped mounts: a
        container then starts without its root filesystem re-owned, and host uid 0 can be
        mapped into it (LXD 5.0 reports the kernel's support but its LXC lacks it)."""
        env = self.raw.get("environment") or {}
        lxc = env.get("lxc_features") or {}
        kernel = env.get("kernel_features") or {}
        return lxc.get("idmapped_mounts_v2") == "true" and kernel.get("idmapped_mounts") == "true"


@dataclass(frozen=True)
class Instance:
    """An instance (container) as listed by the daemon."""

    name: str
    status: str  # Running, Stopped, Frozen, ...
    ephemeral: bool
    created_at: str
    config: Mapping[str, str]
    devices: Mapping[str, Mapping[str, str]]
    expanded_devices: Mapping[str, Mapping[str, str]]
    profiles: tuple[str, ...]
    description: str
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, d: JSON) -> Instance:
        return cls(
            name=d["name"],
            status=str(d.get("status") or ""),
            ephemeral=bool(d.get("ephemeral")),
            created_at=str(d.get("created_at") or ""),
            config=dict(d.get("config") or {}),
            devices={k: dict(v) for k, v in (d.get("devices") or {}).items()},
            expanded_devices={k: dict(v) for k, v in (d.get("expanded_devices") or {}).items()},
            profiles=tuple(d.get("profiles") or ()),
            description=str(d.get("description") or ""),
            raw=d,
        )

    @property
    def running(self) -> bool:
        return self.status == "Running"

    @property
    def location(self) -> str:
        """The cluster member it is on ('' off a cluster, where the daemon says "none")."""
        where = str(self.raw.get("location") or "")
        return "" if where == "none" else where

    @property
    def active(self) -> bool:
        """Running or frozen: it holds processes (and memory) until stopped."""
        return self.status in ("Running", "Frozen")

    @property
    def state(self) -> InstanceState | None:
        """The state embedded by `?recursion=2` listings, if present."""
        st = self.raw.get("state")
        return InstanceState.from_api(st) if isinstance(st, dict) else None


@dataclass(frozen=True)
class InstanceState:
    """Runtime state: status, init pid, process count, addresses, memory."""

    status: str
    pid: int
    processes: int
    memory_usage: int
    addresses: Mapping[str, tuple[tuple[str, str], ...]]  # nic -> ((family, address), ...)
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, d: JSON) -> InstanceState:
        nets = d.get("network") or {}
        addrs = {
            nic: tuple(
                (str(a.get("family")), str(a.get("address")))
                for a in (info.get("addresses") or ())
                if a.get("scope") == "global"
            )
            for nic, info in nets.items()
        }
        return cls(
            status=str(d.get("status") or ""),
            pid=int(d.get("pid") or 0),
            processes=int(d.get("processes") or 0),
            memory_usage=int((d.get("memory") or {}).get("usage") or 0),
            addresses=addrs,
            raw=d,
        )

    def ipv4(self, nic: str = "eth0") -> str | None:
        for family, addr in self.addresses.get(nic, ()):
            if family == "inet":
                return addr
        return None


@dataclass(frozen=True)
class Image:
    """A local image."""

    fingerprint: str
    aliases: tuple[str, ...]
    size: int
    created_at: str
    uploaded_at: str
    description: str
    properties: Mapping[str, str]
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_api(cls, d: JSON) -> Image:
        props = dict(d.get("properties") or {})
        return cls(
            fingerprint=str(d.get("fingerprint") or ""),
            aliases=tuple(a["name"] for a in (d.get("aliases") or ())),
            size=int(d.get("size") or 0),
            created_at=str(d.get("created_at") or ""),
            uploaded_at=str(d.get("uploaded_at") or ""),
            description=str(props.get("description") or ""),
            properties=props,
            raw=d,
        )


@dataclass(frozen=True)
class Snapshot:
    """An instance snapshot."""

    name: str
    created_at: str
    expires_at: str
    stateful: bool
    description: str

    @classmethod
    def from_api(cls, d: JSON) -> Snapshot:
        expires = str(d.get("expires_at") or "")
        if expires.startswith("0001-01-01"):
            expires = ""
        return cls(
            name=str(d["name"]).rsplit("/", 1)[-1],
            created_at=str(d.get("created_at") or ""),
            expires_at=expires,
            stateful=bool(d.get("stateful")),
            description=str(d.get("description") or ""),
        )


@dataclass(frozen=True)
class Network:
    """A daemon network (bridge)."""

    name: str
    type: str
    managed: bool
    config: Mapping[str, str]
    used_by: tuple[str, ...]
    description: str

    @classmethod
    def from_api(cls, d: JSON) -> Network:
        return cls(
            name=str(d["name"]),
            type=str(d.get("type") or ""),
            managed=bool(d.get("managed")),
            config=dict(d.get("config") or {}),
            used_by=tuple(d.get("used_by") or ()),
            description=str(d.get("description") or ""),
        )


@dataclass(frozen=True)
class NetworkACL:
    """A network ACL: ingress and egress rule lists."""

    name: str
    description: str
    egress: tuple[Mapping[str, str], ...]
    ingress: tuple[Mapping[str, str], ...]
    config: Mapping[str, str]
    used_by: tuple[str, ...]

    @classmethod
    def from_api(cls, d: JSON) -> NetworkACL:
        return cls(
            name=str(d["name"]),
            description=str(d.get("description") or ""),
            egress=tuple(dict(r) for r in (d.get("egress") or ())),
            ingress=tuple(dict(r) for r in (d.get("ingress") or ())),
            config=dict(d.get("config") or {}),
            used_by=tuple(d.get("used_by") or ()),
        )


@dataclass(frozen=True)
class StoragePool:
    """A storage pool."""

    name: str
    driver: str
    config: Mapping[str, str]
    status: str

    @classmethod
    def from_api(cls, d: JSON) -> StoragePool:
        return cls(
            name=str(d["name"]),
            driver=str(d.get("driver") or ""),
            config=dict(d.get("config") or {}),
            status=str(d.get("status") or ""),
        )


@dataclass(frozen=True)
class ExecResult:
    """Exit code and captured output of a command run in an instance."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0
