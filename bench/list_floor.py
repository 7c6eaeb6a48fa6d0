"""`coi list` against `lxc list`, and the floor the interpreter and the project's libraries set.

    cd bench && sudo ../.venv/bin/python list_floor.py [--runs 10]

Ten running `coi-tiny` containers are made (and removed at the end); then, alternating, each
row's command runs once per round: `coi list`, the daemon's own `list`, the bare interpreter,
the interpreter importing click, importing httpx, and a minimal lister written on the standard
library's `http.client` with click imported (one request for the instances with their state,
one line printed per instance, nothing of coi). Wall time per run, median with [min..max].
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import cli, fmt, timed

from coi.backend import IncusClient

POOL = "coi"
NETWORK = "coibr0"

# What any Python lister on this stack pays before doing coi's work: no httpx, no coi.
MINIMAL = """
import click, http.client, json, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
conn = Unix("daemon")
conn.request("GET", "/1.0/instances?recursion=2")
for inst in json.loads(conn.getresponse().read())["metadata"]:
    print(inst["name"], inst["status"])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    c = IncusClient.connect()
    sock = c.endpoint.socket_path or ""
    py = sys.executable
    coi = str(Path(py).parent / "coi")
    rows: dict[str, list[str]] = {
        "`coi list`": [coi, "list"],
        f"`{Path(cli()).name} list`": [cli(), "list"],
        "`python -c pass`": [py, "-c", "pass"],
        "`python -c 'import click'`": [py, "-c", "import click"],
        "`python -c 'import httpx'`": [py, "-c", "import httpx"],
        "minimal lister: click + `http.client`, one request": [py, "-c", MINIMAL, sock],
    }
    names = [f"coi-listfloor{i:02d}-1" for i in range(10)]
    devices = {
        "root": {"type": "disk", "path": "/", "pool": POOL},
        "eth0": {"type": "nic", "network": NETWORK, "name": "eth0"},
    }
    times: dict[str, list[float]] = {k: [] for k in rows}
    try:
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda n: c.instances.create(n, image="coi-tiny", devices=devices, start=True),
                    names,
                )
            )
        for argv in rows.values():  # warm the page cache once
            subprocess.run(argv, check=True, capture_output=True)
        for _ in range(a.runs):
            for label, argv in rows.items():
                times[label].append(
                    timed(lambda argv=argv: subprocess.run(argv, check=True, capture_output=True))
                )
    finally:
        for n in names:
            c.instances.delete(n, force=True)
    print(f"{c.server.display_name}, 10 running containers, {a.runs} runs each, alternating\n")
    print("| command | wall time |\n|---|---|")
    for label, xs in times.items():
        print(f"| {label} | {fmt(xs)} |")


if __name__ == "__main__":
    main()
