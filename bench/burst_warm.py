"""N `coi shell --background` at once with N running spares ready, against the raw burst floor.

    cd bench && sudo ../.venv/bin/python burst_warm.py [--sessions 10] [--rounds 3]

Rows, per round (the median of the rounds is printed, [min..max]):
- coi, spares ready: N running spares (`sandbox.running_spares = N`) booted in one workspace
  (made by a shell session, as the sessions that take them are shells) and ready; then N
  `coi shell --background --debug` there started together; the time until the last has
  returned (its tmux runs in its sandbox). The workspace has 2N slots: the sessions that
  end start the making of the next spares, as they would for a user (their interpreters'
  start is in the row);
- coi, no spares: the same with `running_spares = 0` (each makes its sandbox from the image);
- the raw burst floor: the daemon starting N stopped containers made beforehand from the
  image (root, NIC, workspace), all at once, and a tmux session in each, over REST from
  this already started process.

Everything made is removed at the end (the spares' makers are waited for first: they outlive
the coi that started them).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import timed, wait_spare_makers

from coi.backend import ExecRequest, IncusClient

COI = [sys.executable, "-m", "coi"]
POOL = os.environ.get("COI_POOL", "coi")
NET = os.environ.get("COI_NETWORK", "coibr0")
FLOOR = "bench-burst-floor-"


def ours(c: IncusClient, ws: Path) -> list[str]:
    return [
        i.name
        for i in c.instances.list()
        if i.config.get("user.coi.workspace") == str(ws) or i.name.startswith(FLOOR)
    ]


def clear(c: IncusClient, ws: Path) -> None:
    wait_spare_makers(ws)
    for n in ours(c, ws):
        c.instances.delete(n, force=True)


def ready_spares(c: IncusClient, ws: Path, n: int) -> None:
    """Boot n running spares for shells in `ws`: one `coi shell --background` there leaves
    them (its maker makes them one after the other, beside it: the workspace gets 2n
    slots); wait until all are ready (bounded), then end that session."""
    env = {**os.environ, "COI_RUNNING_SPARES": str(n), "COI_MAX_SLOTS": str(2 * n)}
    subprocess.run(
        [*COI, "shell", "--background", "--debug", "--image", IMAGE, "-w", str(ws)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30 + 10 * n
    while time.monotonic() < deadline:
        insts = [i for i in c.instances.list() if i.config.get("user.coi.workspace") == str(ws)]
        spares = [i for i in insts if i.config.get("user.coi.spare.ready") == "true"]
        if len(spares) == n:
            wait_spare_makers(ws, max(0.0, deadline - time.monotonic()))
            for i in insts:
                if i not in spares:
                    c.instances.delete(i.name, force=True)  # the session that left them
            return
        time.sleep(0.2)
    raise SystemExit(f"{n} running spares were not ready in time")


def shells(ws: Path, n: int, spares: int) -> float:
    env = {**os.environ, "COI_RUNNING_SPARES": str(spares), "COI_MAX_SLOTS": str(2 * n)}
    cmd = [*COI, "shell", "--background", "--debug", "--image", IMAGE, "-w", str(ws)]

    def one(_i: int) -> None:
        subprocess.run(cmd, env=env, check=True, capture_output=True)

    with ThreadPoolExecutor(n) as pool:
        return timed(lambda: list(pool.map(one, range(n))))


def floor(c: IncusClient, ws: Path, n: int) -> float:
    devices = {
        "root": {"type": "disk", "path": "/", "pool": POOL},
        "eth0": {"type": "nic", "network": NET, "name": "eth0"},
        "workspace": {"type": "disk", "source": str(ws), "path": "/workspace"},
    }
    names = [f"{FLOOR}{i}" for i in range(n)]
    for name in names:
        c.instances.create(name, image=IMAGE, devices=devices)

    def one(name: str) -> None:
        c.instances.start(name)
        c.exec.run(name, ExecRequest(["tmux", "new-session", "-d", "-s", "x"]))

    try:
        with ThreadPoolExecutor(n) as pool:
            return timed(lambda: list(pool.map(one, names)))
    finally:
        for name in names:
            c.instances.delete(name, force=True)


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s [{min(xs):.2f}..{max(xs):.2f}]"


IMAGE = "coi-tiny"


def main() -> None:
    global IMAGE
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image", default=IMAGE)
    a = ap.parse_args()
    IMAGE = a.image
    n = a.sessions
    tmp = Path(tempfile.mkdtemp(prefix="coi-bench-burst-"))
    ws = tmp / "ws"
    ws.mkdir()
    home = tmp / "home"
    os.environ["COI_HOME"] = str(home)
    c = IncusClient.connect()
    rows: dict[str, list[float]] = {"spares": [], "none": [], "floor": []}
    try:
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
            clear(c, ws)
            ready_spares(c, ws, n)
            rows["spares"].append(shells(ws, n, n))
            clear(c, ws)
            rows["none"].append(shells(ws, n, 0))
            clear(c, ws)
            rows["floor"].append(floor(c, ws, n))
    finally:
        clear(c, ws)
        shutil.rmtree(tmp, ignore_errors=True)
    f = statistics.median(rows["floor"])
    print(f"{c.server.display_name}, image {IMAGE}, {n} sessions at once, {a.rounds} rounds, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| row | time until all are up | / floor |\n|---|---|---|")
    for key, label in (
        ("spares", f"{n} `coi shell --background`, {n} running spares ready"),
        ("none", f"{n} `coi shell --background`, no spares"),
        ("floor", f"raw burst floor: start {n} prepared copies at once, tmux in each"),
    ):
        print(f"| {label} | {fmt(rows[key])} | {statistics.median(rows[key]) / f:.2f} |")


if __name__ == "__main__":
    main()
