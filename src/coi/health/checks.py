"""Health checks: is the daemon, its storage, network and images ready for coi sessions."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coi.backend.client import IncusClient
from coi.backend.models import StoragePool
from coi.config.loader import Config
from coi.config.paths import coi_home
from coi.errors import CoiError

OK, WARNING, FAILED = "ok", "warning", "failed"
CATEGORIES = ("SYSTEM", "CRITICAL", "NETWORKING", "STORAGE", "CONFIGURATION", "STATUS")


@dataclass
class Check:
    """The result of one check."""

    key: str
    name: str
    category: str
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class HealthReport:
    """All checks, the overall status and what the daemon is."""

    checks: list[Check]
    backend: dict[str, Any]

    @property
    def status(self) -> str:
        if any(c.status == FAILED for c in self.checks):
            return "unhealthy"
        if any(c.status == WARNING for c in self.checks):
            return "degraded"
        return "healthy"

    @property
    def exit_code(self) -> int:
        return {"healthy": 0, "degraded": 1, "unhealthy": 2}[self.status]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "backend": self.backend,
            "checks": {
                c.key: {
                    "name": c.name,
                    "status": c.status,
                    "message": c.message,
                    **({"details": c.details} if c.details else {}),
                }
                for c in self.checks
            },
            "summary": {
                "total": len(self.checks),
                "passed": sum(c.status == OK for c in self.checks),
                "warnings": sum(c.status == WARNING for c in self.checks),
                "failed": sum(c.status == FAILED for c in self.checks),
            },
        }


def _system_checks() -> list[Check]:
    os_name = "Linux"
    rel = Path("/etc/os-release")
    if rel.exists():
        for line in rel.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    checks = [
        Check(
            "os",
            "Operating system",
            "SYSTEM",
            OK,
            f"{os_name} ({platform.system().lower()}/{platform.machine()})",
        )
    ]
    checks.append(Check("kernel_version", "Kernel", "SYSTEM", OK, platform.release()))
    return checks


def run_checks(cfg: Config, connect: Callable[[], IncusClient]) -> HealthReport:
    """Run every check; none raises: failures become failed checks."""
    checks = _system_checks()
    backend: dict[str, Any] = {}
    try:
        client = connect()
        info = client.server
    except CoiError as err:
        checks.append(
            Check(
                "incus",
                "Incus",
                "CRITICAL",
                FAILED,
                err.message,
                {"resolution": err.resolution} if err.resolution else {},
            )
        )
        checks += _local_checks(cfg)
        return HealthReport(checks, backend)
    with client:
        backend = {
            "kind": info.kind,
            "version": info.version,
            "socket": client.endpoint.describe(),
            "api_extensions": len(info.api_extensions),
            "project": client.project,
        }
        checks.append(
            Check(
                "incus",
                "Incus",
                "CRITICAL",
                OK,
                f"{info.display_name} running",
                {"socket": client.endpoint.describe()},
            )
        )
        checks.append(
            Check(
                "permissions",
                "Permissions",
                "CRITICAL",
                OK,
                f"uid {os.getuid()} may use {client.endpoint.describe()}",
            )
        )
        if info.clustered:
            backend["clustered"] = True
            checks.append(_cluster(client))
        checks += _daemon_checks(cfg, client, backend)
    checks += _local_checks(cfg)
    return HealthReport(checks, backend)


def _cluster(client: IncusClient) -> Check:
    """The members of the daemon's cluster and their status, as the cluster says."""
    try:
        members = client.get("/1.0/cluster/members", recursion=1) or []
    except CoiError as err:
        return Check(
            "cluster", "Cluster", "CRITICAL", WARNING, f"members not listed: {err.message}"
        )
    return cluster_check(members)


