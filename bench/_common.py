"""Helpers the benchmarks share: timing, the daemon's CLI, and how numbers are printed."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cli() -> str:
    """The daemon's own CLI, for side-by-side rows: incus where present, else lxc."""
    return shutil.which("incus") or shutil.which("lxc") or "lxc"


def fmt(xs: list[float]) -> str:
    """Median with [min..max], in milliseconds."""
    return f"{statistics.median(xs) * 1000:.0f} ms [{min(xs) * 1000:.0f}..{max(xs) * 1000:.0f}]"


def sh(*args: str) -> None:
    """Run the daemon's CLI with these arguments; fail loudly."""
    subprocess.run([cli(), *args], check=True, capture_output=True)


def spare_makers(ws: object) -> bool:
    """Whether a running-spare maker of workspace `ws` still runs (`python -m
    coi.sessions.warm JOB WS`): it outlives the coi that started it, and writes to that
    coi's state folder and makes a container until it ends."""
    out = subprocess.run(["pgrep", "-f", f"coi.sessions.warm .* {ws}$"], capture_output=True)
    return bool(out.stdout.split())


def wait_spare_makers(ws: object, timeout: float = 120.0) -> None:
    """Wait (bounded) until no spare maker of `ws` runs."""
    deadline = time.monotonic() + timeout
    while spare_makers(ws) and time.monotonic() < deadline:
        time.sleep(0.2)
