"""`coi list` against the daemon's own `list`, and the floor the interpreter and libraries set.

    cd bench && ../.venv/bin/python list_floor.py [--runs 10] [--also SRC ...]

Ten running `coi-tiny` containers are made (and removed at the end), each with an address
reserved on coi's bridge as coi's sandboxes have (`--dhcp`: without); then, alternating, each
row's command runs once per round: `coi list`, the daemon's own `list`, the bare interpreter,
the interpreter importing click, importing httpx, a minimal lister written on the standard
library's `http.client` with click imported (one request for the instances with their state,
one line printed per instance, nothing of coi), and the same on click and httpx (the
libraries coi uses: what is left between it and `coi list` is coi's own). Wall time per run,
median with [min..max]; the bytecode is written as an installed coi has it.

`--also SRC` adds a `coi list` row run from another tree's `src` folder (for example
`git archive HEAD src | tar -x -C /tmp/before`), so a change is measured against the code
before it in the same run, rounds interleaved.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from _common import cli, fmt, timed

from coi.backend import IncusClient
from coi.network import address

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

# The same with the project's own libraries, click and httpx (as coi's client sets it up on a
# unix socket): the floor of a lister on this stack, nothing of coi.
LIBRARIES = """
import click, httpx, sys
t = httpx.HTTPTransport(uds=sys.argv[1], verify=False)
with httpx.Client(transport=t, base_url="http://incus") as c:
    for inst in c.get("/1.0/instances", params={"recursion": 2}).json()["metadata"]:
        print(inst["name"], inst["status"])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--also", action="append", default=[], metavar="SRC", help="another src tree")
    ap.add_argument("--dhcp", action="store_true", help="containers without reserved addresses")
    a = ap.parse_args()
    c = IncusClient.connect()
    sock = c.endpoint.socket_path or ""
    py = sys.executable
    coi = str(Path(py).parent / "coi")
    rows: dict[str, list[str]] = {
        "`coi list`": [coi, "list"],
        **{
            f"`coi list`, {src}": [
                py,
                "-c",
                "from coi.cli import main; raise SystemExit(main())",
                "list",
            ]
            for src in a.also
        },
        f"`{Path(cli()).name} list`": [cli(), "list"],
        "`python -c pass`": [py, "-c", "pass"],
        "`python -c 'import click'`": [py, "-c", "import click"],
        "`python -c 'import httpx'`": [py, "-c", "import httpx"],
        "minimal lister: click + `http.client`, one request": [py, "-c", MINIMAL, sock],
        "lister on coi's libraries: click + httpx, one request": [py, "-c", LIBRARIES, sock],
    }
    names = [f"coi-listfloor{i:02d}-1" for i in range(10)]
    # As coi makes its sandboxes: each NIC with an address reserved on coi's bridge (which
    # `coi list` reads instead of the runtime state); `--dhcp`: none (`coi container launch`),
    # so `coi list` asks each running container's state.
    free = [] if a.dhcp else address.candidates(c.networks.get(NETWORK))
    if not a.dhcp and len(free) < len(names):
        raise SystemExit(f"{NETWORK} has {len(free)} free addresses; the bench needs ten")
    reserved = random.sample(free, len(names)) if free else []

    def devices(i: int) -> dict[str, dict[str, str]]:
        nic = {"type": "nic", "network": NETWORK, "name": "eth0"}
        if reserved:
            nic["ipv4.address"] = reserved[i]
        return {"root": {"type": "disk", "path": "/", "pool": POOL}, "eth0": nic}

    # Bytecode is written (the warm-up run does it), as an installed coi has it: with
    # PYTHONDONTWRITEBYTECODE set, each run would compile every module changed since its
    # cached bytecode was last written, and time the compiler instead of coi.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    envs = dict.fromkeys(rows, base)
    for src in a.also:
        envs[f"`coi list`, {src}"] = {**base, "PYTHONPATH": str(Path(src).resolve())}
    times: dict[str, list[float]] = {k: [] for k in rows}

    def run(label: str) -> None:
        subprocess.run(rows[label], check=True, capture_output=True, env=envs[label])

    try:
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda i: c.instances.create(
                        names[i], image="coi-tiny", devices=devices(i), start=True
                    ),
                    range(len(names)),
                )
            )
        for label in rows:  # warm the page cache once
            run(label)
        load = [os.getloadavg()[0]]
        for _ in range(a.runs):
            for label in rows:
                times[label].append(timed(partial(run, label)))
            load.append(os.getloadavg()[0])
    finally:
        for n in names:
            c.instances.delete(n, force=True)
    print(
        f"{c.server.display_name}, 10 running containers "
        f"({'DHCP' if a.dhcp else 'reserved addresses'}), {a.runs} runs each, alternating, "
        f"load average {min(load):.1f}..{max(load):.1f}\n"
    )
    print("| command | wall time |\n|---|---|")
    for label, xs in times.items():
        print(f"| {label} | {fmt(xs)} |")


if __name__ == "__main__":
    main()