def cluster_check(members: list[dict[str, Any]]) -> Check:
    """Judge the cluster's members (`GET /1.0/cluster/members?recursion=1`): each one not
    online (offline, evacuated, blocked) is a warning, as new sandboxes cannot be placed
    there and those on it do not run or answer."""
    rows = [
        {
            "name": str(m.get("server_name") or "?"),
            "status": str(m.get("status") or "unknown").lower(),
            "message": str(m.get("message") or ""),
        }
        for m in members
    ]
    rows.sort(key=lambda r: r["name"])
    down = [r for r in rows if r["status"] != "online"]
    details: dict[str, Any] = {"members": rows}
    if not rows:
        return Check("cluster", "Cluster", "CRITICAL", WARNING, "no members listed", details)
    if not down:
        names = ", ".join(r["name"] for r in rows)
        return Check("cluster", "Cluster", "CRITICAL", OK, f"{len(rows)} members online: {names}",
                     details)  # fmt: skip
    said = "; ".join(
        f"{r['name']} {r['status']}" + (f" ({r['message']})" if r["message"] else "") for r in down
    )
    up = [r["name"] for r in rows if r["status"] == "online"]
    fixes = []
    evacuated = [r["name"] for r in down if r["status"] == "evacuated"]
    if evacuated:
        fixes.append(
            ", ".join(f"'incus cluster restore {n}'" for n in evacuated)
            + (" brings it back" if len(evacuated) == 1 else " bring them back")
        )
    if any(r["status"] != "evacuated" for r in down):
        fixes.append("check that the member's daemon runs and reaches the others")
    fix = "; ".join(fixes)
    on = f" ({', '.join(up)})" if up else ""
    details["resolution"] = f"{fix[0].upper()}{fix[1:]}. Until then, --target a member online{on}."
    return Check(
        "cluster", "Cluster", "CRITICAL", WARNING,
        f"{said}; {len(up)} of {len(rows)} members online", details,
    )  # fmt: skip


