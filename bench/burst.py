"""Bursts of sessions started at once, with where the machine's CPU went: for A/B runs.

    sudo .venv/bin/python bench/burst.py [--sessions 10] [--bursts 4] [--image coi]

Each burst: N spares made and the machine settled, then N `coi shell --background --debug` on
one workspace started together; the time until all have returned (their sandboxes are up),
the CPU the whole machine spent meanwhile (from /proc/stat, steal counted apart), the coi
processes' own CPU and the daemon's. The sandboxes are killed after each burst.

To compare two versions of coi in the same hour (the VM's speed drifts), alternate bursts
with the other checkout first on the path:
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python bench/burst.py --bursts 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from session import COI, HOME, LOCKS, drop_spares, settle

from coi.backend import IncusClient
from coi.sessions import template


def machine_cpu() -> tuple[float, float]:
    """Seconds of busy CPU (steal left out) and of steal, since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait, steal = v[3], v[4], v[7]
    return (sum(v) - idle - iowait - steal) / 100, steal / 100


def daemon_cpu() -> float:
    """The daemon process's own CPU seconds (its helpers such as forkexec are not in it)."""
    # The oldest process of that name: the helpers (`lxd forkfile`, ...) share it.
    pid = subprocess.run(
        ["pgrep", "-o", "-x", "incusd|lxd"], capture_output=True, text=True
    ).stdout.split()[0]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst(c: IncusClient, tmpl: str, n: int, image: str, ws: str) -> str:
    settle(c)
    template.replenish(c, tmpl, n, lock_dir=LOCKS)
    settle(c, want_spares=n)
    time.sleep(1)
    env = {**os.environ, "COI_SPARES": str(n), "COI_TEMPLATES": "always" if n else "auto"}
    cmd = [*COI, "shell", "--background", "--debug", "--image", image, "-w", ws]
    busy0, steal0 = machine_cpu()
    lxd0, kids0 = daemon_cpu(), os.times()
    t = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(n)
    ]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t
    busy1, steal1 = machine_cpu()
    lxd1, kids1 = daemon_cpu(), os.times()
    coi_cpu = (kids1.children_user + kids1.children_system) - (
        kids0.children_user + kids0.children_system
    )
    for p, code in zip(procs, codes, strict=True):
        if code:
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            print(f"  a session failed ({code}): {err[-300:]}", file=sys.stderr)
    subprocess.run([*COI, "kill", "--all", "--force"], capture_output=True)
    return (
        f"| {wall:.2f} s | {busy1 - busy0:.1f} s | {coi_cpu:.1f} s | {lxd1 - lxd0:.1f} s | "
        f"{steal1 - steal0:.1f} s | {codes.count(0)}/{n} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--bursts", type=int, default=4)
    ap.add_argument("--image", default="coi")
    a = ap.parse_args()
    c = IncusClient.connect()
    ws = tempfile.mkdtemp(prefix="coi-burst-")
    try:
        fp = c.images.alias_target(a.image) or a.image
        tmpl = template.template_name(fp, {})
        if not c.instances.exists(tmpl):  # the first session makes it
            subprocess.run([*COI, "run", "--image", a.image, "-w", ws, "--", "true"], check=True)
        rows = [burst(c, tmpl, a.sessions, a.image, ws) for _ in range(a.bursts)]
        settle(c)
        drop_spares(c)
    finally:
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(HOME, ignore_errors=True)
    walls = [float(r.split()[1]) for r in rows]
    print(f"{c.server.display_name}, image {a.image}, {os.cpu_count()} CPUs, {a.sessions} at once")
    print("\n| all up | machine CPU | coi processes | daemon | steal | up |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nmedian {statistics.median(walls):.2f} s [{min(walls):.2f}..{max(walls):.2f}]")


if __name__ == "__main__":
    main()
