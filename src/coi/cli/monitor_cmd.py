"""`coi monitor [NAME]`: what a container runs and connects to, and what looks like an attack."""

from __future__ import annotations

import time
from typing import Any

import click

from coi.cli.app import CoiCommand
from coi.cli.completion import complete_containers
from coi.cli.context import daemon
from coi.cli.render import echo_json

EXAMPLES = """\
  coi monitor coi-abc12345-1            # one look
  coi monitor coi-abc12345-1 --watch 2  # refresh every 2 s
  coi monitor --json | jq .threats      # for scripts (the workspace's container)"""

RULE = "━" * 70


def render(snap: dict[str, Any]) -> str:
    lines = [
        f"Container: {snap['container']}"
        + (f" ({snap['container_ip']})" if snap.get("container_ip") else "")
    ]
    lines += [f"Timestamp: {snap['timestamp']}", RULE]
    threats = snap["threats"]
    if threats:
        counts: dict[str, int] = {}
        for t in threats:
            counts[t["level"]] = counts.get(t["level"], 0) + 1
        order = ("critical", "high", "warning", "info")
        lines.append(
            "⚠ THREATS DETECTED: " + ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
        )
        for t in threats:
            lines += [f"  {t['level'].upper():<9} {t['title']}", f"    {t['description']}"]
        lines.append("")
    net = snap["network"]
    extra = f", {net.get('suspicious_count', 0)} suspicious" if net.get("suspicious_count") else ""
    lines.append(f"NETWORK ({net['active_connections']} active connections{extra})")
    if net["connections"]:
        lines.append(
            f"  {'Protocol':<9}{'Local Address':<24}{'Remote Address':<24}{'State':<13}Status"
        )
        for c in net["connections"]:
            status = "⚠ SUSPICIOUS" if c["suspicious"] else "✓ Normal"
            addrs = f"{c['local_addr']:<24}{c['remote_addr']:<24}"
            lines.append(f"  {c['protocol']:<9}{addrs}{c['state']:<13}{status}")
    else:
        lines.append("  No active connections")
    procs = snap["processes"]
    lines.append("")
    if procs["available"]:
        lines.append(f"PROCESSES ({procs['total_count']} running)")
        lines.append(f"  {'PID':<8}{'User':<10}{'Command':<42}Flags")
        for p in procs["processes"]:
            flag = "⚠ ENV SCAN" if p["env_access"] else ""
            lines.append(f"  {p['pid']:<8}{p['user']:<10}{p['command'][:40]:<42}{flag}")
    else:
        lines += ["PROCESSES", "  Not available"]
    fs = snap["filesystem"]
    lines.append("")
    lines.append("FILESYSTEM")
    if fs.get("available"):
        lines.append(
            f"  Reads:  {fs['total_read_mb']} MB total, writes: {fs['total_write_mb']} MB total"
        )
    else:
        lines.append("  Not available")
    res = snap["resources"]
    lines += [
        "",
        "RESOURCES",
        f"  CPU: {res['cpu_time_seconds']}s total",
        f"  Memory:  {res['memory_mb']} MB",
    ]
    if snap.get("errors"):
        lines += ["", "ERRORS", *(f"  {e}" for e in snap["errors"])]
    return "\n".join(lines)


@click.command("monitor", cls=CoiCommand, examples=EXAMPLES)
@click.argument("name", required=False, shell_complete=complete_containers)
@click.option("--json", "as_json", is_flag=True, help="One snapshot as JSON.")
@click.option("--watch", type=int, default=0, metavar="N", help="Refresh every N seconds.")
@click.option("-w", "--workspace", default=None, metavar="DIR", help="Workspace (no NAME given).")
def monitor_cmd(name: str | None, as_json: bool, watch: int, workspace: str | None) -> None:
    """Show a container's processes, connections and threats, read from the host."""
    from coi.errors import UsageError
    from coi.monitor.monitor import Settings, context_of
    from coi.monitor.snapshot import snapshot
    from coi.sessions.inventory import resolve_container
    from coi.sessions.workspace import resolve_workspace

    if as_json and watch:
        raise UsageError("--json cannot be combined with --watch", resolution="Use one of them.")
    if watch < 0:
        raise UsageError("--watch takes a number of seconds, 1 or more")
    cfg, client = daemon()
    with client:
        name = resolve_container(client, name, str(resolve_workspace(workspace)))
        click.echo(f"Monitoring container: {name}", err=True)
        settings = Settings.from_config(cfg)
        settings.net = context_of(client, name)  # judge peers by this sandbox's own policy
        if as_json:
            echo_json(snapshot(client, name, settings))
            return
        while True:
            text = render(snapshot(client, name, settings))
            if not watch:
                click.echo(text)
                return
            click.echo("\x1b[2J\x1b[H" + text)
            click.echo(
                f"\nLast Updated: {time.strftime('%Y-%m-%d %H:%M:%S')} | Press Ctrl+C to exit"
            )
            time.sleep(watch)
