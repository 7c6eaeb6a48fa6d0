"""One look at a container for `coi monitor`: processes, connections, I/O, resources, threats."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from coi.backend.client import IncusClient
from coi.errors import SessionError
from coi.monitor import detect
from coi.monitor.collect import Collector, cgroup_dir
from coi.monitor.monitor import Settings


def snapshot(client: IncusClient, name: str, settings: Settings) -> dict[str, Any]:
    """Collect and judge once (no responses: this only looks)."""
    state = client.instances.state(name)
    if state.status != "Running" or not state.pid:
        raise SessionError(
            f"container '{name}' is {state.status.lower() or 'not running'}",
            resolution="Monitor a running container (coi list shows them).",
        )
    cgdir = cgroup_dir(client.project, name)
    errors: list[str] = []
    out: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "container": name,
    }
    if ip := state.ipv4():
        out["container_ip"] = ip
    threats: list[detect.Threat] = []
    if cgdir is None:
        errors.append("cgroup of the container not found: processes not available")
        procs_json: dict[str, Any] = {"available": False, "total_count": state.processes}
        net_json: dict[str, Any] = {"active_connections": 0, "connections": []}
        fs_json: dict[str, Any] = {"available": False}
    else:
        sweep = Collector(cgdir, state.pid).sweep()
        # One look judges commands and peers; rates (I/O, DNS, forks) need two looks.
        threats = detect.scan_processes(sweep.processes, settings.workspace)
        threats += [
            t for c in sweep.connections if (t := detect.suspicious_connection(c, settings.net))
        ]
        procs_json = {
            "available": True,
            "total_count": len(sweep.processes),
            "processes": [
                {
                    "pid": p.nspid,
                    "ppid": p.ppid,
                    "user": p.uid,
                    "command": p.cmdline,
                    "env_access": detect.env_scan(p) is not None,
                }
                for p in sorted(sweep.processes, key=lambda p: p.nspid)
            ],
        }
        conns = []
        for c in sweep.connections:
            t = detect.suspicious_connection(c, settings.net)
            item: dict[str, Any] = {
                "protocol": c.proto,
                "local_addr": c.local,
                "remote_addr": c.remote,
                "state": c.state,
                "uid": c.uid,
                "suspicious": t is not None,
            }
            if t:
                item["suspect_reason"] = t.title
            conns.append(item)
        net_json = {
            "active_connections": len(conns),
            "connections": conns,
            "suspicious_count": sum(1 for c in conns if c["suspicious"]),
        }
        readable = [p for p in sweep.processes if p.io_read >= 0]
        fs_json = {
            "available": bool(readable),
            "workspace_path": settings.workspace,
            "total_read_mb": round(sum(p.io_read for p in readable) / 1e6, 1),
            "total_write_mb": round(sum(p.io_write for p in readable) / 1e6, 1),
        }
        if len(readable) < len(sweep.processes):
            errors.append(
                f"I/O counters of {len(sweep.processes) - len(readable)} processes need root"
            )
    raw = state.raw
    cpu_ns = int((raw.get("cpu") or {}).get("usage") or 0)
    out.update(
        network=net_json,
        processes=procs_json,
        filesystem=fs_json,
        resources={
            "cpu_time_seconds": round(cpu_ns / 1e9, 2),
            "memory_mb": round(state.memory_usage / 2**20, 1),
            "processes": state.processes,
        },
        threats=[asdict(t) for t in threats],
    )
    if errors:
        out["errors"] = errors
    return out
