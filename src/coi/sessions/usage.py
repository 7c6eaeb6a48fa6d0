"""What each sandbox uses, from the daemon's state API (`coi top`), and log look-ups by name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coi.audit.log import audit_dir
from coi.audit.session_log import check_name, newest_for, sessions_dir
from coi.backend.client import IncusClient
from coi.errors import NotFound
from coi.sessions import naming
from coi.sessions.inventory import is_coi_name


@dataclass(frozen=True)
class Usage:
    """One sandbox at one moment, as the daemon's `/1.0/instances/NAME/state` says."""

    name: str
    status: str
    cpu_seconds: float  # cpu.usage (ns) in seconds: the total since start
    memory_bytes: int  # memory.usage
    memory_peak_bytes: int  # memory.usage_peak
    disk_bytes: int  # disk.root.usage (0 where the pool does not count it)
    net_rx_bytes: int  # the sum over the NICs but `lo`
    net_tx_bytes: int
    processes: int
    cpu_percent: float | None = None  # of one CPU, between two samples (None: one sample)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _usage(name: str, status: str, raw: Mapping[str, Any]) -> Usage:
    cpu = raw.get("cpu") or {}
    mem = raw.get("memory") or {}
    root = (raw.get("disk") or {}).get("root") or {}
    rx = tx = 0
    for nic, info in (raw.get("network") or {}).items():
        if nic == "lo":
            continue
        counters = (info or {}).get("counters") or {}
        rx += int(counters.get("bytes_received") or 0)
        tx += int(counters.get("bytes_sent") or 0)
    return Usage(
        name=name,
        status=status,
        cpu_seconds=int(cpu.get("usage") or 0) / 1e9,
        memory_bytes=int(mem.get("usage") or 0),
        memory_peak_bytes=int(mem.get("usage_peak") or 0),
        disk_bytes=int(root.get("usage") or 0),
        net_rx_bytes=rx,
        net_tx_bytes=tx,
        processes=int(raw.get("processes") or 0),
    )


def sample(client: IncusClient) -> list[Usage]:
    """coi's sandboxes (names with coi's prefix), with their state: one request."""
    out = []
    for inst in client.instances.list(with_state=True):
        if not is_coi_name(inst.name):
            continue
        raw = inst.state.raw if inst.state is not None else {}
        out.append(_usage(inst.name, inst.status, raw))
    return sorted(out, key=lambda u: u.name)


def with_rates(before: list[Usage], now: list[Usage], seconds: float) -> list[Usage]:
    """`now`, each with its CPU use in percent of one CPU since `before`."""
    prev = {u.name: u for u in before}
    out = []
    for u in now:
        p = prev.get(u.name)
        pct = None
        if p is not None and seconds > 0:
            pct = max(0.0, (u.cpu_seconds - p.cpu_seconds) / seconds * 100)
        out.append(Usage(**{**u.as_dict(), "cpu_percent": pct}))
    return out


def exists(client: IncusClient, name: str) -> bool:
    return client.instances.exists(name)


def log_target(
    client: IncusClient | None,
    name: str | None,
    workspace: str,
    *,
    audit: bool,
    env: Mapping[str, str] | None = None,
) -> tuple[str, Path]:
    """The container a `coi logs`/`coi audit` means and its log file.

    NAME: a container (gone or not: its log stays) or an alias of one that runs. No NAME:
    the workspace's newest log. `client` None: no daemon to ask (aliases not resolved).

    :raises NotFound: there is no log for it.
    """
    env = os.environ if env is None else env
    directory = audit_dir() if audit else sessions_dir()
    suffix = ".jsonl" if audit else ".log"
    if name:
        if not (directory / f"{check_name(name)}{suffix}").exists() and client is not None:
            from coi.sessions import aliases

            name = aliases.resolve(client, name)
        return name, directory / f"{check_name(name)}{suffix}"
    prefix = f"{naming.prefix(env)}{naming.workspace_hash(workspace)}-"
    found = newest_for(prefix, directory, suffix)
    if found is None:
        what = "audit log" if audit else "session log"
        raise NotFound(
            f"no {what} for this workspace ({workspace})",
            resolution="Name the container: 'coi list' shows them"
            + ("; the audit log is written by the monitor (--monitor)." if audit else "."),
        )
    return found.name.removesuffix(suffix), found