def _daemon_checks(cfg: Config, client: IncusClient, backend: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    pool_name = cfg.get_str("incus.pool")
    try:
        pool = client.networks.pool(pool_name)
    except CoiError as err:
        pool = None
        checks.append(Check("storage_pool", "Storage pool", "STORAGE", FAILED, err.message))
    if pool is None and not checks:
        checks.append(
            Check(
                "storage_pool",
                "Storage pool",
                "STORAGE",
                FAILED,
                f"pool '{pool_name}' does not exist",
                {"resolution": "Run 'coi setup'."},
            )
        )
    elif pool is not None:
        backend["storage_pool"] = pool.name
        backend["storage_driver"] = pool.driver
        status = OK if pool.driver in ("btrfs", "zfs") else WARNING
        msg = f"'{pool.name}' ({pool.driver})" + (
            "" if status == OK else ": instance creation is slow; btrfs is 10x faster"
        )
        checks.append(
            Check("storage_pool", "Storage pool", "STORAGE", status, msg, {"driver": pool.driver})
        )
    net_name = cfg.get_str("incus.network")
    net = client.networks.get(net_name)
    if net is None:
        checks.append(
            Check(
                "network_bridge",
                "Network bridge",
                "NETWORKING",
                FAILED,
                f"bridge '{net_name}' does not exist",
                {"resolution": "Run 'coi setup'."},
            )
        )
    else:
        backend["bridge"] = net.name
        backend["bridge_ipv4"] = net.config.get("ipv4.address", "")
        checks.append(
            Check(
                "network_bridge",
                "Network bridge",
                "NETWORKING",
                OK,
                f"'{net.name}' {net.config.get('ipv4.address', '')}",
            )
        )
    fwd = Path("/proc/sys/net/ipv4/ip_forward")
    remote = not client.endpoint.is_local
    if remote:
        checks.append(Check("ip_forwarding", "IP forwarding", "NETWORKING", OK, ON_THE_SERVER))
    elif fwd.exists():
        on = fwd.read_text().strip() == "1"
        checks.append(
            Check(
                "ip_forwarding",
                "IP forwarding",
                "NETWORKING",
                OK if on else WARNING,
                "enabled" if on else "disabled: containers cannot reach the internet",
            )
        )
    image = cfg.get_str("defaults.image")
    img = client.images.by_alias(image)
    if img is None:
        checks.append(
            Check(
                "image",
                "Default image",
                "CONFIGURATION",
                WARNING,
                f"image '{image}' not built",
                {"resolution": "Run 'coi build'."},
            )
        )
    else:
        checks.append(
            Check(
                "image",
                "Default image",
                "CONFIGURATION",
                OK,
                f"'{image}' ({img.fingerprint[:12]}, {img.size / 1e6:.0f} MB)",
            )
        )
    checks.append(_network_restriction(cfg, client))
    if remote:
        # Settings of the server's own machine; the workspace travels as a copy there.
        checks.append(Check("root_workspaces", "Root's folders", "SYSTEM", OK, ON_THE_SERVER))
        checks.append(Check("echo_limit", "Echo rate limit", "NETWORKING", OK, ON_THE_SERVER))
    else:
        checks.append(_root_workspaces(client, pool))
        checks.append(_echo_limit())
    prefix = os.environ.get("COI_CONTAINER_PREFIX", "coi-")
    running = [i for i in client.instances.list() if i.name.startswith(prefix) and i.running]
    checks.append(
        Check(
            "active_containers",
            "Containers",
            "STATUS",
            OK,
            f"{len(running)} running",
            {"names": [i.name for i in running]},
        )
    )
    return checks


ON_THE_SERVER = "not checked: a setting of the remote daemon's machine (run coi health there)"


def _echo_limit() -> Check:
    """The host's rate limit on ICMP echo out of sandboxes (gone after a reboot)."""
    from coi.network import echolimit

    found = echolimit.installed()
    if found is None:
        return Check(
            "echo_limit", "Echo rate limit", "NETWORKING", OK,
            "not checked (only root may read the host's firewall)",
        )  # fmt: skip
    if found:
        return Check("echo_limit", "Echo rate limit", "NETWORKING", OK, echolimit.RATE)
    return Check(
        "echo_limit", "Echo rate limit", "NETWORKING", WARNING,
        "missing: ICMP echo out of sandboxes is not rate-limited (the table goes at a reboot)",
        {"resolution": "Run 'sudo coi setup'."},
    )  # fmt: skip


def _root_workspaces(client: IncusClient, pool: StoragePool | None) -> Check:
    """Can root's own folders be workspaces (host root mapped to the agent's uid)?"""
    from coi.sessions.workspace import can_map_root, root_mapping_problem

    can_map = can_map_root(pool.config if pool else {}, client.server.idmapped_mounts)
    problem = root_mapping_problem(can_map, local=client.endpoint.is_local)
    details = {"idmapped_mounts": client.server.idmapped_mounts, "can_map_root": can_map}
    if problem is None:
        return Check(
            "root_workspaces", "Root's folders", "SYSTEM", OK,
            "mapped to the agent's uid (files it writes there stay root's)", details,
        )  # fmt: skip
    # Only a warning for whom it concerns: root running coi.
    status = WARNING if os.geteuid() == 0 else OK
    return Check(
        "root_workspaces", "Root's folders", "SYSTEM", status,
        f"refused as workspaces: {problem}",
        {**details, "resolution": "Run coi as a regular user, or 'sudo coi setup' on Incus."},
    )  # fmt: skip


def _network_restriction(cfg: Config, client: IncusClient) -> Check:
    """The session start proof, run for real: a throw-away sandbox with the configured policy
    must reach the bridge's DNS and must not reach a listener on the host."""
    import secrets

    from coi.network.manager import ensure_network, policy_from_config, prove_enforced

    def check(status: str, msg: str, **details: Any) -> Check:
        return Check("network_restriction", "Network policy", "NETWORKING", status, msg, details)

    try:
        policy, _ = policy_from_config(cfg, cache_dir=coi_home() / "network-cache")
    except CoiError as err:
        return check(FAILED, err.message)
    if policy.mode == "open":
        return check(OK, "mode open: nothing to enforce")
    if not client.images.exists("coi-tiny"):
        return check(WARNING, "cannot verify: image 'coi-tiny' missing", resolution="coi setup")
    name = f"coi-health-{secrets.token_hex(3)}"
    try:
        network, _ = ensure_network(
            client,
            policy,
            default_network=cfg.get_str("incus.network"),
            lock_dir=coi_home() / "locks",
            log=lambda _m: None,
        )
        client.instances.create(
            name,
            image="coi-tiny",
            devices={
                "root": {"type": "disk", "path": "/", "pool": cfg.get_str("incus.pool")},
                "eth0": {"type": "nic", "network": network, "name": "eth0"},
            },
            ephemeral=True,
            start=True,
        )
        remote = not client.endpoint.is_local
        prove_enforced(client, name, network, lambda _m: None, remote=remote)
    except CoiError as err:
        return check(FAILED, err.message, resolution=err.resolution or "")
    finally:
        try:
            client.instances.delete(name, force=True)
        except CoiError:
            pass
    if remote:
        return check(
            OK,
            f"{policy.mode}: {network} made by the remote daemon, its DNS reached from a "
            "sandbox (that the server itself is blocked cannot be proven from here)",
        )
    return check(OK, f"{policy.mode} in force on {network} (verified from a sandbox)")


def _local_checks(cfg: Config) -> list[Check]:
    checks = [
        Check(
            "config",
            "Config loaded",
            "CONFIGURATION",
            OK,
            ", ".join(str(f) for f in cfg.files_read) or "defaults only",
        )
    ]
    home = coi_home()
    checks.append(Check("coi_directory", "COI directory", "CONFIGURATION", OK, str(home)))
    free = shutil.disk_usage(home if home.exists() else Path.home()).free / 2**30
    checks.append(
        Check(
            "disk_space",
            "Disk space",
            "STORAGE",
            OK if free > 5 else WARNING,
            f"{free:.1f} GiB free",
        )
    )
    sessions = sum(1 for d in home.glob("sessions-*/*") if d.is_dir()) if home.exists() else 0
    checks.append(Check("saved_sessions", "Saved sessions", "STATUS", OK, f"{sessions} saved"))
    checks.append(_credentials(cfg))
    return checks


def _credentials(cfg: Config) -> Check:
    """What the configured tool's sessions do with its credentials (docs/credentials.md)."""
    from coi.credentials import plan
    from coi.tools.registry import get_tool

    try:
        tool = get_tool(cfg.get_str("tool.name"))
        p = plan(tool, cfg, local=not cfg.get_str("incus.remote"), run_command=False)
    except CoiError as err:
        return Check(
            "credentials", "Credentials", "CONFIGURATION", FAILED, err.message,
            {"resolution": err.resolution} if err.resolution else {},
        )  # fmt: skip
    return Check(
        "credentials", "Credentials", "CONFIGURATION", OK, f"{tool.name}: {p.summary}",
        {"mode": p.mode, "providers": [b.provider.name for b in p.brokered]},
    )  # fmt: skip


def render_text(report: HealthReport) -> str:
    """Upstream's layout: categories, `  [OK]   Name : message`, then STATUS."""
    lines = ["Code on Incus Health Check", "==========================", ""]
    for cat in CATEGORIES:
        rows = [c for c in report.checks if c.category == cat]
        if not rows:
            continue
        lines.append(f"{cat}:")
        for c in rows:
            tag = {"ok": "[OK]", "warning": "[WARN]", "failed": "[FAIL]"}[c.status]
            lines.append(f"  {tag:<6} {c.name:<18}: {c.message}")
            if c.status != OK and c.details.get("resolution"):
                lines.append(f"         {'':<18}  -> {c.details['resolution']}")
        lines.append("")
    total = len(report.checks)
    warn = sum(c.status == WARNING for c in report.checks)
    fail = sum(c.status == FAILED for c in report.checks)
    lines.append(f"STATUS: {report.status.upper()}")
    if fail:
        lines.append(f"{fail} of {total} checks failed" + (f", {warn} warnings" if warn else ""))
    elif warn:
        lines.append(f"{total} checks passed with {warn} warnings")
    else:
        lines.append(f"All {total} checks passed")
    return "\n".join(lines)
