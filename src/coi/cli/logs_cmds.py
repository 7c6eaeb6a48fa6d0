"""`coi logs`, `coi audit` and `coi top`: a session's own log, the monitor's events, usage."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from coi.cli.app import CoiCommand
from coi.cli.completion import complete_containers
from coi.cli.render import echo_json
from coi.units import binary_text

LOGS_EXAMPLES = """\
  coi logs                      # this workspace's newest session
  coi logs coi-abc12345-1 -f    # follow a live session until it ends
  coi logs --format json | jq ."""

AUDIT_EXAMPLES = """\
  coi audit                     # the monitor's events for this workspace's newest sandbox
  coi audit coi-abc12345-1 -f   # follow them
  coi audit --format json --level high"""

TOP_EXAMPLES = """\
  coi top                       # refreshing, every 2 s
  coi top --format json         # one sample for scripts"""

_LEVELS = ("info", "warning", "high", "critical")


def _when(stamp: str) -> str:
    return stamp.replace("T", " ")[:23] if stamp else "?"


def _log_line(rec: dict[str, Any]) -> str:
    return f"{_when(str(rec.get('time', '')))}  {rec.get('event', '?'):<7} {rec.get('text', '')}"


def _audit_line(rec: dict[str, Any]) -> str:
    level = str(rec.get("level", "?")).upper()
    head = f"{_when(str(rec.get('timestamp', '')))}  {level:<8} {rec.get('title', '')}"
    action = rec.get("action")
    tail = f"  [{action}]" if action and action != "logged" else ""
    desc = rec.get("description")
    return head + tail + (f"\n    {desc}" if desc else "")


def _target(name: str | None, workspace: str | None, audit: bool) -> tuple[str, Any, Any]:
    """(container, its log file, a function saying whether it is gone)."""
    from coi.cli.context import connect, load_settings
    from coi.errors import BackendError
    from coi.sessions.usage import exists, log_target
    from coi.sessions.workspace import resolve_workspace

    ws = str(resolve_workspace(workspace))
    cfg = load_settings()
    try:
        client = connect(cfg)
    except BackendError:
        client = None  # the logs are files: readable with the daemon down
    with client or _Null():
        container, path = log_target(client, name, ws, audit=audit)

    def gone() -> bool:
        try:
            with connect(cfg) as fresh:
                return not exists(fresh, container)
        except BackendError:
            return False

    return container, path, gone


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _emit(records: Any, fmt: str, line: Any) -> None:
    try:
        for rec in records:
            click.echo(json.dumps(rec, separators=(",", ":")) if fmt == "json" else line(rec))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


@click.command("logs", cls=CoiCommand, examples=LOGS_EXAMPLES)
@click.argument("name", required=False, shell_complete=complete_containers)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the session ends.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("-w", "--workspace", default=None, metavar="DIR", help="Workspace (no NAME given).")
def logs_cmd(name: str | None, follow: bool, fmt: str, workspace: str | None) -> None:
    """coi's own log of a session: start, network policy, alerts, exit, end.

    NAME is a container (or its alias); without it, this workspace's newest session. The
    log outlives the container (~/.coi/logs/sessions/NAME.log).
    """
    from coi.audit.log import audit_dir
    from coi.audit.session_log import FINAL, alert_of, merged
    from coi.audit.session_log import follow as tail

    container, path, gone = _target(name, workspace, audit=False)
    # The monitor's alerts are in the audit log (written once, there): shown among coi's
    # own events, in time order.
    sources = [(path, lambda r: r), (audit_dir() / f"{container}.jsonl", alert_of)]
    if not follow:
        if not path.exists():
            from coi.errors import NotFound

            raise NotFound(f"no session log for {container}", details=str(path))
        _emit(merged(sources), fmt, _log_line)
        return
    click.echo(f"Following {path} (Ctrl+C to stop)", err=True)
    _emit(tail(sources, done=lambda r: r.get("event") in FINAL, gone=gone), fmt, _log_line)


@click.command("audit", cls=CoiCommand, examples=AUDIT_EXAMPLES)
@click.argument("name", required=False, shell_complete=complete_containers)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the sandbox is gone.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option(
    "--level", type=click.Choice(_LEVELS), default="info", help="Only events this severe or more."
)
@click.option("-w", "--workspace", default=None, metavar="DIR", help="Workspace (no NAME given).")
def audit_cmd(name: str | None, follow: bool, fmt: str, level: str, workspace: str | None) -> None:
    """The security monitor's events for a sandbox, from its audit log, readable.

    NAME is a container (or its alias); without it, this workspace's newest sandbox. The
    file is ~/.coi/audit/NAME.jsonl (JSON lines; --format json prints them as they are).
    """
    from coi.audit.session_log import follow as tail
    from coi.audit.session_log import read

    floor = _LEVELS.index(level)

    def wanted(rec: dict[str, Any]) -> bool:
        lvl = str(rec.get("level", "info"))
        return (_LEVELS.index(lvl) if lvl in _LEVELS else 0) >= floor

    container, path, gone = _target(name, workspace, audit=True)
    if not follow:
        if not path.exists():
            from coi.errors import NotFound

            raise NotFound(f"no audit log for {container}", details=str(path))
        _emit((r for r in read(path) if wanted(r)), fmt, _audit_line)
        return
    click.echo(f"Following {path} (Ctrl+C to stop)", err=True)
    _emit((r for r in tail(path, gone=gone) if wanted(r)), fmt, _audit_line)


def _table(rows: list[Any]) -> str:
    head = f"{'NAME':<24}{'STATUS':<9}{'CPU%':>7}{'CPU s':>9}{'MEMORY':>11}{'DISK':>11}"
    head += f"{'NET RX':>11}{'NET TX':>11}{'PROCS':>7}"
    lines = [head]
    for u in rows:
        pct = "-" if u.cpu_percent is None else f"{u.cpu_percent:.1f}"
        lines.append(
            f"{u.name[:23]:<24}{u.status[:8]:<9}{pct:>7}{u.cpu_seconds:>9.1f}"
            + "".join(
                f"{binary_text(n, ''):>11}"
                for n in (u.memory_bytes, u.disk_bytes, u.net_rx_bytes, u.net_tx_bytes)
            )
            + f"{u.processes:>7}"
        )
    if not rows:
        lines.append("(no coi sandboxes)")
    return "\n".join(lines)


@click.command("top", cls=CoiCommand, examples=TOP_EXAMPLES)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--interval", type=float, default=2.0, help="Seconds between refreshes.")
@click.option("-n", "--count", type=int, default=0, help="Stop after this many (0: never).")
def top_cmd(fmt: str, interval: float, count: int) -> None:
    """CPU, memory, disk and network of each coi sandbox, from the daemon's state API.

    Refreshes until Ctrl+C; --format json prints one sample (totals, no CPU%) and exits.
    """
    from coi.cli.context import daemon
    from coi.errors import UsageError
    from coi.sessions.usage import sample, with_rates

    if interval <= 0:
        raise UsageError("--interval must be more than 0 seconds")
    _cfg, client = daemon()
    with client:
        if fmt == "json":
            echo_json([u.as_dict() for u in sample(client)])
            return
        before, then = sample(client), time.monotonic()
        shown = 0
        tty = os.isatty(1)
        try:
            while True:
                time.sleep(interval)
                now, at = sample(client), time.monotonic()
                text = _table(with_rates(before, now, at - then))
                before, then = now, at
                click.echo(("\x1b[2J\x1b[H" if tty else "") + text)
                shown += 1
                if count and shown >= count:
                    return
        except KeyboardInterrupt:
            return
