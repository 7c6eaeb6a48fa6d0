"""Where one `coi run` spends its time: the session's steps, timed from process start.

    cd bench && sudo ../.venv/bin/python phases.py [coi run flags] -- true

Wraps the sandbox's steps and the daemon calls with timers, then runs the real `coi run`
in this process; prints one line per step (seconds since start) on stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

T0 = time.perf_counter()


def stamp(msg: str) -> None:
    sys.stderr.write(f"{time.perf_counter() - T0:6.3f} {msg}\n")


def timed_method(cls: type, name: str, label: str) -> None:
    original: Callable[..., Any] = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stamp(f"> {label}")
        try:
            return original(*args, **kwargs)
        finally:
            stamp(f"< {label}")

    setattr(cls, name, wrapper)


def main() -> int:
    from coi.backend.exec import ExecAPI
    from coi.backend.instances import InstancesAPI
    from coi.cli import main as coi_main
    from coi.sessions.sandbox import Sandbox

    stamp("imports done")
    steps = ("ensure_image", "choose_slot", "_from_spare", "wait_ready", "verify_network")
    for step in (*steps, "discard", "replenish"):
        timed_method(Sandbox, step, step)
    timed_method(InstancesAPI, "create", "create (+start)")
    timed_method(ExecAPI, "run", "exec")
    sys.argv = ["coi", "run", *sys.argv[1:]]
    try:
        return int(coi_main() or 0)
    finally:
        stamp("end")


if __name__ == "__main__":
    raise SystemExit(main())
