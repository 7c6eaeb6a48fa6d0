"""Output helpers shared by commands: JSON, times, sizes, tables and y/N questions."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click

from coi.errors import UsageError


def echo_json(obj: Any) -> None:
    """Indented JSON on stdout: the stable, documented shape scripts read."""
    click.echo(json.dumps(obj, indent=2))


def check_format(fmt: str, allowed: Sequence[str]) -> str:
    """Upstream's wording for a bad --format value (exit 2)."""
    if fmt not in allowed:
        quoted = " or ".join(f"'{a}'" for a in allowed)
        raise UsageError(f"invalid format '{fmt}': must be {quoted}")
    return fmt


def parse_time(value: str) -> datetime | None:
    """An RFC 3339 time from the daemon (nanoseconds and all) as a local datetime."""
    if not value or value.startswith("0001-01-01"):
        return None
    v = value.replace("Z", "+00:00")
    head, dot, rest = v.partition(".")
    if dot:
        # Python takes at most microseconds; the daemon sends nanoseconds.
        frac = "".join(ch for ch in rest if ch.isdigit())
        tz = rest[len(frac) :]
        v = f"{head}.{frac[:6]}{tz}"
    try:
        return datetime.fromisoformat(v).astimezone()
    except ValueError:
        return None


def local_time(value: str, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    t = parse_time(value)
    return t.strftime(fmt) if t else value


def human_size(n: float) -> str:
    """1024-based size as upstream prints it: `512 B`, `12.3 KB`."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in "KMGTP":
        n /= 1024
        if n < 1024 or unit == "P":
            break
    return f"{n:.1f} {unit}B"


def table(rows: Sequence[Sequence[str]], *, indent: str = "") -> str:
    """Left-aligned columns, two spaces apart."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    return "\n".join(lines)


def confirm(prompt: str, *, err: bool = False) -> bool:
    """Ask `<prompt> [y/N]: `; only y/yes (any case) is a yes. End of input is a no."""
    click.echo(f"{prompt} [y/N]: ", nl=False, err=err)
    line = sys.stdin.readline()
    return line.strip().lower() in ("y", "yes")
